"""What each training recipe trains, and its published defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core import sdxl_unet

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Recipe:
    name: str
    blocks: tuple[str, ...] | None
    """ldm blocks whose attention projections get a LoRA; None means every attention block."""
    rank: int
    alpha: float | None
    """None: alpha = rank, i.e. scale 1 (B-LoRA's diffusers ``LoRALinearLayer`` has no alpha)."""
    learning_rate: float
    steps: int
    source: str

    def is_target(self, module_path: str) -> bool:
        match = _ATTENTION_PROJECTION.match(module_path)
        if not match:
            return False
        return self.blocks is None or sdxl_unet.block_of(module_path) in self.blocks

    def targets(self, module_paths) -> list[str]:
        return sorted(path for path in module_paths if self.is_target(path))


_ATTENTION_PROJECTION = re.compile(
    r"^.+\.transformer_blocks\.\d+\.attn[12]\.(" + "|".join(re.escape(p) for p in ATTENTION_PROJECTIONS) + r")$"
)

B_LORA = Recipe(
    name="B-LoRA blocks (content + style)",
    blocks=(sdxl_unet.CONTENT_BLOCK, sdxl_unet.STYLE_BLOCK),
    rank=64, alpha=None, learning_rate=5e-5, steps=1000,
    source="B-LoRA official train_dreambooth_b-lora_sdxl.py, README command",
)
ALL_ATTENTION = Recipe(
    name="all attention layers (style LoRA)",
    blocks=None,
    rank=8, alpha=16.0, learning_rate=1e-5, steps=1000,
    source="Diffusion-LoRA-Style-Transfer train.sh (r 8, alpha 16, lr 1e-5), on SDXL's attention layers",
)
RECIPES = {recipe.name: recipe for recipe in (B_LORA, ALL_ATTENTION)}
