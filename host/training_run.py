"""What every training node shares: resume, checkpoints on schedule / Cancel / error, progress,
the training clone, and the run itself. Each node brings its trainable module and method."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management

from ..training import checkpoint
from ..training.trainer import TrainConfig, TrainingHooks, TrainingMethod, TrainingState, train
from . import progress
from . import training as host_training

PACK_VERSION = "0.1.0"


@dataclass
class TrainingRun:
    model: object
    samples: torch.Tensor
    conditionings: list
    trainable: torch.nn.Module
    config: TrainConfig
    final_path: Path
    fingerprint: dict[str, str]
    checkpoint_files: dict[Path, Callable[[], tuple[dict, dict]]]
    """The LoRA files a checkpoint writes for users: path -> what builds its ``(state_dict, metadata)``."""
    method: TrainingMethod | None = None
    preview_every: int = 0
    """Every N steps, a quick sample from the LoRA being trained is shown on the node (0: never)."""
    weight_wrappers: dict = field(default_factory=dict)
    module_wrappers: dict = field(default_factory=dict)

    @property
    def sidecar(self) -> Path:
        return checkpoint.trainstate_path(self.final_path)

    def run(self, node_id: str | None, resume: bool, label: str) -> TrainingState:
        resume_state = None
        if resume:
            trainable_state, resume_state = checkpoint.load_checkpoint(self.sidecar, self.fingerprint)
            self.trainable.load_state_dict(trainable_state)
            if resume_state.step >= self.config.steps:
                raise ValueError(f"The checkpoint is already at step {resume_state.step}; raise steps above it "
                                 "to continue training.")

        def save_checkpoint(state: TrainingState) -> None:
            lora_files = {path: build() for path, build in self.checkpoint_files.items()}
            checkpoint.save_checkpoint(self.trainable, state, self.sidecar, self.fingerprint, lora_files)
            logging.info("Training: checkpoint at step %d saved beside %s", state.step, self.final_path)

        reporter = progress.TrainingProgress(label, self.config.steps, node_id, start=resume_state.step if resume_state else 0)
        with host_training.training_model(self.model, self.trainable, self.weight_wrappers,
                                          self.module_wrappers) as (clone, device):
            predict = host_training.unet_predict(clone, self.conditionings, device)
            schedule = host_training.noise_schedule(clone).to(device)

            def on_step(step, total, loss, seconds):
                preview = None
                if self.preview_every and (step % self.preview_every == 0 or step == total):
                    preview = host_training.preview_image(clone, predict, self.samples[:1].shape, schedule,
                                                          self.config, device)
                reporter.on_step(step, total, loss, seconds, preview)

            hooks = TrainingHooks(on_step=on_step,
                                  check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                  save_checkpoint=save_checkpoint)
            return train(self.trainable, predict, self.samples.to(device), schedule, self.config, hooks,
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
