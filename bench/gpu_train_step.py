"""GPU benchmark: B-LoRA training on a full-size SDXL UNet, pack against the official recipe.

Both sides train rank-64 LoRA on ``output_blocks.0.1`` / ``.1.1`` of the same full-size SDXL
UNet (random weights built by the host, fp16 on the GPU) at 1024 x 1024 (128 x 128 latents):

- pack: ComfyUI's model, the pack's trainer (weight-wrapper LoRA, fp16 autocast + scaler,
  fused AdamW, SDPA attention, no gradient checkpointing);
- reference: diffusers' UNet with peft LoRA as the official script runs it (fp16 autocast +
  GradScaler, gradient checkpointing, AdamW, DDPMScheduler).

It prints ms/step, steps/s, the time 1000 steps would take and the peak memory beyond the fp16
UNet for each, and the speed ratio. Goal: 1000 steps < 60 s on an H100, >= 2.5x the reference,
< 12 GB beyond the UNet.

    python bench/gpu_train_step.py [--steps 30] [--side pack|reference|both]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pack_import  # noqa: E402

pack_import.register_pack()
import host_harness  # noqa: E402

SDXL_UNET_CONFIG = {
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_linear_in_transformer": True, "use_temporal_resblock": False, "use_temporal_attention": False,
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4,
}
RANK, LATENT = 64, 128


def start_host_on_gpu():
    path, how = host_harness.find_comfyui()
    if path is None:
        sys.exit(f"needs ComfyUI: {how}")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True
    host = host_harness.start_host(path, cpu=False)
    return host


def full_size_sdxl():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    config.set_inference_dtype(torch.float16, None)
    with torch.device("cuda"):
        model = config.get_model({}, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return comfy.model_patcher.ModelPatcher(model, torch.device("cuda"), comfy.model_management.unet_offload_device())


def inputs():
    generator = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=generator)}
    positive = [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    return latents, positive


def measure(run_steps, steps: int, warmup: int = 3) -> dict:
    """``run_steps(n)`` trains n steps and returns each step's seconds; the first ``warmup`` are
    dropped. Peak memory is counted from the allocations before the run."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    times = run_steps(steps + warmup)[warmup:]
    median = statistics.median(times)
    return {"ms": median * 1000, "per_s": 1 / median, "s_per_1000": 1000 * median,
            "peak_gb": (torch.cuda.max_memory_allocated() - baseline) / 2**30}


def pack_side(host, model, steps: int) -> dict:
    """The pack's own loop (its per-step time includes the loss read-back, a GPU sync)."""
    recipes = host.pack("training.recipes")
    host_training = host.pack("nodes.host_training")
    trainer = host.pack("training.trainer")
    adapter_set = host.pack("training.lora_adapters")
    latents, positive = inputs()
    adapters = adapter_set.LoraAdapterSet(host_training.target_shapes(model, recipes.B_LORA), RANK, None)
    adapters.reset(0)
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)
    with host_training.training_model(model, adapters, dict(adapters.items())) as (clone, device):
        predict = host_training.unet_predict(clone, conditionings, device)
        schedule = host_training.noise_schedule(clone).to(device)

        def run_steps(n):
            times = []
            trainer.train(adapters, predict, x0.to(device), schedule,
                          trainer.TrainConfig(steps=n, learning_rate=5e-5, precision="fp16"),
                          trainer.TrainingHooks(on_step=lambda s, t, loss, seconds: times.append(seconds)))
            return times

        return measure(run_steps, steps)


def reference_side(host, model, steps: int) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    import comfy.utils

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    comfy_weights = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    wanted = unet.state_dict().keys()
    unet.load_state_dict({d: comfy_weights[l] for d, l in mapping.items() if d in wanted and l in comfy_weights})
    unet.to("cuda", torch.float16).requires_grad_(False)
    unet.enable_gradient_checkpointing()
    targets = [f"up_blocks.0.attentions.{i}.transformer_blocks.{t}.attn{a}.{p}" for i in (0, 1) for t in range(10)
               for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # LoRA parameters in fp32, as the official script
    optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    latents, positive = inputs()
    x0 = (latents["samples"] * 0.13025).to("cuda", torch.float16)
    context = positive[0][0].to("cuda", torch.float16)
    pooled = positive[0][1]["pooled_output"].to("cuda", torch.float16)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device="cuda", dtype=torch.float16)
    unet.train()

    def step():
        began = time.perf_counter()
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (1,), device="cuda")
        noisy = scheduler.add_noise(x0, noise, timesteps)
        with torch.autocast("cuda", dtype=torch.float16):
            prediction = unet(noisy, timesteps, encoder_hidden_states=context,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the same per-step sync the pack's loop has
        return time.perf_counter() - began

    result = measure(lambda n: [step() for _ in range(n)], steps)
    del unet, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", choices=("pack", "reference", "both"), default="both")
    args = parser.parse_args()
    host = start_host_on_gpu()
    model = full_size_sdxl()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; SDXL UNet fp16, 1024x1024, rank {RANK}")
    results = {}
    if args.side in ("reference", "both"):
        results["reference"] = reference_side(host, model, args.steps)
    if args.side in ("pack", "both"):
        results["pack"] = pack_side(host, model, args.steps)
    for name, r in results.items():
        print(f"{name:>9}: {r['ms']:7.1f} ms/step  {r['per_s']:5.2f} steps/s  1000 steps {r['s_per_1000']:6.1f} s  "
              f"peak {r['peak_gb']:5.2f} GB beyond the UNet")
    if len(results) == 2:
        print(f"speed-up pack vs reference: {results['reference']['ms'] / results['pack']['ms']:.2f}x (goal >= 2.5x)")


if __name__ == "__main__":
    main()
