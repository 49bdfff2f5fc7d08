"""FLUX.1 transformer naming: the paper's block numbers, ComfyUI's (BFL) module names, diffusers'
names, and the LoRA key prefixes of the common trainers mapped onto the ComfyUI weight they patch.

ComfyUI keeps Black Forest Labs' layout: ``double_blocks.0-18`` then ``single_blocks.0-37``, and
a single block's query, key, value and MLP input are one fused ``linear1`` whose output rows are
``[q | k | v | mlp]``. Diffusers splits that layer into ``single_transformer_blocks.i.attn.to_q``,
``to_k``, ``to_v`` and ``proj_mlp``, so a diffusers LoRA on ``to_q`` patches a row slice of
``linear1``. The rules here mirror ``comfy.utils.flux_to_diffusers`` and the Flux part of
``comfy.lora.model_lora_keys_unet``; a host test checks them against both, key by key.

SplitFlux (Yang et al., CVPR 2026) numbers the blocks 1-57: double blocks are 1-19, single
blocks 20-57, so ComfyUI's ``single_blocks.i`` is paper block ``i + 20``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..methods.flux import SPLITFLUX
from . import kohya_names

DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38
FIRST_SINGLE_PAPER_BLOCK = DOUBLE_BLOCKS + 1
"""Paper block 20 is ``single_blocks.0``."""
LAST_PAPER_BLOCK = DOUBLE_BLOCKS + SINGLE_BLOCKS

FLUX1_HIDDEN_SIZE = 3072
FLUX1_MLP_RATIO = 4.0



def _single_indices(role: str) -> tuple[int, ...]:
    return tuple(int(block.rsplit(".", 1)[1]) for block, r in SPLITFLUX.block_roles.items() if r == role)


CONTENT_SINGLE_BLOCKS = _single_indices("content")
RCA_SINGLE_BLOCKS = _single_indices("rca")
STYLE_SINGLE_BLOCKS = _single_indices("style")
"""SplitFlux's three groups as ``single_blocks`` indices; the registry (``methods.flux``) defines
them, with their sources."""

QKV_PROJECTIONS = ("to_q", "to_k", "to_v")
"""Diffusers' names of a block's query, key and value projections, in ``linear1``'s row order."""


class LoraTarget(NamedTuple):
    """The ComfyUI weight a LoRA module patches, and the output rows it covers (None: all)."""

    weight_key: str
    rows: slice | None


def paper_block(comfy_block: str) -> int:
    """``double_blocks.0`` -> 1, ``single_blocks.0`` -> 20 (diffusers names are accepted too:
    ``transformer_blocks.i``, ``single_transformer_blocks.i``). Raises KeyError otherwise."""
    match = re.fullmatch(r"(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)\.(\d+)",
                         comfy_block)
    if not match:
        raise KeyError(comfy_block)
    index = int(match[2])
    if match[1] in ("double_blocks", "transformer_blocks"):
        if index >= DOUBLE_BLOCKS:
            raise KeyError(comfy_block)
        return index + 1
    if index >= SINGLE_BLOCKS:
        raise KeyError(comfy_block)
    return index + FIRST_SINGLE_PAPER_BLOCK


def _split_paper_block(number: int) -> tuple[bool, int]:
    if not 1 <= number <= LAST_PAPER_BLOCK:
        raise KeyError(f"paper block {number} (FLUX.1 has blocks 1-{LAST_PAPER_BLOCK})")
    if number < FIRST_SINGLE_PAPER_BLOCK:
        return False, number - 1
    return True, number - FIRST_SINGLE_PAPER_BLOCK


def comfy_block(number: int) -> str:
    """Paper block 1 -> ``double_blocks.0``, 20 -> ``single_blocks.0``, 57 -> ``single_blocks.37``."""
    single, index = _split_paper_block(number)
    return f"{'single_blocks' if single else 'double_blocks'}.{index}"


def diffusers_block(number: int) -> str:
    """Paper block 1 -> ``transformer_blocks.0``, 20 -> ``single_transformer_blocks.0``."""
    single, index = _split_paper_block(number)
    return f"{'single_transformer_blocks' if single else 'transformer_blocks'}.{index}"


def qkv_rows(projection: str, hidden_size: int = FLUX1_HIDDEN_SIZE) -> slice:
    """The rows of a fused qkv weight (``linear1``, ``img_attn.qkv``, ``txt_attn.qkv``) that
    diffusers' ``to_q``/``to_k``/``to_v`` hold: ``[0:h]``, ``[h:2h]``, ``[2h:3h]``."""
    part = QKV_PROJECTIONS.index(projection)
    return slice(part * hidden_size, (part + 1) * hidden_size)


def single_block_qkv(index: int, projection: str, hidden_size: int = FLUX1_HIDDEN_SIZE) -> LoraTarget:
    """Where diffusers' ``single_transformer_blocks.{index}.attn.{projection}`` lives in ComfyUI."""
    if not 0 <= index < SINGLE_BLOCKS:
        raise KeyError(f"single block {index}")
    return LoraTarget(f"diffusion_model.single_blocks.{index}.linear1.weight", qkv_rows(projection, hidden_size))


def diffusers_single_qkv_name(index: int, projection: str) -> str:
    """``single_transformer_blocks.{index}.attn.to_q`` (the module a diffusers LoRA adapts)."""
    if projection not in QKV_PROJECTIONS or not 0 <= index < SINGLE_BLOCKS:
        raise KeyError(f"single block {index} {projection}")
    return f"single_transformer_blocks.{index}.attn.{projection}"


def splitflux_group(single_index: int) -> str:
    """"content", "rca" or "style" for a ComfyUI ``single_blocks`` index."""
    for name, blocks in (("content", CONTENT_SINGLE_BLOCKS), ("rca", RCA_SINGLE_BLOCKS),
                         ("style", STYLE_SINGLE_BLOCKS)):
        if single_index in blocks:
            return name
    raise KeyError(f"single block {single_index}")


# Inside a block: diffusers module -> (ComfyUI module, part of its output rows). Parts: None (all
# rows), "q"/"k"/"v" (one third of the fused qkv), "qkv" (all three), "mlp" (the MLP input rows
# of linear1, after the qkv rows).
_DOUBLE_DIFFUSERS_TO_COMFY = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "ff.linear_in": ("img_mlp.0", None),  # LyCORIS LoKr naming (mapped by the 0.33 host, not by 0.3.64)
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE_DIFFUSERS_TO_COMFY = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
    "attn.to_qkv_mlp_proj": ("linear1", None),  # FLUX.2's diffusers names (mapped by the 0.33 host)
    "attn.to_out": ("linear2", None),
}
_TOP_LEVEL_DIFFUSERS_TO_COMFY = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_COMFY_DOUBLE_LINEARS = {"img_attn.qkv", "img_attn.proj", "img_mod.lin", "img_mlp.0", "img_mlp.2",
                         "txt_attn.qkv", "txt_attn.proj", "txt_mod.lin", "txt_mlp.0", "txt_mlp.2"}
_COMFY_SINGLE_LINEARS = {"linear1", "linear2", "modulation.lin"}
_COMFY_TOP_LEVEL_LINEARS = set(_TOP_LEVEL_DIFFUSERS_TO_COMFY.values()) | {"final_layer.adaLN_modulation.1"}

# Every word of a FLUX module path in either naming. Kohya-style names replace every "." with
# "_"; these are what a flattened name is split back into (longest match first).
_MODULE_WORDS = sorted(
    {
        "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mod", "txt_mod", "img_mlp",
        "txt_mlp", "qkv", "proj", "lin", "linear1", "linear1_qkv", "linear2", "modulation", "img_in",
        "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer",
        "adaLN_modulation", "linear", "transformer_blocks", "single_transformer_blocks", "attn", "to_q",
        "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "to_qkv_mlp_proj", "norm", "norm1", "norm1_context", "ff", "ff_context", "net", "proj_mlp",
        "proj_out", "linear_in", "linear_out", "x_embedder", "context_embedder", "time_text_embed",
        "timestep_embedder", "text_embedder", "guidance_embedder", "linear_1", "linear_2", "norm_out",
    },
    key=lambda word: -word.count("_"),
)

_DOTTED_PREFIXES = ("transformer.", "diffusion_model.")
"""diffusers / ai-toolkit / SimpleTuner save ``transformer.<diffusers path>``; ComfyUI's own
(and kohya-converted) files use ``diffusion_model.<ComfyUI path>``; DiffSynth saves the bare
diffusers path."""
_FLAT_PREFIXES = ("lora_transformer_", "lora_unet_", "lycoris_")
"""OneTrainer (``lora_transformer_`` + flattened diffusers path), kohya sd-scripts (``lora_unet_``
+ flattened ComfyUI path), SimpleTuner LyCORIS (``lycoris_`` + flattened diffusers path)."""


def unflatten_kohya_name(flat: str) -> str:
    """``single_blocks_3_linear1`` -> ``single_blocks.3.linear1`` (either naming); KeyError when a
    piece is not part of any FLUX module name."""
    return kohya_names.unflatten(flat, _MODULE_WORDS)


def _rows(part: str | None, hidden_size: int, mlp_ratio: float) -> slice | None:
    if part is None:
        return None
    if part == "qkv":
        return slice(0, 3 * hidden_size)
    if part == "mlp":
        return slice(3 * hidden_size, 3 * hidden_size + int(hidden_size * mlp_ratio))
    return qkv_rows("to_" + part, hidden_size)


def _block_and_rest(path: str, roots: tuple[str, str]) -> tuple[str, int, str] | None:
    match = re.fullmatch(rf"({roots[0]}|{roots[1]})\.(\d+)\.(.+)", path)
    if not match:
        return None
    index, limit = int(match[2]), (DOUBLE_BLOCKS if match[1] == roots[0] else SINGLE_BLOCKS)
    if index >= limit:
        raise KeyError(f"{path}: FLUX.1 has {limit} {match[1]}")
    return match[1], index, match[3]


def _comfy_module_target(path: str, hidden_size: int) -> LoraTarget | None:
    """A dotted ComfyUI module path (the generic ``diffusion_model.<path>`` form, and the host's
    own ``single_blocks.i.linear1_qkv``, the qkv rows of linear1)."""
    found = _block_and_rest(path, ("double_blocks", "single_blocks"))
    if found is None:
        return LoraTarget(f"diffusion_model.{path}.weight", None) if path in _COMFY_TOP_LEVEL_LINEARS else None
    root, index, rest = found
    if root == "single_blocks" and rest == "linear1_qkv":
        return LoraTarget(f"diffusion_model.single_blocks.{index}.linear1.weight", slice(0, 3 * hidden_size))
    linears = _COMFY_DOUBLE_LINEARS if root == "double_blocks" else _COMFY_SINGLE_LINEARS
    return LoraTarget(f"diffusion_model.{path}.weight", None) if rest in linears else None


def _diffusers_module_target(path: str, hidden_size: int, mlp_ratio: float) -> LoraTarget | None:
    if path == "norm_out.linear":
        raise KeyError("norm_out.linear: ComfyUI's final_layer.adaLN_modulation.1 holds its two halves swapped "
                       "(shift, scale vs scale, shift), so a LoRA on it is not a row slice")
    if path in _TOP_LEVEL_DIFFUSERS_TO_COMFY:
        return LoraTarget(f"diffusion_model.{_TOP_LEVEL_DIFFUSERS_TO_COMFY[path]}.weight", None)
    found = _block_and_rest(path, ("transformer_blocks", "single_transformer_blocks"))
    if found is None:
        return None
    root, index, rest = found
    double = root == "transformer_blocks"
    table = _DOUBLE_DIFFUSERS_TO_COMFY if double else _SINGLE_DIFFUSERS_TO_COMFY
    if rest not in table:
        return None
    module, part = table[rest]
    block = f"{'double_blocks' if double else 'single_blocks'}.{index}"
    return LoraTarget(f"diffusion_model.{block}.{module}.weight", _rows(part, hidden_size, mlp_ratio))


def lora_target(lora_prefix: str, hidden_size: int = FLUX1_HIDDEN_SIZE,
                mlp_ratio: float = FLUX1_MLP_RATIO) -> LoraTarget:
    """The ComfyUI weight (``diffusion_model.<path>.weight``) and row slice a LoRA module of a
    FLUX.1 model patches, for the module's key prefix in a LoRA file (the part before
    ``.lora_A.weight``, ``.lora_down.weight``, ``.alpha``...):

    - diffusers / ai-toolkit / SimpleTuner: ``transformer.single_transformer_blocks.3.attn.to_q``
      -> ``single_blocks.3.linear1`` rows ``[0:h]`` (``to_k`` ``[h:2h]``, ``to_v`` ``[2h:3h]``,
      ``proj_mlp`` ``[3h:3h+mlp]``);
    - kohya sd-scripts: ``lora_unet_single_blocks_3_linear1`` -> the whole ``linear1``;
    - OneTrainer ``lora_transformer_...`` and LyCORIS ``lycoris_...``: flattened diffusers paths;
    - ComfyUI: ``diffusion_model.single_blocks.3.linear1``, and ``...linear1_qkv`` (rows
      ``[0:3h]``).

    Linear layers only (the host's norm-scale keys are not LoRA targets). Raises KeyError for
    anything else, including diffusers' ``norm_out.linear`` (its halves are swapped in ComfyUI).
    """
    path = lora_prefix
    flat = False
    for prefix in _FLAT_PREFIXES:
        if path.startswith(prefix):
            path, flat = path[len(prefix):], True
            break
    else:
        for prefix in _DOTTED_PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
    if flat:
        path = unflatten_kohya_name(path)
    target = _comfy_module_target(path, hidden_size) or _diffusers_module_target(path, hidden_size, mlp_ratio)
    if target is None:
        raise KeyError(f"{lora_prefix}: not a linear layer of a FLUX.1 transformer in any known LoRA naming")
    return target
