"""Finding ComfyUI and starting it in this process, as a library.

Discovery order (the README documents it): ``$COMFYUI_PATH``, the folder two levels above the
pack (its place in a real install, ``ComfyUI/custom_nodes/<pack>``), then ``~/ComfyUI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def candidate_paths() -> list[tuple[str, Path]]:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("$COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"]).expanduser()))
    candidates.append(("two levels above the pack", PACK_ROOT.parents[1]))
    candidates.append(("~/ComfyUI", Path.home() / "ComfyUI"))
    return candidates


def find_comfyui() -> tuple[Path | None, str]:
    """The host checkout and how it was found, or None and why none was."""
    tried = []
    for label, path in candidate_paths():
        if is_comfyui_checkout(path):
            return path.resolve(), f"{label}: {path.resolve()}"
        tried.append(f"{label} ({path})")
    return None, "no ComfyUI checkout at " + ", ".join(tried)


def start_comfyui(path: Path, cpu: bool = True, folders: Path | None = None):
    """Import ComfyUI from ``path`` (on the CPU unless ``cpu`` is False, with plain SDPA
    attention), its built-in nodes, and this pack through the host's own custom-node loader.
    Returns ComfyUI's ``nodes`` module. Idempotent.

    ``folders``: ComfyUI's input, output, temp and user folders and its default loras folder go
    there instead of into the checkout, before any node can write to them (the tests' host)."""
    if "nodes" in sys.modules and hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS") and _pack_module_name() in sys.modules:
        return sys.modules["nodes"]
    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    import utils.extra_config  # noqa: F401  (before `nodes`, which puts comfy/ first on sys.path)
    if folders is not None:
        use_folders(Path(folders))
    import nodes

    with _without_server_only_failures():
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
        raise RuntimeError(f"ComfyUI's custom-node loader could not load the pack at {PACK_ROOT}")
    return nodes


def use_folders(folders: Path) -> None:
    import folder_paths

    for name, set_directory in (("input", folder_paths.set_input_directory),
                                ("output", folder_paths.set_output_directory),
                                ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        (folders / name).mkdir(parents=True, exist_ok=True)
        set_directory(str(folders / name))
    (folders / "loras").mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(folders / "loras"), is_default=True)
SERVER_ONLY_EXTRAS = ("nodes_replacements.py",)
"""Built-in node files that need a running server (0.33's node replacements, which tell the editor
which node replaces a deprecated one, register with ``PromptServer.instance``): started as a
library, ComfyUI reports them as IMPORT FAILED with advice to reinstall its requirements, which
is wrong here; nothing the command line runs uses them."""


class _HeldWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _without_server_only_failures():
    """Hold the host's warnings while it loads its built-in nodes; let them through unless the
    only files that failed are ``SERVER_ONLY_EXTRAS`` (then the failure report is dropped)."""
    root = logging.getLogger()
    held, handlers = _HeldWarnings(), root.handlers[:]
    root.handlers = [held]
    try:
        yield
    finally:
        root.handlers = handlers
        failed = [r.getMessage().split("IMPORT FAILED:", 1)[1].strip() for r in held.records
                  if "IMPORT FAILED:" in r.getMessage()]
        report = set(failed) <= set(SERVER_ONLY_EXTRAS)
        for record in held.records:
            message = record.getMessage()
            if report and (any(name in message for name in SERVER_ONLY_EXTRAS) or "IMPORT FAILED" in message
                           or "did not import correctly" in message or "pip install -r requirements.txt" in message
                           or "might be caused by new missing dependencies" in message or not message.strip()):
                continue
            root.handle(record)


def _pack_module_name() -> str:
    return str(PACK_ROOT).replace(".", "_x_")


def pack_module(submodule: str):
    """A module of this pack as the host loaded it."""
    import importlib

    return importlib.import_module(f"{_pack_module_name()}.{submodule}")
