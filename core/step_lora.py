"""LoRA layers whose action depends on where sampling is: the piece ReChar's structure window,
K-LoRA's per-step choice and UnZipLoRA's prompt-separated recombination share.

Each such layer replaces one linear layer's ``forward`` (``host/step_patches.py`` puts it in as
an object patch on a model clone, so the module, its weights and any weight patch on it stay
as they are). Before every model call the host's sampling wrapper tells a :class:`StepListener`
where sampling is (:class:`SamplingCall`); the layers read what their listener keeps. Nothing
here imports the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

COND, UNCOND = 0, 1
"""The host's marks for the batch chunks of one model call (its ``cond_or_uncond``)."""


@dataclass(frozen=True)
class SamplingCall:
    """One call of the model during sampling."""

    sigma: float
    step: int | None = None
    """Index of the schedule step this call belongs to (0-based), None when the sampler gives
    no schedule."""
    steps: int | None = None
    """Number of steps in this sampling run's schedule."""
    chunks: tuple[int, ...] = ()
    """Per equal chunk of the batch, :data:`COND` or :data:`UNCOND` (empty when unknown)."""


class StepListener:
    """Told by the host when a sampling run starts and ends, and before each model call."""

    def begin_run(self) -> None:
        pass

    def begin_call(self, call: SamplingCall) -> None:
        pass

    def end_run(self) -> None:
        pass


class LowRankDelta:
    """``factor * up @ down`` applied to an input as two thin products (never the full matrix);
    the factors are kept in float32 and cast once per device and dtype (and per inference mode:
    a copy made under inference mode cannot be saved for backward)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, factor: float):
        self.factors = (down.detach().float().flatten(1), up.detach().float().flatten(1))
        self.factor = factor
        self._cast: dict = {}

    @classmethod
    def of(cls, layer, strength: float = 1.0) -> "LowRankDelta":
        """The delta of a ``lora_format.LoraLayer`` (its alpha/rank scale included) times ``strength``."""
        return cls(layer.down, layer.up, strength * layer.scale)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        key = (inputs.device, inputs.dtype, torch.is_inference_mode_enabled())
        if key not in self._cast:
            self._cast[key] = tuple(f.to(device=inputs.device, dtype=inputs.dtype) for f in self.factors)
        down, up = self._cast[key]
        return self.factor * ((inputs @ down.t()) @ up.t())


ForwardFactory = Callable[[Callable], Callable]
"""Given a layer's current ``forward``, the ``forward`` that replaces it."""
