"""What each training recipe trains, and its published defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core import sdxl_unet

PRECISIONS = ("fp16", "bf16", "fp32")
"""What training computes in (``trainer.AUTOCAST_DTYPES``); fp16 is the papers'."""

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
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0
    """None: no gradient clipping."""
    batch_size: int = 1
    """Images per step (at most the number given)."""

    def settings(self, rank: int = 0, learning_rate: float = 0.0, alpha: float = 0.0) -> tuple[int, float, float]:
        """``(rank, learning rate, alpha)`` to train with: each input given as 0 takes the recipe's
        published value; alpha unset means alpha = rank (scale 1), decided here and nowhere else."""
        rank = rank or self.rank
        alpha = alpha or self.alpha or rank
        return rank, learning_rate or self.learning_rate, float(alpha)

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
    source="Diffusion-LoRA-Style-Transfer train.sh (r 8, alpha 16, lr 1e-5, batch 2), lit_module.py (AdamW, weight "
           "decay 0.01), trainer.py (no gradient clipping); on SDXL's attention layers",
    weight_decay=0.01, max_grad_norm=None, batch_size=2,
)
UNZIPLORA = Recipe(
    name="UnZipLoRA (content + style, all attention layers)",
    blocks=None,
    rank=64, alpha=None, learning_rate=5e-5, steps=600,
    source="UnZipLoRA official train_unziplora.py (AdamW wd 1e-4, clipping 1.0, batch 1)",
)
RECIPES = {recipe.name: recipe for recipe in (B_LORA, ALL_ATTENTION)}
"""The recipes Train B-LoRA offers (UnZipLoRA has its own node)."""
