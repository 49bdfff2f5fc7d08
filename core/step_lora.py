"""LoRA layers whose action depends on where sampling is: the piece ReChar's structure window,
K-LoRA's per-step choice and UnZipLoRA's prompt-separated recombination share.

Each such layer adds ``LoraLayer.lora_output`` of one or more LoRAs to one linear layer's output:
it replaces that layer's ``forward`` (``host/step_patches.py`` puts it in as an object patch on
a model clone, so the module, its weights and any weight patch on it stay as they are). Before every model call the host's sampling wrapper tells a :class:`StepListener`
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


ForwardFactory = Callable[[Callable], Callable]
"""Given a layer's current ``forward``, the ``forward`` that replaces it."""
LowRankOutput = Callable[[torch.Tensor], torch.Tensor]
"""A LoRA's delta applied to an input (``functools.partial(LoraLayer.lora_output, strength=...)``)."""
