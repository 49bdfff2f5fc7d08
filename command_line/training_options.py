"""What ``cli.py train`` and ``cli.py library train`` share: the methods Train B-LoRA trains, by
the names their ``--recipe`` takes (the registry's keys), and the steps a training runs when
``--steps`` is not given. ``cli.py train`` also takes the FLUX.1 methods (Train SplitFlux)."""

from __future__ import annotations

from .. import methods
from ..methods import Recipe
from ..training.trainer import DEFAULT_PRECISION, PRECISIONS

RECIPES = {method.key: method for method in methods.trained_by("BLoRATrain")}
FLUX_RECIPES = {method.key: method for method in methods.trained_by("SplitFluxTrain")}
TRAIN_RECIPES = {**RECIPES, **FLUX_RECIPES}
"""``cli.py train``'s recipes: Train B-LoRA's (SDXL) and Train SplitFlux's (FLUX.1)."""
DEFAULT = next(iter(RECIPES))
B_LORA_PROMPT = "A [v]"
"""Train B-LoRA's prompt on the command line (the paper's)."""
TINY_STEPS = 200
"""``--tiny``'s default: the recipes' step counts are for real images and checkpoints."""


def steps_for(steps: int | None, tiny: bool, recipe: Recipe) -> int:
    return steps if steps is not None else (TINY_STEPS if tiny else recipe.steps)


def add_recipe_arguments(parser, recipes: dict = RECIPES) -> None:
    """``--recipe`` (one of ``recipes``), ``--steps``, ``--rank`` and ``--learning-rate``, as both
    train commands take them."""
    parser.add_argument("--recipe", choices=sorted(recipes), default=DEFAULT,
                        help="; ".join(f"{key}: {method.help}" for key, method in recipes.items()))
    parser.add_argument("--steps", type=int, help=f"default: the recipe's (with --tiny, {TINY_STEPS})")
    parser.add_argument("--rank", type=int, help="default: the recipe's")
    parser.add_argument("--learning-rate", type=float, help="default: the recipe's")


def add_precision_argument(parser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"default {DEFAULT_PRECISION}, the papers' (fp32 on a CPU)")
