"""UnZipLoRA training against a reference written from the method's equations.

The reference runs on the diffusers twin of the tiny UNet, with forward hooks adding
``x_c ΔW_c^T + x_s ΔW_s^T`` to every attention projection (``ΔW = (B A) * (m ⊙ b)`` per output
feature, content/style prompts on cross-attention k/v), and re-implements the period schedule,
the column scores (fraction of input rows with |W ⊙ G| > threshold, G from the product rule),
top-k selection with style avoiding content columns, the block roles, the 0.5-weighted overlap
term, merger gradients limited to the overlap, clipping, AdamW with three groups and the clamp.
One full period (steps 0-2 with period 2) must give the same losses, gradients, columns and
parameters as the pack on the ComfyUI model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devkit import tiny_models
from devkit.unziplora_reference import (
    LEARNING_RATE_OF, LR_CONTENT, LR_MERGER, LR_STYLE, OVERLAP_WEIGHT, RANK, RATIO, SAMPLE_TIMES, SEED, STEPS_PLANNED,
    THRESHOLD, Reference, initial_parameters, reference_parameters,
)

def test_one_period_equals_the_reference(host, tiny_sdxl):
    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    diffusion = host.pack("training.diffusion")
    trainer = host.pack("training.trainer")
    sdxl_unet = host.pack("core.sdxl_unet")
    unziplora = host.pack("training.unziplora")

    latents, positive = tiny_models.image_and_prompt(0)
    _, content_prompt = tiny_models.image_and_prompt(100)
    _, style_prompt = tiny_models.image_and_prompt(200)
    contexts = {"content": content_prompt[0][0], "style": style_prompt[0][0]}
    settings = unziplora.UnZipConfig(sample_times=SAMPLE_TIMES, column_ratio=RATIO, merger_learning_rate=LR_MERGER,
                                     style_learning_rate=LR_STYLE, overlap_weight=OVERLAP_WEIGHT, cone_threshold=THRESHOLD)
    shapes = host_training.target_shapes(tiny_sdxl, sdxl.ALL_ATTENTION)
    layers = unziplora.make_layers(shapes, RANK, settings, SEED)
    initial = initial_parameters(layers)
    method = unziplora.UnZipMethod(layers, STEPS_PLANNED, LR_CONTENT, settings)

    x0 = host_training.training_latents(tiny_sdxl, latents)
    conditionings = host_training.conditioning_per_image(tiny_sdxl, positive, 1)
    draws = [diffusion.draw_step(SEED, step, 1, x0.shape) for step in range(3)]

    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    unet.requires_grad_(False)
    reference = Reference(unet, initial, sdxl_unet.ldm_to_diffusers, contexts)
    y_inputs = {"text_embeds": positive[0][1]["pooled_output"],
                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])}

    wrappers = unziplora.module_wrappers(layers, contexts, settings)
    with host_training.training_model(tiny_sdxl, method.modules, module_wrappers=wrappers) as (clone, device):
        predict = host_training.unet_predict(clone, conditionings, device)
        schedule = host_training.noise_schedule(clone)
        method.before_step(0)
        loss = diffusion.denoising_loss(predict, x0, draws[0], schedule)
        loss.backward()
        ours_grads = {p: {k: v.grad.clone() for k, v in reference_parameters(l).items() if v.grad is not None}
                      for p, l in layers.items()}
        method.modules.zero_grad(set_to_none=True)
        state = trainer.train(method.modules, predict, x0, schedule,
                              trainer.TrainConfig(steps=3, learning_rate=LR_CONTENT, seed=SEED), method=method)

    # step 0's gradients, through the other UNet and the hooks
    reference.masked = False
    prediction = unet(diffusers_noisy(x0, draws[0]), torch.tensor([draws[0].timestep]), encoder_hidden_states=positive[0][0],
                      added_cond_kwargs=y_inputs).sample
    reference_loss = F.mse_loss(prediction.float(), draws[0].noise.float())
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-7)  # the two UNets agree to ~3e-5
    for path, grads in ours_grads.items():
        p = reference.params[sdxl_unet.ldm_to_diffusers(path)]
        assert set(grads) == {"content_down", "content_up", "style_down", "style_up"}
        for name, grad in grads.items():
            scale = p[name].grad.abs().max()
            assert (grad - p[name].grad).abs().max() <= 1e-4 * scale, (path, name)
        for name in list(p):
            if isinstance(p[name], torch.Tensor) and p[name].grad is not None:
                p[name].grad = None

    reference_losses = reference.train(x0, draws, y_inputs, positive[0][0], 3)
    assert state.losses == pytest.approx(reference_losses, rel=1e-4)
    selected = mismatched = columns = identical = 0
    for path, layer in layers.items():
        p = reference.params[sdxl_unet.ldm_to_diffusers(path)]
        for role in ("content", "style"):
            ours_mask, reference_mask = layer.mask(role).cpu(), p[f"mask_{role}"]
            selected += int(reference_mask.sum())
            mismatched += int((ours_mask != reference_mask).sum())
            columns += reference_mask.numel()
            identical += int(torch.equal(ours_mask, reference_mask))
        if not all(torch.equal(layer.mask(r).cpu(), p[f"mask_{r}"]) for r in ("content", "style")):
            continue  # its masked forward differs by a column, so its step-2 update does too
        for name, lr in LEARNING_RATE_OF.items():
            # three AdamW steps move an element by about 3 lr; rounding decides the sign where a
            # gradient is within a few eps of zero, so most (not all) elements agree to 1% of lr
            difference = (reference_parameters(layer)[name].detach().cpu() - p[name].detach()).abs()
            assert (difference <= 0.01 * lr).float().mean() >= 0.97, (path, name)
            assert difference.max() <= 2.01 * 3 * lr, (path, name)
    # scores count rows above a threshold: a row within float noise of it can move one column
    # across the top-k boundary, so a few columns may differ between the two UNets
    assert identical >= 0.9 * 2 * len(layers), f"{identical} of {2 * len(layers)} masks identical"
    assert mismatched <= 0.01 * columns, f"{mismatched} of {columns} columns chosen differently"
    assert 0.05 * columns < selected < 0.5 * columns
    assert any(not torch.all(l.merge_content == 1) for l in layers.values()), "mergers trained"


def diffusers_noisy(x0, draw):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return scheduler.add_noise(x0, draw.noise, torch.tensor([draw.timestep]))
