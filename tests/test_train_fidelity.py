"""One training step of the pack equals one step of the official recipe in diffusers + peft.

Same tiny weights, same LoRA init (non-zero up, so both factors get gradients), same image,
noise and timestep: the loss, the LoRA gradients and the LoRA after one clipped AdamW step
must agree. The reference noises with diffusers' DDPMScheduler (SDXL's scaled-linear config)
and runs diffusers' UNet with peft LoRA on the same modules, as the PEFT-era official script.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devkit import tiny_models

RANK, LEARNING_RATE, SEED = 4, 1e-3, 11


def reference_unet_with_lora(tiny_sdxl, adapters, to_diffusers):
    from peft import LoraConfig

    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    unet.requires_grad_(False)  # as the official script, before adding the LoRA layers
    targets = [to_diffusers(path) for path, _ in adapters.items()]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    lora_params = []
    with torch.no_grad():
        for path, adapter in adapters.items():
            module = unet.get_submodule(to_diffusers(path))
            module.lora_A["default"].weight.copy_(adapter.down)
            module.lora_B["default"].weight.copy_(adapter.up)
            lora_params += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return unet, lora_params


def assert_close_to_scale(ours, reference, tolerance=1e-4):
    """Equal up to float rounding: the largest difference is tiny next to the tensor's scale
    (the pack adds the delta to the weight, peft adds B(Ax) to Wx: same math, other rounding)."""
    difference = (ours.detach().cpu() - reference.detach().cpu()).abs().max()
    assert difference <= tolerance * reference.abs().max(), f"differs by {difference}, scale {reference.abs().max()}"


@pytest.fixture
def run_inputs():
    return tiny_models.image_and_prompt()


def test_one_step_equals_the_official_recipe(host, tiny_sdxl, run_inputs):
    from diffusers import DDPMScheduler

    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    diffusion = host.pack("training.diffusion")
    trainer = host.pack("training.trainer")
    sdxl_unet = host.pack("core.sdxl_unet")
    adapter_set = host.pack("training.lora_adapters")
    latents, positive = run_inputs

    shapes = host_training.target_shapes(tiny_sdxl, sdxl.B_LORA.layers)
    assert len(shapes) == 2 * 2 * 8
    adapters = adapter_set.LoraAdapterSet(shapes, RANK, None)
    adapters.reset(SEED)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for _, adapter in adapters.items():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=generator) * 0.05)
    initial = [p.detach().clone() for _, a in adapters.items() for p in (a.down, a.up)]
    unet, reference_params = reference_unet_with_lora(tiny_sdxl, adapters, sdxl_unet.ldm_to_diffusers)

    x0 = host_training.training_latents(tiny_sdxl, latents)
    conditionings = host_training.conditioning_per_image(tiny_sdxl, positive, 1)
    draw = diffusion.draw_step(SEED, 0, 1, x0.shape)

    # reference: diffusers scheduler + UNet + peft, F.mse_loss on epsilon, clip 1.0, AdamW
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon")
    timesteps = torch.tensor([draw.timestep])
    noisy = scheduler.add_noise(x0, draw.noise, timesteps)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    prediction = unet(noisy, timesteps, encoder_hidden_states=positive[0][0],
                      added_cond_kwargs={"text_embeds": positive[0][1]["pooled_output"], "time_ids": time_ids}).sample
    reference_loss = F.mse_loss(prediction.float(), draw.noise.float(), reduction="mean")
    reference_loss.backward()
    reference_grads = [p.grad.clone() for p in reference_params]
    torch.nn.utils.clip_grad_norm_(reference_params, 1.0)
    torch.optim.AdamW(reference_params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8).step()

    # the pack, on the host's model
    with host_training.training_model(tiny_sdxl, adapters, adapters.weight_wrappers()) as (clone, device):
        predict = host_training.unet_predict(clone, conditionings, device)
        schedule = host_training.noise_schedule(clone)
        torch.testing.assert_close(schedule.float(), scheduler.alphas_cumprod, rtol=1e-6, atol=1e-7)
        loss = diffusion.denoising_loss(predict, x0, draw, schedule)
        loss.backward()
        grads = [g for _, a in adapters.items() for g in (a.down.grad.clone(), a.up.grad.clone())]
        adapters.zero_grad(set_to_none=True)
        state = trainer.train(adapters, predict, x0, schedule,
                              trainer.TrainConfig(steps=1, learning_rate=LEARNING_RATE, seed=SEED))

    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
    assert state.losses[0] == pytest.approx(reference_loss.item(), rel=1e-5)
    assert all(g.abs().max() > 0 for g in grads)
    for ours, reference in zip(grads, reference_grads):
        assert_close_to_scale(ours, reference)
    trained = [p for _, a in adapters.items() for p in (a.down, a.up)]
    for ours, reference, before, grad in zip(trained, reference_params, initial, reference_grads):
        # AdamW's first step moves each element by about lr * g / (|g| + eps): where |g| is within
        # a few eps of zero, rounding of g decides the step, so compare the update where |g| >> eps.
        stable = grad.abs() > 1e3 * 1e-8
        assert stable.float().mean() > 0.9
        ours_update, reference_update = ours.detach().cpu() - before, reference.detach() - before
        assert (ours_update - reference_update)[stable].abs().max() <= 1e-3 * LEARNING_RATE
        assert (ours_update - reference_update).abs().max() <= 2.01 * LEARNING_RATE  # at most a flipped sign
