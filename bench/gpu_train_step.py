"""GPU benchmark: B-LoRA training on a full-size SDXL UNet, pack against the official recipe.

Every side trains rank-64 LoRA on ``output_blocks.0.1`` / ``.1.1`` of the same full-size SDXL
UNet (random weights built by the host, fp16 on the GPU) at 1024 x 1024 (128 x 128 latents),
one after the other in this one run, and prints ms/step (also the seconds 1000 steps take), the
peak memory beyond the fp16 UNet and the speed-up over the reference:

- ``pack``: ComfyUI's model and the pack's own trainer, as "Train B-LoRA" runs it (weight-wrapper
  LoRA, fp16 autocast + scaler, fused AdamW, PyTorch SDPA attention, no gradient checkpointing);
- variants of the pack, each changing one choice to show what it bought: ``pack-bf16`` (bf16, no
  scaler), ``pack-unfused-adamw``, ``pack-down-path-backward`` (the noisy latent requires grad, so
  autograd no longer stops at ``output_blocks.0.1``), ``pack-basic-attention`` (ComfyUI's plain
  softmax attention instead of SDPA), ``pack-8gb`` (the node's ``memory`` = ``8 GB``: gradient
  checkpointing of the backward path), and with ``--compile`` ``pack-compiled`` (the UNet under
  torch.compile);
- ``reference``: the official settings in diffusers + peft (fp16 autocast + GradScaler, gradient
  checkpointing, AdamW, DDPMScheduler), latents encoded once as the pack does;
- ``reference-vae-every-step``: as the official script really runs, re-encoding the image through
  the fp32 VAE at every step.

Goal: 1000 steps < 60 s on an H100, >= 2.5x the reference, < 12 GB beyond the UNet.

``--size tiny`` runs the same code on the tiny SDXL-architecture UNet (on the CPU when there is
no GPU, fp32 there): the test suite uses it to keep this script working between GPU sessions.
``--size narrow`` keeps every layer of SDXL at a tenth of its widths: on a CPU its step time is
mostly per-operation overhead (Python, dispatch), which a GPU step at 1024 px may also be bound by.

``--model flux``: SplitFlux on FLUX.1-dev's full-size transformer (random weights built by the
host, bf16 on the GPU) at 1024 x 1024 with 256 text tokens per prompt (what ComfyUI's T5 gives
FLUX.1), the sides of ``bench/splitflux_sides.py``: ``pack`` (the job Train SplitFlux trains,
bf16 autocast, fused AdamW), ``pack-8gb`` (memory ``8 GB``) and ``reference`` (the paper's
equations on diffusers' FLUX transformer with the same weights, bf16 autocast, AdamW); ``--size
narrow`` / ``tiny`` as for SDXL (FLUX.1 at 1/16 of its widths, the tiny FLUX).

    python -m bench.gpu_train_step [--model sdxl|flux] [--size full|narrow|tiny] [--steps 10] [--rounds 3]
                                   [--only pack,reference] [--compile] [--json out.json]
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

from bench import splitflux_sides
from devkit import host as bench_host
from devkit import tiny_flux

SDXL_UNET_CONFIG = {
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_linear_in_transformer": True, "use_temporal_resblock": False, "use_temporal_attention": False,
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4,
}
NARROW_HEAD_CHANNELS = 16
SIZES = {
    "full": "SDXL UNet",
    "narrow": "SDXL's layers at 1/10 of its widths",
    "tiny": "tiny SDXL-architecture UNet",
}
FLUX_SIZES = {
    "full": ("FLUX.1-dev transformer", tiny_flux.FLUX1_DEV_CONFIG, 256),
    "narrow": ("FLUX.1's blocks at 1/16 of its widths", tiny_flux.NARROW_FLUX_CONFIG, 32),
    "tiny": ("tiny FLUX.1-architecture transformer", tiny_flux.TINY_FLUX_CONFIG, tiny_flux.TEXT_TOKENS),
}
"""``--model flux``'s sizes: what it is, its ``unet_config``, text tokens per prompt."""
RANK = 64
OFFICIAL_TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
SDXL_VAE_SCALE = 0.13025


@dataclass(frozen=True)
class Setup:
    """The device and the UNet's size: ``full`` (SDXL), ``narrow`` (SDXL's every layer and
    transformer block, channels 32/64/128: as many operations as SDXL for little arithmetic, so
    on a CPU it measures what each side pays per operation in Python and dispatch), ``tiny``."""

    device: torch.device
    size: str = "full"
    model: str = "sdxl"
    """``sdxl`` (B-LoRA) or ``flux`` (SplitFlux)."""

    @property
    def latent(self) -> int:
        return 128 if self.size == "full" else 8 if (self.model, self.size) == ("flux", "tiny") else 16

    @property
    def precision(self) -> str:
        if self.device.type != "cuda":
            return "fp32"
        return "bf16" if self.model == "flux" else "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    @property
    def describe(self) -> str:
        if self.model == "flux":
            return f"{FLUX_SIZES[self.size][0]}, SplitFlux (114 layers), {self.precision}, latent {self.latent}x{self.latent}"
        return f"{SIZES[self.size]}, {self.precision}, latent {self.latent}x{self.latent}, rank {RANK}"

    @property
    def context_dim(self) -> int:
        return 2048 if self.size == "full" else 64

    @property
    def unet_config(self) -> dict:
        if self.size == "narrow":
            return dict(SDXL_UNET_CONFIG, model_channels=32, context_dim=64, num_head_channels=NARROW_HEAD_CHANNELS)
        return dict(SDXL_UNET_CONFIG)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def build_unet(setup: Setup):
    """The host's SDXL model (ComfyUI's own classes) with fan-in scaled random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if setup.size == "tiny":
        from blora_pack.command_line.tiny import build_tiny_sdxl

        return build_tiny_sdxl(dtype=setup.dtype)
    config = comfy.supported_models.SDXL(setup.unet_config)
    config.unet_config.update(setup.unet_config)  # the class's extra config would reset num_head_channels
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


def timed(setup: Setup, run_steps, n: int) -> tuple[list[float], float | None]:
    """``run_steps(n)`` trains n steps and returns each step's seconds. Also returns the peak
    memory in GB beyond what was allocated before (the UNet, the LoRA, the inputs)."""
    cuda = setup.device.type == "cuda"
    setup.synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    times = run_steps(n)
    return times, (torch.cuda.max_memory_allocated() - baseline) / 2**30 if cuda else None


@dataclass(frozen=True)
class PackVariant:
    precision: str | None = None
    fused_adam: bool = True
    backward_through_down_path: bool = False
    attention: str = "sdpa"
    compiled: bool = False
    memory: str = "fastest"
    """The node's memory setting (training.memory): "8 GB" checkpoints the backward path."""


PACK_VARIANTS = {
    "pack": PackVariant(),
    "pack-bf16": PackVariant(precision="bf16"),
    "pack-unfused-adamw": PackVariant(fused_adam=False),
    "pack-down-path-backward": PackVariant(backward_through_down_path=True),
    "pack-basic-attention": PackVariant(attention="basic"),
    "pack-compiled": PackVariant(compiled=True),
    "pack-8gb": PackVariant(memory="8 GB"),
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


def pack_runner(setup: Setup, host, model, variant: PackVariant):
    """``run(n)``: n steps of the pack's own loop, as "Train B-LoRA" runs them, with ``variant``'s change."""
    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    trainer = host.pack("training.trainer")
    adapter_set = host.pack("training.lora_adapters")
    latents, positive = inputs(setup)
    adapters = adapter_set.LoraAdapterSet(host_training.target_shapes(model, sdxl.B_LORA.layers), RANK, None)
    adapters.reset(0)
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)
    precision = variant.precision or setup.precision
    if setup.device.type != "cuda" and precision == "fp16":
        precision = "fp32"

    def run(n):
        with contextlib.ExitStack() as stack:
            recomputed = host.pack("training.memory").recomputed_layers(variant.memory, sdxl.B_LORA, None)
            clone, device = stack.enter_context(host_training.training_model(model, adapters, adapters.weight_wrappers(),
                                                                             recomputed_layers=recomputed))
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

            return timed(setup, run_steps, n)

    return run


def diffusers_unet(setup: Setup, model):
    """diffusers' UNet holding the host model's weights (ComfyUI's own key map)."""
    if setup.size == "tiny":
        from devkit import tiny_models

        return tiny_models.diffusers_unet_from(model).to(setup.device, setup.dtype)
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = model.model.model_config.unet_config
    widths = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    with setup.device:
        unet = UNet2DConditionModel(
            sample_size=setup.latent, in_channels=4, out_channels=4, block_out_channels=tuple(widths),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            transformer_layers_per_block=[1, 2, 10], cross_attention_dim=unet_config["context_dim"],
            attention_head_dim=[w // unet_config["num_head_channels"] for w in widths],  # heads, as SDXL's config
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    comfy_weights = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    wanted = unet.state_dict().keys()
    unet.load_state_dict({d: comfy_weights[l] for d, l in mapping.items() if d in wanted and l in comfy_weights},
                         strict=True)
    return unet.to(setup.device, setup.dtype)


def sdxl_vae(setup: Setup):
    """An SDXL-architecture VAE (random weights), fp32 as the official script keeps it."""
    from diffusers import AutoencoderKL

    small = setup.size != "full"
    channels = (8, 8, 16, 16) if small else (128, 256, 512, 512)  # 8x down to the latent
    with setup.device:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
            layers_per_block=2, norm_num_groups=8 if small else 32, sample_size=8 * setup.latent,
            scaling_factor=SDXL_VAE_SCALE,
        )
    return vae.to(setup.device, torch.float32).requires_grad_(False)


class ReferenceRecipe:
    """The official script's step (blora.md section 1.4) in diffusers + peft, on the host
    model's weights; both reference sides share its UNet and LoRA."""

    def __init__(self, setup: Setup, host, model):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        sdxl = host.pack("methods.sdxl")
        host_training = host.pack("host.training")
        sdxl_unet = host.pack("core.sdxl_unet")
        self.setup = setup
        self.unet = diffusers_unet(setup, model).requires_grad_(False)
        self.unet.enable_gradient_checkpointing()
        targets = [sdxl_unet.ldm_to_diffusers(path) for path in host_training.target_shapes(model, sdxl.B_LORA.layers)]
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for param in self.params:
            param.data = param.data.float()  # LoRA parameters in fp32, as the official script casts them
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000)
        latents, positive = inputs(setup)
        self.x0 = (latents["samples"] * SDXL_VAE_SCALE).to(setup.device, setup.dtype)
        self.context = positive[0][0].to(setup.device, setup.dtype)
        self.pooled = positive[0][1]["pooled_output"].to(setup.device, setup.dtype)
        self.time_ids = torch.tensor([OFFICIAL_TIME_IDS], device=setup.device, dtype=setup.dtype)
        pixels = torch.rand(1, 3, 8 * setup.latent, 8 * setup.latent, generator=torch.Generator().manual_seed(0))
        self.pixels = (pixels * 2 - 1).to(setup.device)
        self.vae = None
        self.unet.train()

    def encoder(self):
        """The fp32 VAE, built on first use."""
        if self.vae is None:
            self.vae = sdxl_vae(self.setup)
            with torch.no_grad():
                encoded = self.vae.encode(self.pixels).latent_dist.mean
            if encoded.shape != self.x0.shape:
                raise RuntimeError(f"the VAE encodes to {tuple(encoded.shape)}, the latents are {tuple(self.x0.shape)}")
        return self.vae

    def runner(self, vae_every_step: bool):
        """``run(n)``: n official steps with a fresh AdamW and scaler, as a new training run."""
        setup = self.setup
        cuda = setup.device.type == "cuda"

        def run_steps(n):
            vae = self.encoder() if vae_every_step else None
            optimizer = torch.optim.AdamW(self.params, lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
            scaler = torch.amp.GradScaler(setup.device.type, enabled=cuda)
            times = []
            for _ in range(n):
                began = time.perf_counter()
                model_input = self.x0
                if vae is not None:
                    model_input = (vae.encode(self.pixels).latent_dist.sample() * vae.config.scaling_factor).to(setup.dtype)
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, 1000, (1,), device=setup.device)
                noisy = self.scheduler.add_noise(model_input, noise, timesteps)
                with torch.autocast(setup.device.type, dtype=torch.float16, enabled=cuda):
                    prediction = self.unet(noisy, timesteps, encoder_hidden_states=self.context,
                                           added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids}).sample
                loss = F.mse_loss(prediction.float(), noise.float())
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss.item()  # the per-step loss read-back the pack's loop has too
                times.append(time.perf_counter() - began)
            return times

        return lambda n: timed(setup, run_steps, n)


REFERENCE_VARIANTS = {"reference": False, "reference-vae-every-step": True}


def sdxl_runners(setup: Setup, host, names: list[str]):
    """``({side: run(n)}, notes)``: ``notes()`` gives lines to print after the rounds."""
    model = build_unet(setup)
    reference = None
    runners = {}
    for name in names:
        if name in REFERENCE_VARIANTS:
            reference = reference or ReferenceRecipe(setup, host, model)
            runners[name] = reference.runner(REFERENCE_VARIANTS[name])
        else:
            runners[name] = pack_runner(setup, host, model, PACK_VARIANTS[name])
    return runners, lambda: []


def flux_runners(setup: Setup, host, names: list[str]):
    """SplitFlux's sides on a FLUX.1 transformer of ComfyUI's built on the device, as ``sdxl_runners``."""
    _, config, tokens = FLUX_SIZES[setup.size]
    model = tiny_flux.build_flux(config, dtype=setup.dtype, device=setup.device)
    latent = torch.randn(1, tiny_flux.LATENT_CHANNELS, setup.latent, setup.latent, generator=torch.Generator().manual_seed(0))
    bench = splitflux_sides.SplitFluxBench(host, model, latent, tokens, setup.precision,
                                           measure=lambda run_steps, n: timed(setup, run_steps, n))
    runners = {name: bench.runner(name) for name in names}

    def notes() -> list[str]:
        if "reference" not in names or len(names) < 2:
            return []
        return [f"the same computation: the sides' losses at each step differ by at most "
                f"{bench.loss_difference():.1e} (relative)"]

    return runners, notes


def side_names(model: str, compiled: bool) -> tuple[list[str], list[str]]:
    """Every side of ``model``'s benchmark, and those run by default."""
    if model == "flux":
        return list(splitflux_sides.SIDES), list(splitflux_sides.SIDES)
    every = [*REFERENCE_VARIANTS, *PACK_VARIANTS]
    return every, [n for n in every if n != "pack-compiled" or compiled]


def run_all(setup: Setup, names: list[str], steps: int, warmup: int, rounds: int) -> dict[str, dict]:
    """Every side in turn, ``rounds`` times over, so that each sees the machine in the same
    states; per side the median step after each round's ``warmup``, the first step of the first
    round (torch.compile's time shows there) and the highest peak memory."""
    host = bench_host.start_found_host(cpu=setup.device.type != "cuda")
    runners, notes = (flux_runners if setup.model == "flux" else sdxl_runners)(setup, host, names)
    samples = {name: [] for name in names}
    first_step, peak = {}, {}
    for round_number in range(rounds):
        for name, run in runners.items():
            times, peak_gb = run(steps + warmup)
            first_step.setdefault(name, times[0])
            samples[name] += times[warmup:]
            peak[name] = None if peak_gb is None else max(peak_gb, peak.get(name) or 0.0)
        print(f"  round {round_number + 1}/{rounds} done", flush=True)
    for line in notes():
        print(line)
    results = {}
    for name, values in samples.items():
        median = statistics.median(values)
        results[name] = {"ms": 1000 * median, "peak_gb": peak[name], "first_step_s": first_step[name]}
    return results


def describe_machine(setup: Setup) -> str:
    if setup.device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def table(results: dict[str, dict]) -> list[str]:
    """Markdown rows for BENCHMARKS.md: speed-up is against ``reference`` when it ran."""
    reference = results.get("reference", {}).get("ms")
    rows = ["| side | ms/step (= s per 1000 steps) | first step (s) | peak beyond the model (GB) | speed-up vs reference |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        speed_up = "-" if reference is None else f"{reference / r['ms']:.2f}x"
        rows.append(f"| {name} | {r['ms']:.1f} | {r['first_step_s']:.1f} | {peak} | {speed_up} |")
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="times over every side, in turn")
    parser.add_argument("--only", help="comma-separated sides to run (default: all but pack-compiled)")
    parser.add_argument("--compile", action="store_true", help="also run pack-compiled (slow to start)")
    parser.add_argument("--size", choices=SIZES, default="full",
                        help="narrow or tiny also run on the CPU: narrow to compare per-operation overhead, tiny to smoke-test")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--model", choices=("sdxl", "flux"), default="sdxl",
                        help="sdxl: B-LoRA on SDXL's UNet; flux: SplitFlux on FLUX.1-dev's transformer")
    args = parser.parse_args(argv)
    all_names, default_names = side_names(args.model, args.compile)
    names = args.only.split(",") if args.only else default_names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; choose from {all_names}")
    if not torch.cuda.is_available() and args.size == "full":
        sys.exit("needs a CUDA GPU (or --size narrow / tiny on the CPU)")
    setup = Setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.size, args.model)
    print(f"{describe_machine(setup)}; {setup.describe}, median of {args.rounds} x {args.steps} steps, "
          f"each round after {args.warmup}")
    results = run_all(setup, names, args.steps, args.warmup, args.rounds)
    print("\n".join(table(results)))
    if "pack" in results and "reference" in results and args.model == "sdxl":
        print("goal: >= 2.5x the reference, 1000 steps < 60 s on an H100, < 12 GB beyond the UNet")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe_machine(setup), "model": args.model, "size": args.size,
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
