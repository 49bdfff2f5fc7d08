"""The method registry: one record per method the pack brings into ComfyUI (its model family,
layers, recipe numbers with their sources, memory peaks, command-line name and help). Nodes,
the command line, the front end's route, the workflow builder and ``auto`` memory read it;
no other module repeats these facts. Plain data: it imports nothing of the pack or the host.
"""

from __future__ import annotations

from .records import LayerSet, Method, Recipe  # noqa: F401
from .flux import METHODS as FLUX_METHODS
from .sdxl import METHODS as SDXL_METHODS

METHODS: tuple[Method, ...] = SDXL_METHODS + FLUX_METHODS
BY_KEY = {method.key: method for method in METHODS}


def by_key(key: str) -> Method:
    if key not in BY_KEY:
        raise ValueError(f"Unknown method {key!r}; the pack has {sorted(BY_KEY)}.")
    return BY_KEY[key]


def trained_by(node_id: str) -> list[Method]:
    """The methods a training node trains, by its ``recipe`` choices (its first node is the trainer)."""
    return [m for m in METHODS if m.recipe is not None and m.nodes[0] == node_id]


def by_recipe_name(name: str) -> Method:
    for method in METHODS:
        if method.recipe is not None and method.recipe.name == name:
            return method
    raise ValueError(f"Unknown recipe {name!r}; choose one of {[m.recipe.name for m in METHODS if m.recipe]}.")


def training_nodes() -> list[str]:
    return sorted({m.nodes[0] for m in METHODS if m.recipe is not None})


def fusions() -> list[Method]:
    """The methods that combine a content LoRA with a style LoRA."""
    return [m for m in METHODS if m.fuses]
