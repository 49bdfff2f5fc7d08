"""Thin ComfyUI adapters: schemas, host types in and out; the math lives in ``core`` and
``training``. Every module here that lists ``NODES`` contributes them; the method registry
(``methods``) says which node ids the pack must have, and in which order they are listed."""

from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io

from .. import methods
from ..host import routes


def node_classes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in the registry's order; a registry node with no class, or
    a class no method names, is an error of the pack."""
    by_id = {}
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for node_class in getattr(module, "NODES", ()):
            by_id[node_class.define_schema().node_id] = node_class
    named = list(dict.fromkeys(node_id for method in methods.METHODS for node_id in method.nodes))
    if set(named) != set(by_id):
        raise RuntimeError(f"The registry names nodes {sorted(set(named) - set(by_id))} that no module defines, "
                           f"and modules define {sorted(set(by_id) - set(named))} that no method names.")
    return [by_id[node_id] for node_id in named]


class BLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        routes.register()  # the host loader asks for the node list once, while it loads the pack
        return node_classes()
