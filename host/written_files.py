"""What the training nodes wrote, so that ComfyUI's cache runs a node again when a file it
wrote is gone (``fingerprint_inputs``, the host's change detection for V3 nodes).

The host keeps a node's outputs while the fingerprint of its constant inputs stays the same;
re-queueing the same graph must not train again while the files are there, and must when one
was deleted. The fingerprint is ``(node, lora_name, generation)``: the generation moves on only
when a file the node wrote for that name has gone (or was replaced by something else).
"""

from __future__ import annotations

import os
from pathlib import Path

_written: dict[tuple[str, str], list[tuple[Path, int, int]]] = {}
_generation: dict[tuple[str, str], int] = {}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def record(node: str, lora_name: str, paths: list[Path]) -> None:
    _written[(node, lora_name)] = [(path, *(_stat(path) or (0, 0))) for path in paths]


def fingerprint(node: str, lora_name: str) -> tuple[str, str, int]:
    key = (node, lora_name)
    if any(_stat(path) != (mtime, size) for path, mtime, size in _written.get(key, [])):
        _generation[key] = _generation.get(key, 0) + 1
        _written.pop(key)
    return node, lora_name, _generation.get(key, 0)
