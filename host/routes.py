"""HTTP routes for the front end: the recipes' published defaults (rank, learning rate, alpha),
so the editor can fill them in when a recipe is chosen."""

from __future__ import annotations

from aiohttp import web

from ..training import recipes


def recipe_defaults() -> dict:
    """Per recipe name: the Train B-LoRA widget values that recipe starts from (alpha 0 = the recipe's own)."""
    return {name: {"rank": recipe.rank, "learning_rate": recipe.learning_rate, "alpha": 0.0, "steps": recipe.steps}
            for name, recipe in recipes.RECIPES.items()}


def register() -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:  # imported as a library (tests, the command line): no server to serve from
        return

    @server.routes.get("/blora/recipes")
    async def get_recipes(request):
        return web.json_response(recipe_defaults())
