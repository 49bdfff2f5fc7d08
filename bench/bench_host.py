"""What every benchmark does first: make the pack and the test harness importable, then find
ComfyUI as the tests do and start it in this process (or exit saying where it looked)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pack_import  # noqa: E402

pack_import.register_pack()
import host_harness  # noqa: E402


def start_host(cpu: bool = True) -> host_harness.Host:
    path, how = host_harness.find_comfyui()
    if path is None:
        sys.exit(f"needs ComfyUI: {how}")
    return host_harness.start_host(path, cpu=cpu)
