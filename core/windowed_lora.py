"""A LoRA that acts only during a window of the sampling schedule (ReChar's structure window).

The low-rank path ``x A^T B^T`` is added to a frozen layer's output while the window is open;
the sampling wrapper (``host/step_patches.py``) tells the window each call's sigma. Outside the
window nothing is computed, inside it costs a rank-r product per layer, so sampling stays about
as fast as with plain weight patches (which cannot change between steps).
"""

from __future__ import annotations

from typing import Callable

import torch

from .step_lora import LowRankOutput, SamplingCall, StepListener


class SigmaWindow(StepListener):
    """Open while the current call's sigma lies in [low, high]."""

    def __init__(self, high: float, low: float):
        self.high, self.low = high, low
        self.open = True

    def begin_call(self, call: SamplingCall) -> None:
        self.open = in_window(call.sigma, self.high, self.low)


class WindowedLoRA:
    """The ``forward`` of a layer whose LoRA acts only while ``window`` is open."""

    def __init__(self, base: Callable, delta: LowRankOutput, window: SigmaWindow):
        self.base = base
        self.delta = delta
        self.window = window

    def __call__(self, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self.base(inputs, *args, **kwargs)
        if not self.window.open:
            return output
        return output + self.delta(inputs).to(output.dtype)


def sigma_window(model_sampling, start: float, end: float) -> tuple[float, float]:
    """The (high, low) sigmas bounding a window given as fractions of the schedule."""
    return float(model_sampling.percent_to_sigma(start)), float(model_sampling.percent_to_sigma(end))


def in_window(sigma: float, high: float, low: float) -> bool:
    return low <= sigma <= high
