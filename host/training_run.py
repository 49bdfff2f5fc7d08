"""The host runs a training job (``training.job``): the same way for every method.

- ``TrainingInputs``: the node's model, latents and prompts checked and turned into tensors,
  with what a configuration records of them (hashes of the images, prompts and base weights);
- ``run``: proves every file can be written, resumes, trains on the host's training clone with
  the memory setting (moving to a smaller one if ``auto`` runs out), checkpoints on schedule,
  Cancel and error, shows progress, then writes the files atomically and removes the checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management
import folder_paths

from ..core import files
from ..methods import Method
from ..training import checkpoint
from ..training import memory as memory_settings
from ..training.job import OutputFiles, TrainingJob
from ..training.trainer import TrainConfig, TrainingHooks, TrainingState, train
from . import model as host_model
from . import progress
from . import training as host_training


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        plain = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(plain.shape)).encode())
        digest.update(plain.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TrainingInputs:
    """What a training node was given, checked before any work: a bad model, latent or prompt
    fails at once, naming what was found."""

    model: object
    samples: torch.Tensor
    conditionings: list

    @classmethod
    def of(cls, model, latents, positive, node_name: str) -> "TrainingInputs":
        host_model.require_sdxl(model, node_name)
        samples = host_training.training_latents(model, latents)
        return cls(model, samples, host_training.conditioning_per_image(model, positive, samples.shape[0]))

    def config(self, method: Method, steps: int, learning_rate: float, rank: int, alpha: float, seed: int,
               precision: str, checkpoint_every: int, shapes: dict, extra_streams=(), **method_settings) -> TrainConfig:
        """The resolved configuration of a run of ``method`` on these inputs (``extra_streams``:
        further prompt embeddings the method feeds, hashed with the prompts)."""
        recipe = method.recipe
        streams = [t for c in self.conditionings for t in (c.context, c.y)] + list(extra_streams)
        return TrainConfig(
            steps=steps, learning_rate=learning_rate, seed=seed,
            precision=precision_for(comfy.model_management.get_torch_device(), precision),
            checkpoint_every=checkpoint_every, prediction=self.prediction(),
            weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
            batch_size=min(recipe.batch_size, self.samples.shape[0]), method=method.key, recipe=recipe.name,
            rank=rank, alpha=alpha, images=self.samples.shape[0], images_sha256=tensor_sha256(self.samples),
            conditioning_sha256=tensor_sha256(*streams),
            base_model_sha256=host_training.base_weights_sha256(self.model, shapes),
            method_settings=json.loads(json.dumps(method_settings)))

    def shapes(self, method: Method) -> dict[str, tuple[int, int]]:
        return host_training.target_shapes(self.model, method.layers)

    # How the model is run in training; a model family with other inputs overrides these
    # (``host.flux_training.FluxTrainingInputs``).
    def prediction(self) -> str:
        return host_training.prediction_type(self.model)

    def predictor(self, clone, device: torch.device):
        """``predict(noisy, timesteps, index)`` on the training clone."""
        return host_training.unet_predict(clone, self.conditionings, device)

    def schedule(self, clone) -> torch.Tensor:
        return host_training.noise_schedule(clone)

    def training_context(self):
        """Host state the model needs while it trains (entered around the whole run)."""
        return contextlib.nullcontext()


def output_files(lora_name: str, roles: tuple[str, ...] = ("",), overwrite: bool = True) -> OutputFiles:
    return OutputFiles.inside(folder_paths.get_folder_paths(host_model.LORAS_FOLDER)[0], lora_name, roles, overwrite)


@dataclass
class TrainingResult:
    state: TrainingState
    written: list[Path]
    """The LoRA files written (relative names via ``job.files.relative``)."""
    status: str


def run(job: TrainingJob, inputs: TrainingInputs, node_id: str | None, resume: bool, memory: str, label: str,
        preview_every: int = 0) -> TrainingResult:
    """Train ``job`` on the user's model and write its files; the model is never changed."""
    files.check_can_write_files(job.file_sizes())
    resume_state = None
    if resume:
        resume_state = _load_checkpoint(job)
    free_gib, pixels = host_training.free_vram_gib(), inputs.samples.shape[-1] * inputs.samples.shape[-2] * 64
    setting, why = memory_settings.resolve(memory, job.method.memory_peak_gib, free_gib, pixels)
    recompute = functools.partial(memory_settings.recomputed_layers, method=job.method, free_gib=free_gib,
                                  pixels=pixels)
    if setting == memory_settings.FASTEST and (recomputed := recompute(setting)):
        why += f"; the first {recomputed} blocks backward runs through are recomputed to fit"
    logging.info("%s: %s", label, why)
    if resume_state is not None and resume_state.step == job.config.steps:
        state = resume_state  # Cancel landed after the last step: its checkpoint holds the whole run
    else:
        state = _train_with_fallback(job, inputs, setting, why, memory, resume_state, node_id, label, preview_every,
                                     recompute)
    if job.training_method is not None:
        job.training_method.finish()
    return _write(job, state)


def _load_checkpoint(job: TrainingJob) -> TrainingState:
    config = checkpoint.resumable_config(checkpoint.recorded_config(job.files.trainstate), job.config,
                                         job.method.recipe.resume_may_raise_steps, job.files.trainstate)
    trained, state, _ = checkpoint.load_checkpoint(job.files.trainstate, job.trainable, job.optimized_parameters())
    if state.step > config.steps:
        raise checkpoint.CheckpointError(
            f"The checkpoint {job.files.trainstate.name} is at step {state.step} but steps is {config.steps}: set "
            f"steps to {state.step} or more to finish that run, or turn 'resume' off to start over.")
    if config.seed != job.config.seed:
        logging.info("Training: resuming with the checkpoint's seed %d (the seed input says %d)", config.seed,
                     job.config.seed)
        job.config = config
    job.trainable.load_state_dict(trained)
    return state


def _train_with_fallback(job, inputs, setting, why, memory, resume_state, node_id, label, preview_every, recompute):
    """Train with ``setting``; under ``auto``, go on with the next smaller setting if the GPU runs
    out of memory, from the failed attempt's checkpoint, else from the start."""
    can_fall_back = memory_settings.smaller_after_oom(memory, setting) is not None
    initial = ({name: value.detach().clone() for name, value in job.trainable.state_dict().items()}
               if can_fall_back and resume_state is None else None)  # where a fallback would start again
    saved_steps, note = [], f"memory {setting}"
    while True:
        try:
            return _train(job, inputs, setting, resume_state, node_id, label, saved_steps.append, note, preview_every,
                          recompute(setting))
        except torch.OutOfMemoryError as error:
            smaller = memory_settings.smaller_after_oom(memory, setting)
            if smaller is None:
                raise torch.OutOfMemoryError(f"{label}: the GPU ran out of memory with memory '{setting}' ({why}). "
                                             f"{memory_settings.out_of_memory_advice(setting)} ({error})") from error
        # Out of the handler, the failed attempt's frames and the GPU memory they held are gone;
        # other models make room too, as the host's own out-of-memory handling does.
        gc.collect()
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        logging.warning("%s: out of GPU memory with memory '%s'; going on with '%s'%s", label, setting, smaller,
                        f" from the checkpoint at step {saved_steps[-1]}" if saved_steps else "")
        if saved_steps or resume_state is not None:
            resume_state = _load_checkpoint(job)
        else:
            job.trainable.load_state_dict(initial)
        setting, note = smaller, f"memory {smaller} (after running out with {setting})"


def _train(job: TrainingJob, inputs: TrainingInputs, setting: str, resume_state: TrainingState | None,
           node_id: str | None, label: str, on_saved: Callable[[int], None], note: str,
           preview_every: int, recomputed_layers: int | None) -> TrainingState:
    config = job.config

    saved = [resume_state.step] if resume_state else []

    def save_checkpoint(state: TrainingState) -> None:
        checkpoint.save_checkpoint(job.trainable, state, job.files.trainstate, job.config, job.checkpoint_loras())
        logging.info("Training: checkpoint at step %d saved as %s", state.step, job.files.trainstate)
        saved.append(state.step)
        on_saved(state.step)

    reporter = progress.TrainingProgress(label, config.steps, node_id, start=resume_state.step if resume_state else 0,
                                         note=note)
    with inputs.training_context(), host_training.training_model(
            inputs.model, job.trainable, job.weight_wrappers, job.module_wrappers,
            recomputed_layers) as (clone, device):
        predict = inputs.predictor(clone, device)
        schedule = inputs.schedule(clone).to(device)

        def on_step(step, total, loss, seconds):
            preview = None
            if preview_every and (step % preview_every == 0 or step == total):
                preview = host_training.preview_image(clone, predict, inputs.samples[:1].shape, schedule, config,
                                                      device)
            reporter.on_step(step, total, loss, seconds, preview)

        hooks = TrainingHooks(on_step=on_step,
                              check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                              save_checkpoint=save_checkpoint)
        try:
            return train(job.trainable, predict, inputs.samples.to(device), schedule, config, hooks, resume_state,
                         job.training_method)
        except comfy.model_management.InterruptProcessingException:
            reporter.say(cancelled_status(job, saved[-1] if saved else None))
            raise


def cancelled_status(job: TrainingJob, step: int | None) -> str:
    """What the node says after Cancel: what was kept and how to go on."""
    if step is None:
        return "Cancelled before the first step finished: nothing was saved."
    return (f"Cancelled: the checkpoint at step {step} of {job.config.steps} is saved "
            f"({job.files.relative(job.files.trainstate)}). To continue, turn 'resume' on and run again with the "
            "same settings (the seed is taken from the checkpoint); to start over, leave 'resume' off.")


def _write(job: TrainingJob, state: TrainingState) -> TrainingResult:
    """Save every final file atomically (the pack's files also record when and the per-step
    losses, so a library index can be rebuilt from the files), then remove the checkpoint."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    replaced = job.files.replaced()
    for path, (state_dict, metadata) in job.final_files().items():
        stamp = ({"blora.created": created, "blora.losses": json.dumps([round(v, 6) for v in state.losses])}
                 if "blora.method" in metadata else {})  # an official-format export has none
        files.save_safetensors_atomic(state_dict, path, {**metadata, **stamp})
    checkpoint.remove_checkpoint([job.files.trainstate, *job.files.checkpoint_files()])
    names = [job.files.relative(path) for path in job.files.lora_files()]
    status = f"saved {' and '.join(names)} ({state.step} steps, last loss {state.losses[-1]:.4f})"
    if replaced:
        status += f"; replaced the earlier {' and '.join(job.files.relative(p) for p in replaced)}"
    elif job.files.final_name != job.files.name:
        kept = [job.files.relative(path) for path in replace(job.files, final_name=job.files.name).replaced()]
        status += (f" ({' and '.join(kept)} {'exists' if len(kept) == 1 else 'exist'}: turn 'overwrite' on to replace "
                   f"{'it' if len(kept) == 1 else 'them'})")
    return TrainingResult(state, job.files.lora_files(), status)


def precision_for(device, precision: str) -> str:
    if device.type == "cpu" and precision == "fp16":
        logging.warning("Training: fp16 autocast needs a GPU; training in fp32 on the CPU.")
        return "fp32"
    return precision
