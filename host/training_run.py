"""What both training nodes share, so that a node states only what differs:

- ``prepare``: the path guard, the SDXL check, latents and conditionings, the target shapes, the
  training config, the base-weight hash and the files' metadata;
- ``TrainingRun``: resume, checkpoints on schedule / Cancel / error, the memory setting,
  progress, the training clone, and the run itself (each node brings its trainable module and
  method);
- ``finish``: the atomic saves, checkpoint removal and the node's output.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ..core import files, loss_plot, sdxl_unet
from ..training import checkpoint
from ..training import memory as memory_settings
from ..training.recipes import Recipe
from ..training.trainer import TrainConfig, TrainingHooks, TrainingMethod, TrainingState, train
from . import model as host_model
from . import progress
from . import training as host_training

PACK_VERSION = "0.1.0"


@dataclass
class Prepared:
    """A training node's inputs checked and turned into what the trainer needs."""

    loras_root: Path
    final_path: Path
    samples: torch.Tensor
    conditionings: list
    shapes: dict[str, tuple[int, int]]
    config: TrainConfig
    base_sha256: str

    def metadata(self, method: str, recipe: str, rank: int, alpha: float, prompt: str) -> dict[str, str]:
        blocks = sorted({sdxl_unet.block_of(path) for path in self.shapes})
        return file_metadata(method, recipe, blocks, rank, alpha, self.config.steps, self.config.learning_rate,
                             self.config.seed, self.config.precision, prompt, self.base_sha256)

    def beside(self, suffix: str) -> Path:
        """``<lora_name><suffix>.safetensors`` beside the final file."""
        return self.final_path.with_name(f"{self.final_path.stem}{suffix}.safetensors")

    def relative(self, path: Path) -> str:
        return path.relative_to(self.loras_root).as_posix()


def memory_input() -> io.Combo.Input:
    """The trainers' optional ``memory`` input (appended last on both nodes)."""
    return io.Combo.Input("memory", options=list(memory_settings.SETTINGS), default=memory_settings.AUTO, optional=True,
                          tooltip="auto: the fastest setting that fits the free VRAM at start (the status text says "
                                  "which), moving on to 8 GB if the GPU runs out of memory anyway. fastest: everything "
                                  "kept for backward. 8 GB: gradient checkpointing of the layers backward runs through "
                                  "(recomputed, about one more partial forward per step), for 1024 px on an 8 GB card.")


def prepare(model, latents, positive, node_name: str, lora_name: str, recipe: Recipe, steps: int,
            learning_rate: float, seed: int, precision: str, checkpoint_every: int) -> Prepared:
    """Everything is checked before any work: a bad name, model, latent or prompt fails at once."""
    loras_root = Path(folder_paths.get_folder_paths(host_model.LORAS_FOLDER)[0])
    final_path = files.path_inside(loras_root, lora_name)
    host_model.require_sdxl(model, node_name)
    samples = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, samples.shape[0])
    shapes = host_training.target_shapes(model, recipe)
    config = TrainConfig(steps=steps, learning_rate=learning_rate, seed=seed,
                         precision=precision_for(comfy.model_management.get_torch_device(), precision),
                         checkpoint_every=checkpoint_every, prediction=host_training.prediction_type(model),
                         weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
                         batch_size=min(recipe.batch_size, samples.shape[0]))
    return Prepared(loras_root, final_path, samples, conditionings, shapes, config,
                    host_training.base_weights_sha256(model, shapes))


def finish(run: "TrainingRun", state: TrainingState, outputs: dict[Path, tuple[dict, dict]], patched,
           named: list[Path]) -> io.NodeOutput:
    """Save every ``path: (state_dict, metadata)`` atomically (the pack's files also record when
    and the per-step losses, so a library index can be rebuilt from the files), remove the
    checkpoint, and return
    ``(patched model, *names of the files in named, loss curve, losses)`` with a status line."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    for path, (state_dict, metadata) in outputs.items():
        stamp = ({"blora.created": created, "blora.losses": json.dumps([round(v, 6) for v in state.losses])}
                 if "blora.method" in metadata else {})  # an official-format export has none
        files.save_safetensors_atomic(state_dict, path, {**metadata, **stamp})
    run.remove_checkpoint()
    names = [run.prepared.relative(path) for path in named]
    text = f"saved {' and '.join(names)} ({state.step} steps, last loss {state.losses[-1]:.4f})"
    return io.NodeOutput(patched, *names, loss_plot.loss_curve_image(state.losses), {"loss": state.losses},
                         ui=ui.PreviewText(text))


@dataclass
class TrainingRun:
    model: object
    prepared: Prepared
    trainable: torch.nn.Module
    fingerprint: dict[str, str]
    """What a resume must match (the base-weight hash and the config's numbers are added)."""
    checkpoint_files: dict[Path, Callable[[], tuple[dict, dict]]]
    """The LoRA files a checkpoint writes for users: path -> what builds its ``(state_dict, metadata)``."""
    method: TrainingMethod | None = None
    preview_every: int = 0
    """Every N steps, a quick sample from the LoRA being trained is shown on the node (0: never)."""
    weight_wrappers: dict = field(default_factory=dict)
    module_wrappers: dict = field(default_factory=dict)
    trainer: str = "b-lora"
    """Which memory table applies (``training.memory.PEAK_GIB``): "b-lora" or "unziplora"."""
    memory: str = memory_settings.AUTO

    @property
    def sidecar(self) -> Path:
        return checkpoint.trainstate_path(self.prepared.final_path)

    @property
    def config(self) -> TrainConfig:
        return self.prepared.config

    def full_fingerprint(self) -> dict[str, str]:
        config = self.config
        return {**self.fingerprint, "base_model_sha256": self.prepared.base_sha256,
                "images": str(self.prepared.samples.shape[0]), "batch_size": str(config.batch_size),
                "weight_decay": str(config.weight_decay), "max_grad_norm": str(config.max_grad_norm)}

    def run(self, node_id: str | None, resume: bool, label: str) -> TrainingState:
        resume_state = self._load_checkpoint() if resume else None
        if resume_state is not None and resume_state.step >= self.config.steps:
            raise ValueError(f"The checkpoint is already at step {resume_state.step}; raise steps above it "
                             "to continue training.")
        setting, why = memory_settings.resolve(self.memory, self.trainer, host_training.free_vram_gib(),
                                               self.prepared.samples.shape[-1] * self.prepared.samples.shape[-2] * 64)
        logging.info("%s: %s", label, why)
        can_fall_back = memory_settings.smaller_after_oom(self.memory, setting) is not None
        initial = ({name: value.detach().clone() for name, value in self.trainable.state_dict().items()}
                   if can_fall_back and resume_state is None else None)  # where a fallback would start again
        saved_steps, note = [], f"memory {setting}"
        while True:
            try:
                return self._train(setting, resume_state, node_id, label, saved_steps.append, note)
            except torch.OutOfMemoryError as error:
                smaller = memory_settings.smaller_after_oom(self.memory, setting)
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
                resume_state = self._load_checkpoint()
            else:
                self.trainable.load_state_dict(initial)
            setting, note = smaller, f"memory {smaller} (after running out with {setting})"

    def _load_checkpoint(self) -> TrainingState:
        trainable_state, resume_state = checkpoint.load_checkpoint(self.sidecar, self.full_fingerprint())
        self.trainable.load_state_dict(trainable_state)
        return resume_state

    def _train(self, setting: str, resume_state: TrainingState | None, node_id: str | None, label: str,
               on_saved: Callable[[int], None], note: str) -> TrainingState:
        def save_checkpoint(state: TrainingState) -> None:
            lora_files = {path: build() for path, build in self.checkpoint_files.items()}
            checkpoint.save_checkpoint(self.trainable, state, self.sidecar, self.full_fingerprint(), lora_files)
            logging.info("Training: checkpoint at step %d saved beside %s", state.step, self.prepared.final_path)
            on_saved(state.step)

        reporter = progress.TrainingProgress(label, self.config.steps, node_id, start=resume_state.step if resume_state else 0,
                                             note=note)
        with host_training.training_model(self.model, self.trainable, self.weight_wrappers, self.module_wrappers,
                                          memory_settings.CHECKPOINTED[setting]) as (clone, device):
            predict = host_training.unet_predict(clone, self.prepared.conditionings, device)
            schedule = host_training.noise_schedule(clone).to(device)

            def on_step(step, total, loss, seconds):
                preview = None
                if self.preview_every and (step % self.preview_every == 0 or step == total):
                    preview = host_training.preview_image(clone, predict, self.prepared.samples[:1].shape, schedule,
                                                          self.config, device)
                reporter.on_step(step, total, loss, seconds, preview)

            hooks = TrainingHooks(on_step=on_step,
                                  check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                  save_checkpoint=save_checkpoint)
            return train(self.trainable, predict, self.prepared.samples.to(device), schedule, self.config, hooks,
                         resume_state, self.method)

    def remove_checkpoint(self) -> None:
        checkpoint.remove_checkpoint(self.sidecar, self.checkpoint_files)


def file_metadata(method: str, recipe: str, blocks: list[str], rank: int, alpha: float, steps: int,
                  learning_rate: float, seed: int, precision: str, prompt: str, base_sha256: str) -> dict[str, str]:
    """What a trained file says about itself (safetensors metadata: strings only)."""
    return {
        "blora.method": method,
        "blora.recipe": recipe,
        "blora.blocks": json.dumps(blocks),
        "blora.rank": str(rank),
        "blora.alpha": f"{alpha:g}",
        "blora.steps": str(steps),
        "blora.learning_rate": str(learning_rate),
        "blora.seed": str(seed),
        "blora.precision": precision,
        "blora.prompt": prompt,
        "blora.base_model_sha256": base_sha256,
        "blora.pack_version": PACK_VERSION,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": "sdxl_base_v1-0",
    }


def precision_for(device, precision: str) -> str:
    if device.type == "cpu" and precision == "fp16":
        logging.warning("Training: fp16 autocast needs a GPU; training in fp32 on the CPU.")
        return "fp32"
    return precision
