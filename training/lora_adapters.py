"""Trainable LoRA layers, applied as weight wrappers: ``W -> W + delta``.

The host calls a wrapper on each patched weight in every forward (``weight_function``), so the
frozen module is never modified and the delta stays differentiable. The delta is the
``LoraLayer``'s own (float32, autocast off, cast to the weight's dtype), as the official fp32
LoRA layers compute it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.lora_format import LoraWeights
from ..core.lora_layer import DEFAULT, LoraLayer


class WeightDelta:
    """A host weight wrapper adding one adapter's delta to the weight it wraps."""

    def __init__(self, layer: LoraLayer, adapter: str = DEFAULT):
        self.layer = layer
        self.adapter = adapter

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.layer.delta(self.adapter).to(weight.dtype)

    def move_to(self, device=None) -> int:
        """Host hook (``comfy.model_patcher`` calls it on wrappers when it loads the model)."""
        if device is not None:
            self.layer.to(device)
        return sum(p.numel() * p.element_size() for p in self.layer.parameters())


def reset_official(layer: LoraLayer, generator: torch.Generator, adapter: str = DEFAULT) -> None:
    """Official init: down ~ normal(std 1/rank), up = 0, so training starts from the base model."""
    down, up = layer.factors(adapter)
    with torch.no_grad():
        down.copy_(torch.randn(down.shape, generator=generator) / down.shape[0])
        up.zero_()


class LoraAdapterSet(nn.Module):
    """One trainable LoRA layer per target module, keyed by ldm module path (sorted)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float | None):
        super().__init__()
        self.paths = sorted(shapes)
        self.layers = nn.ModuleList(LoraLayer() for _ in self.paths)
        for path, layer in zip(self.paths, self.layers):
            layer.add_trainable(DEFAULT, *shapes[path], rank, alpha)

    def items(self):
        return zip(self.paths, self.layers)

    def weight_wrappers(self) -> dict[str, WeightDelta]:
        return {path: WeightDelta(layer) for path, layer in self.items()}

    def reset(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            reset_official(layer, generator)

    def to_lora_weights(self, metadata: dict[str, str] | None = None) -> LoraWeights:
        layers = {}
        for path, layer in self.items():
            alpha = float(layer.rank) if layer.alpha is None else float(layer.alpha)
            layers[path] = LoraLayer(down=layer.down.detach().float().cpu().clone(),
                                     up=layer.up.detach().float().cpu().clone(), alpha=alpha)
        return LoraWeights(layers, dict(metadata or {}))
