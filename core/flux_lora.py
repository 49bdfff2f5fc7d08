"""FLUX LoRA state dicts by block: the part of a file a loader applies (host-free).

Any naming ``core.flux_blocks.lora_target`` reads (diffusers / ai-toolkit, kohya, OneTrainer,
LyCORIS, ComfyUI); modules are grouped by the ComfyUI block they patch. SplitFlux's files
(``training.splitflux``) say in their metadata how many leading ranks of each content layer are
the main branch, so the main branch alone (re-contextualisation) is those ranks.
"""

from __future__ import annotations

import re

import torch

from . import flux_blocks, lora_format
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


# --- FLUX LoRAs as pieces: one LoraLayer per ComfyUI weight and row range ----------------------
# Files differ in how they cut FLUX's fused layers (diffusers: to_q/to_k/to_v/proj_mlp, slices of
# linear1; kohya and ComfyUI: the whole linear1). To compare two files layer by layer (K-LoRA), every
# module is cut into the pieces diffusers names: a LoRA on a whole fused layer restricted to a row
# range is ``up[rows] @ down``, exactly its delta on those rows.

_SINGLE_PIECES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_DOUBLE_PIECES = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                  "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
ATTENTION_PIECES = re.compile(r"^transformer\.(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|"
                              r"add_k_proj|add_v_proj)$|^diffusion_model\.double_blocks\.\d+\.(img|txt)_attn\.proj$")
"""FLUX's attention projections (the layers K-LoRA switches on, as its SDXL rule takes SDXL's):
query, key and value of every block, and the double blocks' output projections (a single block's
output projection ``linear2`` is shared with its MLP)."""


def _pieces_of(target: flux_blocks.LoraTarget, hidden_size: int, mlp_ratio: float) -> list[tuple[str, slice | None]]:
    """(piece name, rows within the target's rows) of one module's target."""
    match = re.fullmatch(r"diffusion_model\.(single_blocks|double_blocks)\.(\d+)\.(.+)\.weight", target.weight_key)
    if match is None:
        return [(f"diffusion_model.{target.weight_key[len('diffusion_model.'):-len('.weight')]}", None)]
    root, index, module = match[1], match[2], match[3]
    if root == "single_blocks" and module == "linear1":
        names, prefix = _SINGLE_PIECES, f"transformer.single_transformer_blocks.{index}."
    elif root == "double_blocks" and module in _DOUBLE_PIECES:
        names, prefix = _DOUBLE_PIECES[module], f"transformer.transformer_blocks.{index}."
    else:
        return [(f"diffusion_model.{root}.{index}.{module}", None)]
    start = 0 if target.rows is None else target.rows.start
    stop = None if target.rows is None else target.rows.stop
    pieces = []
    for name in names:
        rows = flux_blocks.lora_target(prefix + name, hidden_size, mlp_ratio).rows
        if rows.start >= start and (stop is None or rows.stop <= stop):
            pieces.append((prefix + name, slice(rows.start - start, rows.stop - start)))
    if not pieces or (stop is not None and (pieces[0][1].start, pieces[-1][1].stop) != (0, stop - start)):
        raise LoraFormatError(f"{target.weight_key} rows {target.rows}: not whole q/k/v/MLP parts of the fused layer.")
    return pieces


def read_pieces(state_dict: dict[str, torch.Tensor], hidden_size: int = flux_blocks.FLUX1_HIDDEN_SIZE,
                mlp_ratio: float = flux_blocks.FLUX1_MLP_RATIO, source: str = "this file"):
    """A FLUX LoRA file (any naming ``flux_blocks.lora_target`` reads) as ``LoraWeights`` keyed by
    piece (diffusers names for slices of fused layers, ``diffusion_model.<path>`` otherwise)."""
    from .lora_format import LoraWeights
    from .lora_layer import LoraLayer

    layers = {}
    for prefix, factors in modules(state_dict).items():
        down = next((factors[s] for s in DOWN_SUFFIXES if s in factors), None)
        up = next((factors[s] for s in UP_SUFFIXES if s in factors), None)
        if down is None or up is None or ".lora_mid.weight" in factors or ".dora_scale" in factors:
            raise LoraFormatError(f"{source}: {prefix} is not a plain LoRA (down and up factors only).")
        try:
            target = flux_blocks.lora_target(prefix, hidden_size, mlp_ratio)
        except KeyError as error:
            raise LoraFormatError(f"{source}: {error.args[0]}") from None
        alpha = float(factors[".alpha"]) if ".alpha" in factors else None
        for name, rows in _pieces_of(target, hidden_size, mlp_ratio):
            if name in layers:
                raise LoraFormatError(f"{source} changes {name} twice ({prefix} and another module).")
            piece_up = up if rows is None else up[rows]
            layers[name] = LoraLayer(down.float().clone(), piece_up.float().contiguous().clone(), alpha)
    return LoraWeights(layers)


def piece_target(name: str, hidden_size: int = flux_blocks.FLUX1_HIDDEN_SIZE,
                 mlp_ratio: float = flux_blocks.FLUX1_MLP_RATIO) -> tuple[str, slice | None]:
    """(ComfyUI module path, its output rows) of a piece."""
    target = flux_blocks.lora_target(name, hidden_size, mlp_ratio)
    return target.weight_key[len("diffusion_model."):-len(".weight")], target.rows


def pieces_state_dict(weights) -> dict[str, torch.Tensor]:
    """Pieces back to a state dict ComfyUI's FLUX key map reads (their names, lora_A / lora_B, alpha)."""
    return lora_format.named_state_dict(weights, lambda name: name, down="lora_A.weight", up="lora_B.weight")
