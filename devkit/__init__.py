"""What the tests, the benchmarks, the tools and ``cli.py`` share: the pack importable as
``blora_pack`` without the host (importing this package does it), ComfyUI started in-process
(``devkit.host``), a real server on loopback (``devkit.server``), headless Chromium on its editor
(``devkit.browser``) and the tiny SDXL models with their diffusers twin (``devkit.tiny_models``).

Run code that uses it from the pack's folder (``python -m pytest``, ``python -m bench.NAME``,
``python -m tools.NAME``), where this package is importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_NAME = "blora_pack"
PACK_ROOT = Path(__file__).resolve().parents[1]


def register_pack() -> None:
    """The pack importable as ``blora_pack`` (its ``__init__`` loads no host code)."""
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


register_pack()
