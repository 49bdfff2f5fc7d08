"""What every training node shares: resume, checkpoints on schedule / Cancel / error, progress,
the training clone, and the run itself. Each node brings its trainable module and method."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management

from ..training import checkpoint
from ..training.trainer import TrainConfig, TrainingHooks, TrainingMethod, TrainingState, train
from . import host_training, progress


@dataclass
class TrainingRun:
    model: object
    samples: torch.Tensor
    conditionings: list
    trainable: torch.nn.Module
    config: TrainConfig
    final_path: Path
    fingerprint: dict[str, str]
    checkpoint_files: Callable[[], dict[Path, tuple[dict, dict]]]
    """The LoRA files a checkpoint writes for users, as ``path: (state_dict, metadata)``."""
    method: TrainingMethod | None = None
    weight_wrappers: dict = field(default_factory=dict)
    module_wrappers: dict = field(default_factory=dict)

    @property
    def sidecar(self) -> Path:
        return checkpoint.trainstate_path(self.final_path)

    def run(self, node_id: str | None, resume: bool) -> TrainingState:
        resume_state = None
        if resume:
            trainable_state, resume_state = checkpoint.load_checkpoint(self.sidecar, self.fingerprint)
            self.trainable.load_state_dict(trainable_state)
            if resume_state.step >= self.config.steps:
                raise ValueError(f"The checkpoint is already at step {resume_state.step}; raise steps above it "
                                 "to continue training.")

        def save_checkpoint(state: TrainingState) -> None:
            checkpoint.save_checkpoint(self.trainable, state, self.sidecar, self.fingerprint, self.checkpoint_files())
            logging.info("Training: checkpoint at step %d saved beside %s", state.step, self.final_path)

        reporter = progress.TrainingProgress(self.config.steps, node_id, start=resume_state.step if resume_state else 0)
        hooks = TrainingHooks(on_step=reporter.on_step,
                              check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                              save_checkpoint=save_checkpoint)
        with host_training.training_model(self.model, self.trainable, self.weight_wrappers,
                                          self.module_wrappers) as (clone, device):
            predict = host_training.unet_predict(clone, self.conditionings, device)
            return train(self.trainable, predict, self.samples.to(device),
                         host_training.noise_schedule(clone).to(device), self.config, hooks, resume_state, self.method)

    def remove_checkpoint(self) -> None:
        checkpoint.remove_checkpoint(self.sidecar, self.checkpoint_files())
