"""HTTP routes for the front end: the recipes' published defaults (rank, learning rate, alpha),
so the editor can fill them in when a recipe is chosen."""

from __future__ import annotations

from aiohttp import web

from ..training import recipes


def recipe_defaults() -> dict:
    """Per recipe name: the Train B-LoRA widget values that recipe starts from (alpha 0 = the recipe's own)."""
    return {name: {"rank": recipe.rank, "learning_rate": recipe.learning_rate, "alpha": 0.0, "steps": recipe.steps}
            for name, recipe in recipes.RECIPES.items()}


RECIPES_PATH = "/blora/recipes"


async def get_recipes(request):
    return web.json_response(recipe_defaults())


def register() -> None:
    """Add the routes to the running server's table, once: a second copy of the pack loaded into
    the same server (two folders in custom_nodes) finds them there, and adding them again would
    make the server refuse its whole table at start."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:  # imported as a library (tests, the command line): no server to serve from
        return
    add_routes(server.routes)


def add_routes(routes: web.RouteTableDef) -> None:
    if not any(isinstance(route, web.RouteDef) and route.path == RECIPES_PATH for route in routes):
        routes.get(RECIPES_PATH)(get_recipes)
