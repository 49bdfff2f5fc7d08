"""Writing files so that a crash or Cancel never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` into a temporary file in ``path``'s folder, flushed to disk, then
    renamed over ``path``: a reader never sees half a file, a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    return write_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


class UnsafeOutputPathError(ValueError):
    """An output name that would write outside its folder."""


def path_inside(root: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``root/name`` (with ``suffix`` added if missing), refusing names that leave ``root``:
    absolute paths, drive letters, ``..`` parts, or links that resolve elsewhere."""
    cleaned = name.strip().replace("\\", "/")
    parts = [part for part in cleaned.split("/") if part not in ("", ".")]
    if not parts or cleaned.startswith("/") or ":" in parts[0] or ".." in parts:
        raise UnsafeOutputPathError(
            f"Output name {name!r} must be a file name inside the loras folder, optionally with subfolders "
            "(e.g. 'b-lora/my_cat'); absolute paths and '..' are refused."
        )
    root = Path(root).resolve()
    target = root.joinpath(*parts)
    if not target.name.endswith(suffix):
        target = target.with_name(target.name + suffix)
    if not target.resolve().is_relative_to(root):
        raise UnsafeOutputPathError(f"Output name {name!r} resolves outside the loras folder {root}.")
    return target
