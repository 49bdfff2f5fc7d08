"""Test-only ComfyUI nodes: the tiny SDXL checkpoint and text encoder of the pack's ``--tiny``
demo (command_line/tiny.py), registered in a real server where the tests need them in place of
the checkpoint and text-encoder loaders (no weights can be downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pack_import  # noqa: E402

pack_import.register_pack()
from blora_pack.command_line.tiny import TINY_NODES  # noqa: E402

NODE_CLASS_MAPPINGS = dict(TINY_NODES)
