"""GPU benchmark: B-LoRA training on a full-size SDXL UNet, pack against the official recipe.

Every side trains rank-64 LoRA on ``output_blocks.0.1`` / ``.1.1`` of the same full-size SDXL
UNet (random weights built by the host, fp16 on the GPU) at 1024 x 1024 (128 x 128 latents),
one after the other in this one run, and prints ms/step, the time 1000 steps would take, the
peak memory beyond the fp16 UNet and the speed-up over the reference:

- ``pack``: ComfyUI's model and the pack's own trainer, as "Train B-LoRA" runs it (weight-wrapper
  LoRA, fp16 autocast + scaler, fused AdamW, PyTorch SDPA attention, no gradient checkpointing);
- variants of the pack, each changing one choice to show what it bought: ``pack-bf16`` (bf16, no
  scaler), ``pack-unfused-adamw``, ``pack-down-path-backward`` (the noisy latent requires grad, so
  autograd no longer stops at ``output_blocks.0.1``), ``pack-basic-attention`` (ComfyUI's plain
  softmax attention instead of SDPA), and with ``--compile`` ``pack-compiled`` (the UNet's blocks
  under torch.compile);
- ``reference``: the official settings in diffusers + peft (fp16 autocast + GradScaler, gradient
  checkpointing, AdamW, DDPMScheduler), latents encoded once as the pack does;
- ``reference-vae-every-step``: as the official script really runs, re-encoding the image through
  the fp32 VAE at every step.

Goal: 1000 steps < 60 s on an H100, >= 2.5x the reference, < 12 GB beyond the UNet.

``--tiny`` runs the same code on the tiny SDXL-architecture UNet (on the CPU when there is no
GPU, fp32 there): the test suite uses it to keep this script working between GPU sessions.

    python bench/gpu_train_step.py [--steps 30] [--only pack,reference] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
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
RANK = 64
OFFICIAL_TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
SDXL_VAE_SCALE = 0.13025


@dataclass(frozen=True)
class Setup:
    """What differs between the full-size run and the ``--tiny`` smoke run."""

    device: torch.device
    tiny: bool

    @property
    def latent(self) -> int:
        return 16 if self.tiny else 128

    @property
    def precision(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    @property
    def context_dim(self) -> int:
        return 64 if self.tiny else 2048

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def start_host(setup: Setup):
    path, how = host_harness.find_comfyui()
    if path is None:
        sys.exit(f"needs ComfyUI: {how}")
    return host_harness.start_host(path, cpu=setup.device.type != "cuda")


def build_unet(setup: Setup):
    """The host's SDXL model (ComfyUI's own classes) with fan-in scaled random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if setup.tiny:
        from blora_pack.command_line.tiny import build_tiny_sdxl

        return build_tiny_sdxl(dtype=setup.dtype)
    config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    config.set_inference_dtype(setup.dtype, None)
    with setup.device:
        model = config.get_model({}, device=setup.device)
    generator = torch.Generator(device=setup.device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return comfy.model_patcher.ModelPatcher(model, setup.device, comfy.model_management.unet_offload_device())


def inputs(setup: Setup):
    generator = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(1, 4, setup.latent, setup.latent, generator=generator)}
    positive = [[torch.randn(1, 77, setup.context_dim, generator=generator),
                 {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    return latents, positive


def measure(setup: Setup, run_steps, steps: int, warmup: int) -> dict:
    """``run_steps(n)`` trains n steps and returns each step's seconds; the first ``warmup`` are
    dropped (the first one's time is reported apart: it holds torch.compile's). Peak memory counts
    from what was allocated before the run (the UNet and inputs)."""
    cuda = setup.device.type == "cuda"
    setup.synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    times = run_steps(steps + warmup)
    median = statistics.median(times[warmup:])
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if cuda else None
    return {"ms": median * 1000, "s_per_1000": 1000 * median, "peak_gb": peak, "first_step_s": times[0]}


@dataclass(frozen=True)
class PackVariant:
    precision: str | None = None
    fused_adam: bool = True
    backward_through_down_path: bool = False
    attention: str = "sdpa"
    compiled: bool = False


PACK_VARIANTS = {
    "pack": PackVariant(),
    "pack-bf16": PackVariant(precision="bf16"),
    "pack-unfused-adamw": PackVariant(fused_adam=False),
    "pack-down-path-backward": PackVariant(backward_through_down_path=True),
    "pack-basic-attention": PackVariant(attention="basic"),
    "pack-compiled": PackVariant(compiled=True),
}


@contextlib.contextmanager
def attention_function(kind: str):
    """Swap ComfyUI's attention for its plain softmax one (what SDPA buys), restored after."""
    import comfy.ldm.modules.attention as attention

    chosen = attention.optimized_attention
    if kind == "basic":
        attention.optimized_attention = attention.attention_basic
    try:
        yield
    finally:
        attention.optimized_attention = chosen


@contextlib.contextmanager
def adam_fused(trainer, fused: bool):
    make_optimizer = trainer.make_optimizer

    if not fused:
        trainer.make_optimizer = lambda groups, config, device: make_optimizer(groups, config, torch.device("cpu"))
    try:
        yield
    finally:
        trainer.make_optimizer = make_optimizer


def pack_side(setup: Setup, host, model, variant: PackVariant, steps: int, warmup: int) -> dict:
    recipes = host.pack("training.recipes")
    host_training = host.pack("nodes.host_training")
    trainer = host.pack("training.trainer")
    adapter_set = host.pack("training.lora_adapters")
    latents, positive = inputs(setup)
    adapters = adapter_set.LoraAdapterSet(host_training.target_shapes(model, recipes.B_LORA), RANK, None)
    adapters.reset(0)
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)
    precision = variant.precision or setup.precision
    if setup.device.type != "cuda" and precision == "fp16":
        precision = "fp32"
    with contextlib.ExitStack() as stack:
        clone, device = stack.enter_context(host_training.training_model(model, adapters, dict(adapters.items())))
        stack.enter_context(attention_function(variant.attention))
        stack.enter_context(adam_fused(trainer, variant.fused_adam))
        unet_predict = host_training.unet_predict(clone, conditionings, device)
        if variant.compiled:
            unet = clone.model.diffusion_model
            unet.compile()  # in place: the UNet's __call__ runs the compiled forward until reset
            stack.callback(setattr, unet, "_compiled_call_impl", None)

        def predict(noisy, timesteps, index):
            if variant.backward_through_down_path:
                noisy = noisy.detach().requires_grad_(True)
            return unet_predict(noisy, timesteps, index)

        schedule = host_training.noise_schedule(clone).to(device)

        def run_steps(n):
            times = []
            trainer.train(adapters, predict, x0.to(device), schedule,
                          trainer.TrainConfig(steps=n, learning_rate=5e-5, precision=precision),
                          trainer.TrainingHooks(on_step=lambda s, t, loss, seconds: times.append(seconds)))
            return times

        return measure(setup, run_steps, steps, warmup)


def diffusers_unet(setup: Setup, model):
    """diffusers' UNet holding the host model's weights (ComfyUI's own key map)."""
    if setup.tiny:
        import tiny_models

        return tiny_models.diffusers_unet_from(model).to(setup.device, setup.dtype)
    import comfy.utils
    from diffusers import UNet2DConditionModel

    with setup.device:
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
    unet.load_state_dict({d: comfy_weights[l] for d, l in mapping.items() if d in wanted and l in comfy_weights},
                         strict=True)
    return unet.to(setup.device, setup.dtype)


def sdxl_vae(setup: Setup):
    """An SDXL-architecture VAE (random weights), fp32 as the official script keeps it."""
    from diffusers import AutoencoderKL

    channels = (8, 8, 16, 16) if setup.tiny else (128, 256, 512, 512)  # 8x down to the latent
    with setup.device:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
            layers_per_block=2, norm_num_groups=8 if setup.tiny else 32, sample_size=8 * setup.latent,
            scaling_factor=SDXL_VAE_SCALE,
        )
    return vae.to(setup.device, torch.float32).requires_grad_(False)


def reference_side(setup: Setup, host, model, steps: int, warmup: int, vae_every_step: bool) -> dict:
    """The official script's step (blora.md section 1.4), on the same weights."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    recipes = host.pack("training.recipes")
    host_training = host.pack("nodes.host_training")
    sdxl_unet = host.pack("core.sdxl_unet")
    unet = diffusers_unet(setup, model).requires_grad_(False)
    if setup.device.type == "cuda":
        unet.enable_gradient_checkpointing()
    targets = [sdxl_unet.ldm_to_diffusers(path) for path in host_training.target_shapes(model, recipes.B_LORA)]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # LoRA parameters in fp32, as the official script casts them
    optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    cuda = setup.device.type == "cuda"
    scaler = torch.amp.GradScaler(setup.device.type, enabled=cuda)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    latents, positive = inputs(setup)
    x0 = (latents["samples"] * SDXL_VAE_SCALE).to(setup.device, setup.dtype)
    vae = sdxl_vae(setup) if vae_every_step else None
    pixels = torch.rand(1, 3, 8 * setup.latent, 8 * setup.latent, generator=torch.Generator().manual_seed(0))
    pixels = (pixels * 2 - 1).to(setup.device)
    if vae is not None:
        with torch.no_grad():
            encoded = vae.encode(pixels).latent_dist.mean
        if encoded.shape != x0.shape:
            raise RuntimeError(f"the VAE encodes to {tuple(encoded.shape)}, the latents are {tuple(x0.shape)}")
    context = positive[0][0].to(setup.device, setup.dtype)
    pooled = positive[0][1]["pooled_output"].to(setup.device, setup.dtype)
    time_ids = torch.tensor([OFFICIAL_TIME_IDS], device=setup.device, dtype=setup.dtype)
    unet.train()

    def step():
        began = time.perf_counter()
        model_input = x0
        if vae is not None:
            model_input = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(setup.dtype)
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, 1000, (1,), device=setup.device)
        noisy = scheduler.add_noise(model_input, noise, timesteps)
        with torch.autocast(setup.device.type, dtype=torch.float16, enabled=cuda):
            prediction = unet(noisy, timesteps, encoder_hidden_states=context,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the per-step loss read-back the pack's loop has too
        return time.perf_counter() - began

    try:
        return measure(setup, lambda n: [step() for _ in range(n)], steps, warmup)
    finally:
        del unet, optimizer, vae
        if cuda:
            torch.cuda.empty_cache()


REFERENCE_VARIANTS = {"reference": False, "reference-vae-every-step": True}


def run_all(setup: Setup, names: list[str], steps: int, warmup: int) -> dict[str, dict]:
    host = start_host(setup)
    model = build_unet(setup)
    results = {}
    for name in names:
        if name in REFERENCE_VARIANTS:
            results[name] = reference_side(setup, host, model, steps, warmup, REFERENCE_VARIANTS[name])
        else:
            results[name] = pack_side(setup, host, model, PACK_VARIANTS[name], steps, warmup)
        print(f"  measured {name}: {results[name]['ms']:.1f} ms/step", flush=True)
    return results


def describe_machine(setup: Setup) -> str:
    if setup.device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def table(results: dict[str, dict]) -> list[str]:
    """Markdown rows for BENCHMARKS.md: speed-up is against ``reference`` when it ran."""
    reference = results.get("reference", {}).get("ms")
    rows = ["| side | ms/step | 1000 steps (s) | first step (s) | peak beyond UNet (GB) | speed-up vs reference |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        speed_up = "-" if reference is None else f"{reference / r['ms']:.2f}x"
        rows.append(f"| {name} | {r['ms']:.1f} | {r['s_per_1000']:.1f} | {r['first_step_s']:.1f} | {peak} | {speed_up} |")
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--only", help="comma-separated sides to run (default: all but pack-compiled)")
    parser.add_argument("--compile", action="store_true", help="also run pack-compiled (slow to start)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet (CPU without a GPU): a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    all_names = [*REFERENCE_VARIANTS, *PACK_VARIANTS]
    names = args.only.split(",") if args.only else [n for n in all_names if n != "pack-compiled" or args.compile]
    unknown = [n for n in names if n not in all_names]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; choose from {all_names}")
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("needs a CUDA GPU (or --tiny for a smoke run on the CPU)")
    setup = Setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.tiny)
    size = "tiny SDXL-architecture UNet" if args.tiny else "SDXL UNet"
    print(f"{describe_machine(setup)}; {size}, {setup.precision}, latent {setup.latent}x{setup.latent}, rank {RANK}, "
          f"median of {args.steps} steps after {args.warmup}")
    results = run_all(setup, names, args.steps, args.warmup)
    print("\n".join(table(results)))
    if "pack" in results and "reference" in results:
        print(f"goal: >= 2.5x the reference, 1000 steps < 60 s on an H100, < 12 GB beyond the UNet")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(setup), "tiny": args.tiny, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
