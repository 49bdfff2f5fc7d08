"""SDXL UNet module naming: the one table between diffusers and ldm (ComfyUI) names.

ComfyUI names modules the ldm way (``output_blocks.0.1.transformer_blocks.0.attn1.to_q``),
diffusers and most trainers the diffusers way (``up_blocks.0.attentions.0...``), and kohya
flattens either with underscores. Everything in the pack speaks ldm module paths; this module
turns the other two into them. The rules mirror ``comfy.utils.unet_to_diffusers`` for SDXL's
topology (2 res blocks per level, 3 levels, attention on the lower two), and a host test checks
them against it key by key.
"""

from __future__ import annotations

import re

from . import kohya_names

LEVELS = 3
RES_BLOCKS_PER_LEVEL = 2
LEVELS_WITH_ATTENTION = (1, 2)

RESNET_DIFFUSERS_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

TOP_LEVEL_DIFFUSERS_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

# Every word that appears in an SDXL module path in either naming. Kohya names replace every
# "." with "_", so these are what a flattened name is split back into (longest match first).
_MODULE_WORDS = sorted(
    {
        "input_blocks", "middle_block", "output_blocks", "transformer_blocks", "time_embed",
        "label_emb", "out", "op", "conv", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net",
        "proj", "proj_in", "proj_out", "norm", "norm1", "norm2", "norm3", "down_blocks",
        "up_blocks", "mid_block", "resnets", "attentions", "downsamplers", "upsamplers",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out",
        "conv_norm_out", "time_embedding", "add_embedding", "linear_1", "linear_2",
    },
    key=lambda word: -word.count("_"),
)

_DIFFUSERS_BLOCK = re.compile(
    r"^(?P<kind>down_blocks|up_blocks)\.(?P<level>\d+)\.(?P<part>resnets|attentions)\.(?P<index>\d+)(?P<rest>(\..+)?)$"
)
_MID_BLOCK = re.compile(r"^mid_block\.(?P<part>resnets|attentions)\.(?P<index>\d+)(?P<rest>(\..+)?)$")
_SAMPLER = re.compile(r"^(?P<kind>down_blocks|up_blocks)\.(?P<level>\d+)\.(downsamplers|upsamplers)\.0\.conv$")


def block_of(module_path: str) -> str:
    """The block a module belongs to: ``output_blocks.0.1`` for anything inside it."""
    parts = module_path.split(".")
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 3:
        return ".".join(parts[:3])
    if parts[0] == "middle_block" and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


def is_ldm_path(module_path: str) -> bool:
    return module_path.split(".", 1)[0] in LDM_ROOTS


def _resnet_to_ldm(rest: str) -> str:
    inner = rest.lstrip(".")
    if not inner:
        return ""
    head, _, tail = inner.partition(".")
    if head not in RESNET_DIFFUSERS_TO_LDM:
        raise KeyError(inner)
    return "." + ".".join(filter(None, [RESNET_DIFFUSERS_TO_LDM[head], tail]))


def diffusers_to_ldm(module_path: str) -> str:
    """``up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_k`` -> ``output_blocks.1.1...``.

    Raises KeyError for a path that is not a module of the SDXL UNet in diffusers naming.
    """
    if module_path in TOP_LEVEL_DIFFUSERS_TO_LDM:
        return TOP_LEVEL_DIFFUSERS_TO_LDM[module_path]
    per_level = RES_BLOCKS_PER_LEVEL + 1
    match = _DIFFUSERS_BLOCK.match(module_path)
    if match:
        level, index, rest = int(match["level"]), int(match["index"]), match["rest"]
        if match["kind"] == "down_blocks":
            if index >= RES_BLOCKS_PER_LEVEL:
                raise KeyError(module_path)
            block = f"input_blocks.{1 + per_level * level + index}"
        else:
            if index >= per_level:
                raise KeyError(module_path)
            block = f"output_blocks.{per_level * level + index}"
        if match["part"] == "attentions":
            return f"{block}.1{rest}"
        return f"{block}.0{_resnet_to_ldm(rest)}"
    match = _MID_BLOCK.match(module_path)
    if match:
        index, rest = int(match["index"]), match["rest"]
        if match["part"] == "attentions" and index == 0:
            return f"middle_block.1{rest}"
        if match["part"] == "resnets" and index in (0, 1):
            return f"middle_block.{2 * index}{_resnet_to_ldm(rest)}"
        raise KeyError(module_path)
    match = _SAMPLER.match(module_path)
    if match:
        level = int(match["level"])
        if match["kind"] == "down_blocks":
            return f"input_blocks.{per_level * (level + 1)}.0.op"
        up_level_has_attention = (LEVELS - 1 - level) in LEVELS_WITH_ATTENTION
        return f"output_blocks.{per_level * level + 2}.{2 if up_level_has_attention else 1}.conv"
    raise KeyError(module_path)


def unflatten_kohya_name(flat: str) -> str:
    """``output_blocks_0_1_transformer_blocks_0_attn1_to_q`` -> dotted path (either naming); KeyError
    when a piece is not part of any SDXL module name."""
    return kohya_names.unflatten(flat, _MODULE_WORDS)


def to_ldm_path(module_path: str) -> str:
    """Any dotted SDXL UNet module path, ldm or diffusers naming, as the ldm path."""
    if is_ldm_path(module_path):
        return module_path
    return diffusers_to_ldm(module_path)


_LDM_ATTENTION_BLOCK = re.compile(r"^(?P<kind>input_blocks|output_blocks)\.(?P<number>\d+)\.1(?P<rest>(\..+)?)$")


def ldm_to_diffusers(module_path: str) -> str:
    """The diffusers path of a module inside an attention block (the blocks LoRAs train).

    ``output_blocks.1.1.transformer_blocks.0.attn1.to_q`` -> ``up_blocks.0.attentions.1...``.
    Raises KeyError for other modules; the result maps back with :func:`diffusers_to_ldm`.
    """
    per_level = RES_BLOCKS_PER_LEVEL + 1
    if module_path == "middle_block.1" or module_path.startswith("middle_block.1."):
        return "mid_block.attentions.0" + module_path[len("middle_block.1"):]
    match = _LDM_ATTENTION_BLOCK.match(module_path)
    if not match:
        raise KeyError(module_path)
    number, rest = int(match["number"]), match["rest"]
    if match["kind"] == "input_blocks":
        level, index = divmod(number - 1, per_level)
        if index >= RES_BLOCKS_PER_LEVEL or level not in LEVELS_WITH_ATTENTION:
            raise KeyError(module_path)
        return f"down_blocks.{level}.attentions.{index}{rest}"
    level, index = divmod(number, per_level)
    if (LEVELS - 1 - level) not in LEVELS_WITH_ATTENTION:
        raise KeyError(module_path)
    return f"up_blocks.{level}.attentions.{index}{rest}"
