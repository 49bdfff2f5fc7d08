"""FLUX LoRA state dicts by block: the part of a file a loader applies (host-free).

Any naming ``core.flux_blocks.lora_target`` reads (diffusers / ai-toolkit, kohya, OneTrainer,
LyCORIS, ComfyUI); modules are grouped by the ComfyUI block they patch. SplitFlux's files
(``training.splitflux``) say in their metadata how many leading ranks of each content layer are
the main branch, so the main branch alone (re-contextualisation) is those ranks.
"""

from __future__ import annotations

import re

import torch

from . import flux_blocks
from .lora_format import LoraFormatError

FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora_A.default.weight",
                   ".lora_B.default.weight", ".alpha", ".lora_mid.weight", ".dora_scale")
DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora_A.default.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight", ".lora_B.default.weight")
MAIN_RANK_METADATA_KEY = "splitflux.main_rank"


def modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """prefix -> {suffix: tensor}; keys of no LoRA factor are refused, naming one."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise LoraFormatError(f"{key!r} is not a LoRA factor (expected keys ending in lora_A/lora_B, "
                                  "lora_down/lora_up or alpha).")
        grouped.setdefault(key[:-len(suffix)], {})[suffix] = tensor
    return grouped


def single_block_of(prefix: str) -> int | None:
    """The ComfyUI ``single_blocks`` index a module patches, None for any other block."""
    try:
        target = flux_blocks.lora_target(prefix)
    except KeyError:
        return None
    match = re.fullmatch(r"diffusion_model\.single_blocks\.(\d+)\..+", target.weight_key)
    return int(match[1]) if match else None


def blocks_part(state_dict: dict[str, torch.Tensor], blocks: tuple[int, ...], what: str) -> dict[str, torch.Tensor]:
    """The modules of ``state_dict`` on the single blocks ``blocks``; an error naming the file's
    blocks when there are none."""
    grouped = modules(state_dict)
    kept = {p: f for p, f in grouped.items() if single_block_of(p) in blocks}
    if not kept:
        found = sorted({b for b in map(single_block_of, grouped) if b is not None})
        raise LoraFormatError(f"This FLUX LoRA has no layers on the {what} blocks (single_blocks {blocks[0]}-{blocks[-1]}); "
                              f"single blocks it has: {found or 'none'}.")
    return {prefix + suffix: tensor for prefix, factors in kept.items() for suffix, tensor in factors.items()}


def main_branch(state_dict: dict[str, torch.Tensor], main_rank: int, blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The first ``main_rank`` ranks of every module on ``blocks`` (SplitFlux's main branch; files
    stacked main first), other modules as they are. Files with an ``alpha`` are refused there: a
    rank cut would change their scale."""
    result = {}
    for prefix, factors in modules(state_dict).items():
        if single_block_of(prefix) in blocks:
            if ".alpha" in factors:
                raise LoraFormatError(f"{prefix} has an alpha; only SplitFlux files (no alpha) can be cut to the main branch.")
            factors = {s: (t[:main_rank] if s in DOWN_SUFFIXES else t[:, :main_rank] if s in UP_SUFFIXES else t)
                       for s, t in factors.items()}
        result.update({prefix + s: t.contiguous() for s, t in factors.items()})
    return result
