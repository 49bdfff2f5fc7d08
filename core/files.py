"""Writing files so that a crash or Cancel never leaves a half-written one behind.

Every file the pack writes (LoRAs, checkpoints, library records, manifest, thumbnails, contact
sheet) goes through :func:`write_atomic`: written to a hidden temporary file beside it, flushed
to disk, renamed over the target. The temporary file is created as ``open()`` creates a file, so
a new file gets the mode the process umask gives (0644 under umask 022) and a replaced file keeps
the mode it had. A save killed half-way leaves its temporary file behind; the next save of the
same name removes it.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be removed, which protects it instead
    fcntl = None

if TYPE_CHECKING:
    import torch

TEMPORARY_SUFFIX = ".tmp"
RANDOM_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"
RANDOM_LENGTH = 8
"""The random part of a temporary name: ``tempfile.mkstemp``'s alphabet and length, which
earlier versions of the pack used, so their leftovers are recognised too."""
CAN_RENAME_OPEN_FILES = os.name != "nt"


def temporary_name(name: str, random_part: str) -> str:
    return f".{name}.{random_part}{TEMPORARY_SUFFIX}"


def is_temporary_of(candidate: str, name: str) -> bool:
    """Whether ``candidate`` is a temporary name :func:`write_atomic` makes for ``name``."""
    pattern = re.escape(temporary_name(name, "@")).replace("@", f"[{RANDOM_CHARACTERS}]{{{RANDOM_LENGTH}}}")
    return re.fullmatch(pattern, candidate) is not None


def open_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty, locked temporary file beside ``path``: ``(descriptor, its path)``. Made as
    ``open()`` makes files (mode 0666 less the umask); when ``path`` exists, with its mode."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        random_part = "".join(secrets.choice(RANDOM_CHARACTERS) for _ in range(RANDOM_LENGTH))
        temporary = path.with_name(temporary_name(path.name, random_part))
        try:
            handle = os.open(temporary, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        existing = os.stat(path)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        os.chmod(temporary, stat.S_IMODE(existing.st_mode))
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: its temporaries then never look abandoned
            pass
    return handle, temporary


def is_abandoned(temporary: Path) -> bool:
    """Whether no running save holds ``temporary``: a save holds a lock on its temporary file
    until it is renamed, and the lock dies with the process."""
    if fcntl is None:
        return True  # Windows refuses to remove a file a running save has open
    try:
        handle = os.open(temporary, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(handle)


def remove_abandoned_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` that killed saves left (its exact temporary-name
    pattern, regular files, no running save holding them); nothing else. Returns them."""
    removed = []
    with os.scandir(path.parent) as entries:
        candidates = [Path(entry.path) for entry in entries
                      if is_temporary_of(entry.name, path.name) and entry.is_file(follow_symlinks=False)]
    for candidate in candidates:
        if is_abandoned(candidate):
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass
    return removed


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` into a temporary file in ``path``'s folder, flushed to disk, then
    renamed over ``path``: a reader never sees half a file, a crash leaves the old one.
    ``write`` must write into the path it is given (not replace it with another file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(path)
    handle, temporary = open_temporary(path)
    try:
        write(temporary)
        os.fsync(handle)
        if not CAN_RENAME_OPEN_FILES:
            os.close(handle)
            handle = None
        os.replace(temporary, path)
    except BaseException:
        if handle is not None:
            os.close(handle)
            handle = None
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if handle is not None:
            os.close(handle)
    return path


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written through :func:`write_atomic`. The bytes are made in memory and
    written by the pack: safetensors' own ``save_file`` writes its own temporary file (mode 0600,
    left behind under a name of its own when the process is killed) and renames it over the path."""
    from safetensors.torch import save

    data = save({key: value.detach().contiguous().cpu() for key, value in state_dict.items()}, metadata=metadata)
    return write_atomic(path, lambda temporary: temporary.write_bytes(data))


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
