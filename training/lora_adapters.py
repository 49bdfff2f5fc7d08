"""Trainable LoRA factors, applied as weight wrappers: ``W -> W + scale * up @ down``.

The host calls a wrapper on each patched weight in every forward (``weight_function``), so the
frozen module is never modified and the delta stays differentiable. The delta is computed in
float32 (autocast off) and cast to the weight's dtype, as the official fp32 LoRA layers are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.lora_format import LoraLayer, LoraWeights


class LoraAdapter(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.alpha = alpha

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def reset(self, generator: torch.Generator) -> None:
        """Official init: down ~ normal(std 1/rank), up = 0, so training starts from the base model."""
        with torch.no_grad():
            self.down.copy_(torch.randn(self.down.shape, generator=generator) / self.down.shape[0])
            self.up.zero_()

    def delta(self) -> torch.Tensor:
        with torch.autocast(self.up.device.type, enabled=False):
            product = self.up @ self.down
        return product if self.scale == 1.0 else self.scale * product  # B-LoRA's alpha = rank: one launch less

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    def move_to(self, device=None) -> int:
        """Host hook (``comfy.model_patcher`` calls it on wrappers when it loads the model)."""
        if device is not None:
            self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


class LoraAdapterSet(nn.Module):
    """One adapter per target module, keyed by ldm module path."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float | None):
        super().__init__()
        self.paths = sorted(shapes)
        self.adapters = nn.ModuleList(LoraAdapter(*shapes[p], rank, alpha) for p in self.paths)

    def items(self):
        return zip(self.paths, self.adapters)

    def reset(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for adapter in self.adapters:
            adapter.reset(generator)

    def to_lora_weights(self, metadata: dict[str, str] | None = None) -> LoraWeights:
        layers = {}
        for path, adapter in self.items():
            alpha = float(adapter.down.shape[0]) if adapter.alpha is None else float(adapter.alpha)
            layers[path] = LoraLayer(down=adapter.down.detach().float().cpu().clone(),
                                     up=adapter.up.detach().float().cpu().clone(), alpha=alpha)
        return LoraWeights(layers, dict(metadata or {}))
