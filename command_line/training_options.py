"""What ``cli.py train`` and ``cli.py library train`` share: the recipes by the names their
``--recipe`` takes, and the steps a training runs when ``--steps`` is not given."""

from __future__ import annotations

from ..training.recipes import ALL_ATTENTION, B_LORA, Recipe

RECIPES = {"b-lora": B_LORA, "style": ALL_ATTENTION}
TINY_STEPS = 200
"""``--tiny``'s default: the recipes' step counts are for real images and checkpoints."""


def steps_for(steps: int | None, tiny: bool, recipe: Recipe) -> int:
    return steps if steps is not None else (TINY_STEPS if tiny else recipe.steps)
