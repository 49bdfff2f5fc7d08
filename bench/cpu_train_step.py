"""CPU benchmark: the pack's B-LoRA train step against the reference step, side by side.

Both train rank-64 LoRA on the same tiny SDXL-architecture UNet (same weights), fp32, one
image per step: the pack through ComfyUI (weight-wrapper LoRA on a clone, its own loop), the
reference as the official recipe runs it in diffusers + peft (DDPMScheduler noising, UNet
forward, eps-MSE, backward, clip 1.0, AdamW). Rounds alternate so both see the same machine
state; the median step time of each is reported with the ratio pack / reference (goal <= 1.0).

    python -m bench.cpu_train_step [--size 32] [--steps 20] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from devkit import host as bench_host
from bench import report
from devkit import tiny_models


def pack_runner(host, model, latents, positive, rank, steps):
    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    trainer = host.pack("training.trainer")
    adapter_set = host.pack("training.lora_adapters")
    adapters = adapter_set.LoraAdapterSet(host_training.target_shapes(model, sdxl.B_LORA.layers), rank, None)
    adapters.reset(0)
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)

    def run():
        with host_training.training_model(model, adapters, adapters.weight_wrappers()) as (clone, device):
            predict = host_training.unet_predict(clone, conditionings, device)
            times = []
            trainer.train(adapters, predict, x0, host_training.noise_schedule(clone),
                          trainer.TrainConfig(steps=steps, learning_rate=5e-5),
                          trainer.TrainingHooks(on_step=lambda s, t, l, seconds: times.append(seconds)))
        return times

    return run


def reference_runner(host, model, latents, positive, rank, steps):
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    sdxl_unet = host.pack("core.sdxl_unet")
    unet = tiny_models.diffusers_unet_from(model)
    unet.requires_grad_(False)  # as the official script, before adding the LoRA layers
    targets = [sdxl_unet.ldm_to_diffusers(p) for p in host_training.target_shapes(model, sdxl.B_LORA.layers)]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    x0 = host_training.training_latents(model, latents)
    context, pooled = positive[0][0], positive[0][1]["pooled_output"]
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])

    def run():
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            noise = torch.randn_like(x0)
            timesteps = torch.randint(0, 1000, (1,))
            noisy = scheduler.add_noise(x0, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=context,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)
        return times

    return run


def main() -> None:
    parser = report.arguments(__doc__, size=32, steps=20, size_help="latent size (32 = a 256 px image)")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()

    host = bench_host.start_found_host()
    torch.manual_seed(0)
    model = tiny_models.build_tiny_sdxl()
    generator = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(1, 4, args.size, args.size, generator=generator)}
    positive = [[torch.randn(1, 77, tiny_models.CONTEXT_DIM, generator=generator),
                 {"pooled_output": torch.randn(1, tiny_models.POOLED_DIM, generator=generator)}]]
    runners = {"pack": pack_runner(host, model, latents, positive, args.rank, args.steps + 2),
               "reference": reference_runner(host, model, latents, positive, args.rank, args.steps + 2)}
    samples = report.alternate(runners, args.rounds, warmup=2)
    report.print_ratio(samples, f"tiny SDXL UNet, latent {args.size}x{args.size}, rank {args.rank}, fp32, "
                       f"{args.rounds} x {args.steps} steps each", "goal <= 1.0", args.json)


if __name__ == "__main__":
    main()
