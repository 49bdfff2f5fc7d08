"""Which layers of a model a method's ``LayerSet`` (``methods.records``) selects, by the block
naming of its model family."""

from __future__ import annotations

import re
from functools import lru_cache

from ..methods.records import LayerSet
from . import sdxl_unet


@lru_cache(maxsize=None)
def _projection_pattern(projections: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"^.+\.transformer_blocks\.\d+\.(" + "|".join(re.escape(p) for p in projections) + r")$")


def selects(layer_set: LayerSet, module_path: str) -> bool:
    if layer_set.family != "SDXL":
        raise ValueError(f"No block naming for the model family {layer_set.family!r}.")
    if not _projection_pattern(layer_set.projections).match(module_path):
        return False
    return layer_set.blocks is None or sdxl_unet.block_of(module_path) in layer_set.blocks


def select(layer_set: LayerSet, module_paths) -> list[str]:
    """The module paths ``layer_set`` selects, sorted."""
    return sorted(path for path in module_paths if selects(layer_set, path))
