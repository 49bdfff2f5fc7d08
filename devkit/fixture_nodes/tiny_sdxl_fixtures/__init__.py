"""Test-only ComfyUI nodes: the tiny SDXL checkpoint, text encoder and ControlNet of the pack's
``--tiny`` demo (``command_line/tiny.py``), registered in a real server where the tests need them
in place of the real loaders (no weights can be downloaded). ``tiny.py`` needs nothing of the
pack, so it is loaded from its file, leaving the pack to the host's own loader."""

import importlib.util
from pathlib import Path

_TINY = Path(__file__).resolve().parents[3] / "command_line" / "tiny.py"
_spec = importlib.util.spec_from_file_location("blora_tiny_fixtures", _TINY)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

NODE_CLASS_MAPPINGS = dict(tiny.TINY_NODES)
