"""The LoRA training loop: everything one step does, visible in one screen.

Host-free: the caller hands in the adapters, a ``predict`` function that runs the UNet, the
encoded latents and the noise schedule, plus hooks for progress, Cancel and checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .diffusion import denoising_loss, draw_batch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
PRECISIONS = tuple(AUTOCAST_DTYPES)
"""What training computes in."""
DEFAULT_PRECISION = "fp16"
"""The papers' (with a gradient scaler); on a CPU it runs as fp32."""


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf for too many steps in a row."""


@dataclass(frozen=True)
class TrainConfig:
    """A run's whole resolved configuration: what the loop reads and what identifies the run.

    A checkpoint and every trained file record it whole; a resume must match it (see
    ``checkpoint.resumable_config`` for the few fields that may change)."""

    steps: int
    learning_rate: float
    seed: int = 0
    precision: str = "fp32"
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only on Cancel or error)."""
    max_grad_norm: float | None = 1.0
    """None: no gradient clipping."""
    batch_size: int = 1
    """Images per step: their losses are averaged (one UNet call each, gradients accumulated, so
    memory stays that of one image), which equals one batched step with a mean loss."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    prediction: str = "epsilon"
    max_bad_steps: int = 20
    """Consecutive non-finite steps tolerated (each is skipped) before training stops."""
    method: str = ""
    """The registry key of the method (``methods``)."""
    recipe: str = ""
    rank: int = 0
    alpha: float = 0.0
    images: int = 1
    images_sha256: str = ""
    """Of the encoded latents the run trains on."""
    conditioning_sha256: str = ""
    """Of the prompts' embeddings (every stream the method feeds)."""
    base_model_sha256: str = ""
    """Of the base weights of the trained layers."""
    method_settings: Mapping[str, Any] = field(default_factory=dict)
    """The method's own settings (UnZipLoRA's column separation, ...)."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 or more, got {self.checkpoint_every}.")


@dataclass
class TrainingState:
    """What a checkpoint holds besides the LoRA: enough to continue exactly where it stopped."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    optimizer: dict | None = None
    """AdamW's per-parameter state (``state_dict()["state"]``), indexed like the adapter parameters."""
    scaler: dict | None = None


@dataclass
class TrainingHooks:
    on_step: Callable[[int, int, float, float], None] = lambda step, total, loss, seconds: None
    """Called after every step with (steps done, total, loss, seconds per step)."""
    check_interrupt: Callable[[], None] = lambda: None
    """Raises to stop (the host's Cancel); a checkpoint is saved first."""
    save_checkpoint: Callable[[TrainingState], None] = lambda state: None


class TrainingMethod:
    """What a method adds to the plain denoising step; this base is plain LoRA (B-LoRA).

    Subclasses (UnZipLoRA) add parameter groups, a loss term and work around the update."""

    def __init__(self, trainable: torch.nn.Module, learning_rate: float):
        self.trainable = trainable
        self.learning_rate = learning_rate

    def parameter_groups(self) -> list[dict]:
        return [{"params": [p for p in self.trainable.parameters() if p.requires_grad], "lr": self.learning_rate}]

    def before_step(self, step: int) -> None:
        pass

    def extra_loss(self, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, step: int) -> None:
        """Runs on unscaled gradients, before clipping."""

    def after_update(self, step: int) -> None:
        pass

    def finish(self) -> None:
        """After the last step (also of a run resumed with none left), before the final files."""


def make_optimizer(parameter_groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
        weight_decay=config.weight_decay, fused=device.type == "cuda",
    )


def train(trainable: torch.nn.Module, predict, latents: torch.Tensor, alphas_cumprod: torch.Tensor,
          config: TrainConfig, hooks: TrainingHooks | None = None,
          resume: TrainingState | None = None, method: TrainingMethod | None = None) -> TrainingState:
    """Train ``trainable`` to denoise ``latents`` (N, C, H, W), ``config.batch_size`` images per step."""
    hooks = hooks or TrainingHooks()
    method = method or TrainingMethod(trainable, config.learning_rate)
    device = latents.device
    groups = method.parameter_groups()
    params = [p for group in groups for p in group["params"]]
    optimizer = make_optimizer(groups, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    state = TrainingState()
    if resume is not None:
        restored = optimizer.state_dict()
        restored["state"] = resume.optimizer  # moments and step counts; lr etc. come from this config
        optimizer.load_state_dict(restored)
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        state = TrainingState(resume.step, list(resume.losses))
    autocast_dtype = AUTOCAST_DTYPES[config.precision]
    bad_steps = 0

    def snapshot() -> TrainingState:
        return TrainingState(state.step, list(state.losses), optimizer.state_dict()["state"], scaler.state_dict())

    started_at = state.step
    try:
        for step in range(state.step, config.steps):
            hooks.check_interrupt()
            began = time.perf_counter()
            method.before_step(step)
            draws = draw_batch(config.seed, step, latents.shape[0], latents[:1].shape, config.batch_size)
            loss, finite = 0.0, True
            for position, draw in enumerate(draws):  # one image at a time, gradients accumulated
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    part = denoising_loss(predict, latents[draw.index:draw.index + 1], draw, alphas_cumprod,
                                          config.prediction) / len(draws)
                    extra = method.extra_loss(step) if position == 0 else None
                    if extra is not None:
                        part = part + extra
                finite = finite and bool(torch.isfinite(part))
                if finite:
                    scaler.scale(part).backward()
                loss = loss + part.detach()
            if finite:
                scaler.unscale_(optimizer)
                method.after_backward(step)
                # an infinite bound clips nothing and still gives the norm the finiteness check needs
                max_norm = math.inf if config.max_grad_norm is None else config.max_grad_norm
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                finite = bool(torch.isfinite(grad_norm))
                if finite or scaler.is_enabled():
                    scaler.step(optimizer)  # with fp16 the scaler itself skips overflowing steps
                    scaler.update()
                    method.after_update(step)
            optimizer.zero_grad(set_to_none=True)
            bad_steps = 0 if finite else bad_steps + 1
            if bad_steps > config.max_bad_steps:
                raise NonFiniteLossError(
                    f"The loss or its gradients were NaN/inf for {bad_steps} steps in a row (last at step {step + 1}); "
                    "every such step was skipped, so the saved checkpoint holds the last good LoRA. Try precision "
                    "bf16 or fp32, a lower learning rate, or check the latents (NaN from an fp16 VAE?)."
                )
            state.step = step + 1
            state.losses.append(float(loss.detach()) if finite else math.nan)
            hooks.on_step(state.step, config.steps, state.losses[-1], time.perf_counter() - began)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.steps:
                hooks.save_checkpoint(snapshot())
    except BaseException as stopped:
        if state.step > started_at:
            try:
                hooks.save_checkpoint(snapshot())
            except Exception as failed:  # the reason training stopped is what the user must see
                logging.error("Training: the checkpoint at step %d could not be saved (%s); training stopped "
                              "because of: %s", state.step, failed, stopped)
        raise
    return snapshot()
