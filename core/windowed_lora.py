"""A LoRA that acts only during a window of the sampling schedule.

The low-rank path ``x A^T B^T`` is added to a frozen layer's output while a shared gate is open;
a sampling wrapper opens the gate for the steps inside the window. Outside the window nothing is
computed, inside it costs a rank-r product per layer, so sampling stays about as fast as with
plain weight patches (which cannot change between steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Gate:
    """Open while the current step is inside the window; set by the sampling wrapper."""

    open: bool = True


class WindowedLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float, gate: Gate):
        super().__init__()
        self.base = base
        self.factors = (down.float(), up.float())
        self.scale = scale
        self.gate = gate
        self._cast: dict = {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.base(inputs)
        if not self.gate.open:
            return output
        key = (inputs.device, inputs.dtype)
        if key not in self._cast:
            self._cast[key] = tuple(f.to(device=inputs.device, dtype=inputs.dtype) for f in self.factors)
        down, up = self._cast[key]
        return output + (self.scale * ((inputs @ down.t()) @ up.t())).to(output.dtype)


def sigma_window(model_sampling, start: float, end: float) -> tuple[float, float]:
    """The (high, low) sigmas bounding a window given as fractions of the schedule."""
    return float(model_sampling.percent_to_sigma(start)), float(model_sampling.percent_to_sigma(end))


def in_window(sigma: float, high: float, low: float) -> bool:
    return low <= sigma <= high
