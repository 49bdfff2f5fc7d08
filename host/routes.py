"""HTTP routes for the front end, from the method registry: which nodes train (they get the
live loss chart) and each recipe's published defaults (rank, learning rate, alpha, steps),
which the editor fills in when a recipe is chosen; and the older host's node for each newer one
a shipped workflow uses (``workflow_format.OLDER_HOST_NODES``), which the editor puts in its
place on a host that lacks the newer."""

from __future__ import annotations

from aiohttp import web

from .. import methods
from ..command_line.workflow_format import OLDER_HOST_NODES

METHODS_PATH = "/blora/methods"


def methods_for_the_editor() -> dict:
    """Per recipe name, the Train node's widget values that recipe starts from (alpha 0 = the
    recipe's own); and the training nodes."""
    recipes = {m.recipe.name: {"rank": m.recipe.rank, "learning_rate": m.recipe.learning_rate, "alpha": 0.0,
                               "steps": m.recipe.steps}
               for m in methods.METHODS if m.recipe is not None}
    return {"training_nodes": methods.training_nodes(), "recipes": recipes,
            "older_host_nodes": {new: list(older) for new, older in OLDER_HOST_NODES.items()}}


async def get_methods(request):
    return web.json_response(methods_for_the_editor())


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
    if not any(isinstance(route, web.RouteDef) and route.path == METHODS_PATH for route in routes):
        routes.get(METHODS_PATH)(get_methods)
