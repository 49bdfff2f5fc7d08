"""The LoRA layer: the one home of LoRA math in the pack, in peft's shape.

A :class:`LoraLayer` holds the adapters of one weight, each by name in per-adapter dicts as
peft's ``LoraLayer`` does: ``lora_A[name]`` = down (rank x in), ``lora_B[name]`` = up
(out x rank) and ``lora_alpha[name]``; the delta is ``scaling * up @ down`` with
``scaling = alpha / rank``, or 1 without an alpha (the official B-LoRA and UnZipLoRA files store
none: they train at scale 1). Every user of LoRA factors goes through it:

- the file reader (``lora_format``): one adapter, :data:`DEFAULT`, as read;
- the trainer: trainable adapters whose :meth:`LoraLayer.delta` is added to the frozen weight;
- UnZipLoRA: two adapters, ``content`` and ``style``, on one layer;
- K-LoRA, ReChar's window and UnZipLoRA's recombination: :meth:`LoraLayer.lora_output`, the
  delta applied to an input as two thin products (never the full matrix).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

DEFAULT = "default"


class LoraLayer(nn.Module):
    def __init__(self, down: torch.Tensor | None = None, up: torch.Tensor | None = None, alpha: float | None = None):
        """Given ``down`` and ``up``, the layer starts with them as its :data:`DEFAULT` adapter (frozen)."""
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_alpha: dict[str, float | None] = {}
        self._cast: dict = {}
        if down is not None or up is not None:
            self.update_layer(DEFAULT, down, up, alpha)

    def update_layer(self, adapter: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None,
                     trainable: bool = False) -> None:
        """Add (or replace) ``adapter`` with these factors, as trainable parameters or frozen ones."""
        self.lora_A[adapter] = nn.Parameter(down, requires_grad=trainable)
        self.lora_B[adapter] = nn.Parameter(up, requires_grad=trainable)
        self.lora_alpha[adapter] = alpha
        self._cast.clear()

    def add_trainable(self, adapter: str, out_features: int, in_features: int, rank: int,
                      alpha: float | None = None) -> None:
        """A trainable adapter, both factors zero until initialised."""
        self.update_layer(adapter, torch.zeros(rank, in_features), torch.zeros(out_features, rank), alpha, True)

    def factors(self, adapter: str = DEFAULT) -> tuple[nn.Parameter, nn.Parameter]:
        """``(down, up)`` of ``adapter``."""
        return self.lora_A[adapter], self.lora_B[adapter]

    def rank_of(self, adapter: str = DEFAULT) -> int:
        return self.lora_A[adapter].shape[0]

    def scaling(self, adapter: str = DEFAULT) -> float:
        alpha = self.lora_alpha[adapter]
        return 1.0 if alpha is None else alpha / self.rank_of(adapter)

    def delta(self, adapter: str = DEFAULT, device: torch.device | str | None = None,
              float32: bool = True) -> torch.Tensor:
        """``scaling * up @ down``, shaped like the weight it patches, computed on ``device`` (else
        where the factors are). In float32 with autocast off, as the official fp32 LoRA layers of
        B-LoRA compute it; ``float32=False`` computes it under the ambient autocast instead, as
        UnZipLoRA's official layer does. Differentiable: the trainer adds it to the frozen weight
        in every forward."""
        down, up = self.factors(adapter)
        if float32:
            down, up = down.float(), up.float()
        with torch.autocast(up.device.type, enabled=False) if float32 else contextlib.nullcontext():
            product = up.flatten(1).to(device) @ down.flatten(1).to(device)
        scale = self.scaling(adapter)
        product = product if scale == 1.0 else scale * product  # alpha = rank: one launch less
        return product.reshape(up.shape[0], *down.shape[1:])

    def trained_output(self, inputs: torch.Tensor, adapter: str = DEFAULT) -> torch.Tensor:
        """``scaling * (inputs @ down^T) @ up^T``, differentiable in the factors and the inputs,
        as two thin products (peft's ``lora_B(lora_A(x)) * scaling``); in the inputs' dtype.
        For trainers whose delta depends on the token (SplitFlux's gate)."""
        down, up = (f.flatten(1).to(inputs.dtype) for f in self.factors(adapter))
        output = (inputs @ down.t()) @ up.t()
        scale = self.scaling(adapter)
        return output if scale == 1.0 else scale * output

    def lora_output(self, inputs: torch.Tensor, adapter: str = DEFAULT, strength: float = 1.0) -> torch.Tensor:
        """``strength * scaling * (inputs @ down^T) @ up^T`` of frozen factors, in the inputs'
        dtype; the factors are cast once per device and dtype (and per inference mode: a copy made
        under inference mode cannot be saved for backward)."""
        key = (adapter, inputs.device, inputs.dtype, torch.is_inference_mode_enabled())
        if key not in self._cast:
            self._cast[key] = tuple(f.detach().float().flatten(1).to(device=inputs.device, dtype=inputs.dtype)
                                    for f in self.factors(adapter))
        down, up = self._cast[key]
        return (strength * self.scaling(adapter)) * ((inputs @ down.t()) @ up.t())

    # The file reader's layers hold one adapter; these read it.
    @property
    def down(self) -> torch.Tensor:
        return self.lora_A[DEFAULT]

    @property
    def up(self) -> torch.Tensor:
        return self.lora_B[DEFAULT]

    @property
    def alpha(self) -> float | None:
        return self.lora_alpha[DEFAULT]

    @property
    def rank(self) -> int:
        return self.rank_of(DEFAULT)

    @property
    def scale(self) -> float:
        return self.scaling(DEFAULT)
