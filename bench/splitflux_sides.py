"""The sides of a SplitFlux train step that the benchmarks time (``bench/cpu_splitflux_step.py``
on a narrow FLUX, ``bench/gpu_train_step.py --model flux``), on one ComfyUI FLUX model:

- ``pack``: the job Train SplitFlux trains (``nodes.splitflux_train.training_job``: the node's
  inputs, settings, configuration and layers), on the host's training clone with the memory
  setting, through the pack's trainer, as ``host.training_run`` runs it (without the progress
  bar and the checkpoints); ``pack-8gb`` with the node's ``memory`` = ``8 GB``;
- ``reference``: the paper's equations (``devkit/splitflux_reference.py``: peft LoRA layers with
  the VGRA-gated, RCA-scaled and style adapters on q/k/v, prompt replacement, flow-matching loss
  plus the complementary loss) on diffusers' ``FluxTransformer2DModel`` holding the same weights
  (ComfyUI's ``flux_to_diffusers`` map), starting from the same LoRA factors, with the same
  draws, AdamW and clipping at 1.0.

Each ``run(n)`` trains n steps with a fresh optimizer, as a new run, and returns
``measure(run_steps, n)`` (by default each step's seconds); ``losses[side]`` keeps each step's
loss, so that a run shows both sides computed the same (``loss_difference``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import torch

from devkit import splitflux_reference, tiny_flux

SEED = 0
PACK_SIDES = {"pack": "fastest", "pack-8gb": "8 GB"}
"""The pack's sides and the node's ``memory`` setting each runs with."""
SIDES = (*PACK_SIDES, "reference")


def just_run(run_steps, n: int):
    return run_steps(n)


class SplitFluxBench:
    """One model, image and prompts; ``runner(side)`` gives each side's ``run(n)``."""

    def __init__(self, host, model, latent: torch.Tensor, tokens: int, precision: str, measure=just_run):
        self.host, self.model, self.precision, self.measure = host, model, precision, measure
        self.latents = {"samples": latent}
        # the paper's prompts (seeded embeddings of the model's widths), of equal token counts as
        # prompt replacement needs
        self.prompts = host.pack("methods.flux").SPLITFLUX.recipe.settings
        self.content, self.style = (
            tiny_flux.tiny_flux_conditioning(self.prompts[key], tokens=tokens, config=model.model.model_config.unet_config)
            for key in ("content_prompt", "style_prompt"))
        self.folder = tempfile.TemporaryDirectory(prefix="splitflux-bench-")  # the job's files; none is written
        self.losses: dict[str, list[float]] = {}

    def job(self, steps: int):
        """The node's inputs and job for ``steps`` steps (its layers initialised from ``SEED``)."""
        node = self.host.pack("nodes.splitflux_train")
        job_module = self.host.pack("training.job")
        splitflux = self.host.pack("training.splitflux")
        files = job_module.OutputFiles.inside(self.folder.name, "bench.safetensors", splitflux.ROLES)
        return node.training_job(self.model, self.latents, self.content, self.style, steps, 0.0, SEED, self.precision,
                                 0, None, node.DEFAULTS, self.prompts["content_prompt"], files)

    def runner(self, side: str):
        losses = self.losses.setdefault(side, [])
        return self.reference_runner(losses) if side == "reference" else self.pack_runner(PACK_SIDES[side], losses)

    def loss_difference(self) -> float:
        """The largest relative difference between a pack side's loss and the reference's at the
        same step (every side runs the same steps from the same start)."""
        reference = self.losses["reference"]
        return max(abs(a - b) / abs(b) for side, losses in self.losses.items() if side != "reference"
                   for a, b in zip(losses, reference))

    def pack_runner(self, memory: str, losses: list[float]):
        host_training = self.host.pack("host.training")
        memory_settings = self.host.pack("training.memory")
        trainer = self.host.pack("training.trainer")
        inputs, job = self.job(1)

        def run(n: int):
            config = dataclasses.replace(job.config, steps=n)
            with inputs.training_context(), host_training.training_model(
                    inputs.model, job.trainable, job.weight_wrappers, job.module_wrappers,
                    memory_settings.recomputed_layers(memory, job.method, host_training.free_vram_gib())) as (clone, device):
                predict = inputs.predictor(clone, device)
                schedule = inputs.schedule(clone).to(device)

                def run_steps(n):
                    times = []

                    def on_step(step, total, loss, seconds):
                        times.append(seconds)
                        losses.append(loss)

                    trainer.train(job.trainable, predict, inputs.samples.to(device), schedule, config,
                                  trainer.TrainingHooks(on_step=on_step), None, job.training_method)
                    return times

                return self.measure(run_steps, n)

        return run

    def reference_runner(self, losses: list[float]):
        diffusion = self.host.pack("training.diffusion")
        trainer = self.host.pack("training.trainer")
        _, job = self.job(1)
        config = job.config
        weights = self.model.model.diffusion_model
        device, dtype = next(weights.parameters()).device, next(weights.parameters()).dtype
        twin = tiny_flux.diffusers_flux_from(self.model, dtype).to(device)
        reference = splitflux_reference.Reference(twin, splitflux_reference.factors_of(job.trainable),
                                                  self.content[0][0].shape[1])
        params = reference.parameters()
        latent = self.latents["samples"].to(device)

        def prompt(conditioning):
            context, extras = conditioning[0]
            return (context.to(device, dtype), extras["pooled_output"].to(device, dtype),
                    torch.tensor([extras["guidance"]], device=device, dtype=dtype))

        content, style = prompt(self.content), prompt(self.style)
        autocast = trainer.AUTOCAST_DTYPES[config.precision]

        def run_steps(n: int) -> list[float]:
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=config.weight_decay)
            times = []
            for step in range(n):
                began = time.perf_counter()
                draw = diffusion.draw_step(config.seed, step, 1, latent.shape)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = reference.loss(latent, draw.noise.to(device), draw.timestep, content, style)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())  # the per-step loss read-back the pack's loop has too
                times.append(time.perf_counter() - began)
            return times

        return lambda n: self.measure(run_steps, n)
