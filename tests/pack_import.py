"""The pack importable as ``blora_pack`` without the host (its ``__init__`` loads nodes lazily)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_NAME = "blora_pack"
PACK_ROOT = Path(__file__).resolve().parents[1]


def register_pack() -> None:
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
