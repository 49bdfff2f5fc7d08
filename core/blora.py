"""B-LoRA method facts: which block holds what, and how strength maps to the official scripts."""

from __future__ import annotations

STRENGTH_MODES = ("comfyui (linear)", "official B-LoRA (squared)")
"""How ``strength`` scales the delta.

ComfyUI scales the weight delta linearly. The official ``inference.py`` multiplies *both*
factors by its ``--content_alpha``/``--style_alpha`` (``scale_lora``), so the delta grows with the
square: the paper's style alpha 1.1 is a linear strength of 1.21. The second mode takes the
official number as typed.
"""

OFFICIAL_DEFAULT_STRENGTH = {"content": 1.0, "style": 1.1}


def delta_strength(strength: float, mode: str) -> float:
    """The factor the weight delta is multiplied by, for a strength typed in ``mode``."""
    if mode == STRENGTH_MODES[0]:
        return strength
    if mode == STRENGTH_MODES[1]:
        return strength * strength
    raise ValueError(f"Unknown strength mode {mode!r}; expected one of {STRENGTH_MODES}.")
