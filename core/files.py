"""Writing files so that a crash or Cancel never leaves a half-written one behind, and so that
what goes wrong says which file and why.

Every file the pack writes (LoRAs, checkpoints, library records, manifest, thumbnails, contact
sheet) goes through :func:`write_atomic`: written to a hidden temporary file beside it, flushed
to disk, renamed over the target. The temporary file is created as ``open()`` creates a file, so
a new file gets the mode the process umask gives (0644 under umask 022) and a replaced file keeps
the mode it had. A save killed half-way leaves its temporary file behind; the next save of the
same name removes it. Before a long training, :func:`check_can_write` proves that its files can
be written at all.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import unicodedata
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
TEMPORARY_NAME_EXTRA = len(f"..{'x' * RANDOM_LENGTH}{TEMPORARY_SUFFIX}")
"""How many characters longer than the file's own name its temporary name is (14)."""
CAN_RENAME_OPEN_FILES = os.name != "nt"
UNWRITABLE_CODES = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR,
                    getattr(errno, "EDQUOT", errno.ENOSPC)}
"""The operating system's refusals that have a cause a user can act on."""


class OutputNotWritableError(OSError):
    """A file the pack must write cannot be written: the message names the folder or file, the
    cause in plain words and what to do; ``errno`` is the operating system's code."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


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
    until it is renamed, and the lock dies with the process. (Opened for writing: on NFS an
    exclusive lock needs that.)"""
    if fcntl is None:
        return True  # Windows refuses to remove a file a running save has open
    try:
        handle = os.open(temporary, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
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


def write_atomic(path: str | Path, write: Callable[[Path], None], bytes_needed: int | None = None) -> Path:
    """``write(temporary)`` into a temporary file in ``path``'s folder, flushed to disk, then
    renamed over ``path``: a reader never sees half a file, a crash leaves the old one.

    ``write`` must write into the path it is given (not replace it with another file). A full
    disk, a read-only or forbidden folder or a name too long raise :class:`OutputNotWritableError`
    saying which file and why (``bytes_needed``, when known, is the size it says the file needs)."""
    path = Path(path)
    try:
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
    except OSError as error:
        if isinstance(error, OutputNotWritableError) or error.errno not in UNWRITABLE_CODES:
            raise
        needs = f"this file needs {size_text(bytes_needed)}" if bytes_needed else None
        raise OutputNotWritableError(
            f"Could not save {path}: {unwritable_reason(error.errno, path.parent, path.name, needs)}",
            error.errno) from error
    return path


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written through :func:`write_atomic`. The bytes are made in memory and
    written by the pack: safetensors' own ``save_file`` writes its own temporary file (mode 0600,
    left behind under a name of its own when the process is killed) and renames it over the path."""
    from safetensors.torch import save

    data = save({key: value.detach().contiguous().cpu() for key, value in state_dict.items()}, metadata=metadata)
    return write_atomic(path, lambda temporary: temporary.write_bytes(data), len(data))


def safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About how many bytes a safetensors file of ``state_dict`` takes (a little more, never
    less): the tensors' bytes plus a generous header."""
    data = sum(value.numel() * value.element_size() for value in state_dict.values())
    header = sum(len(key) + 100 for key in state_dict) + sum(len(k) + len(v) + 10 for k, v in (metadata or {}).items())
    return data + header + 4096


def check_can_write(folder: str | Path, file_names: list[str], bytes_needed: int) -> Path:
    """Prove, before any long work, that ``file_names`` can be written into ``folder`` (made if
    missing): a temporary file with the longest temporary name :func:`write_atomic` will use is
    created and removed, no name is taken by a folder, and the disk has ``bytes_needed`` free.
    Raises :class:`OutputNotWritableError` naming the folder, the cause and what to do."""
    folder = Path(folder)
    needs = f"{size_text(bytes_needed)} needed"
    longest = max(file_names, key=lambda name: len(os.fsencode(name)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = open_temporary(folder / longest)
        os.close(handle)
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as error:
        if error.errno not in UNWRITABLE_CODES:
            raise
        raise OutputNotWritableError(f"Cannot write files in {folder}: "
                                     f"{unwritable_reason(error.errno, folder, longest, needs)}",
                                     error.errno) from error
    in_the_way = next((name for name in file_names if (folder / name).is_dir()), None)
    code, name = (errno.EISDIR, in_the_way) if in_the_way else (errno.ENOSPC, longest)
    if in_the_way or free < bytes_needed:
        raise OutputNotWritableError(f"Cannot write files in {folder}: "
                                     f"{unwritable_reason(code, folder, name, needs, free)}", code)
    return folder


def check_can_write_files(sizes: dict[Path, int]) -> None:
    """:func:`check_can_write` for every folder the files ``sizes`` names (path: the bytes it will
    take) will be in, each folder's disk asked for room for all of them (they are usually on one)."""
    folders: dict[Path, list[str]] = {}
    for path in sizes:
        folders.setdefault(Path(path).parent, []).append(Path(path).name)
    for folder, names in folders.items():
        check_can_write(folder, names, sum(sizes.values()))


def unwritable_reason(code: int, folder: Path, name: str, needs: str | None = None, free: int | None = None) -> str:
    """Why a file ``name`` cannot be written in ``folder``, in plain words, and what to do
    (``needs``: how much space is needed, as the message should say it)."""
    if code == errno.ENAMETOOLONG:
        return name_too_long(folder, name)
    if code == errno.EISDIR:
        return f"a folder has the name {name!r}. Rename or remove that folder, or choose another name."
    if code == errno.EROFS:
        return ("the folder is on a read-only file system. Choose a folder on a writable disk, or make "
                "the disk writable (remount it read-write).")
    if code in (errno.EACCES, errno.EPERM):
        return ("permission denied: this process may not create files there. Give the user ComfyUI runs as "
                "write permission on the folder, or choose another folder.")
    if free is None:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
    quota = code == getattr(errno, "EDQUOT", None)
    what = f"your disk quota on the disk holding {folder} is used up" if quota else \
        f"the disk holding {folder} is full"
    numbers = ", ".join(filter(None, [f"{size_text(free)} free" if free is not None else "", needs]))
    return f"{what}{': ' + numbers if numbers else ''}. Free some space there, or choose a folder on another disk."


def name_too_long(folder: Path, name: str) -> str:
    """Which name is too long (a folder's, or the file's while it has its temporary name) and by
    how much."""
    limit = name_limit(folder)
    temporary = temporary_name(name, "x" * RANDOM_LENGTH)
    for part in [*folder.parts, temporary]:
        length = len(os.fsencode(part))
        if limit is not None and length <= limit:
            continue
        unit = "characters" if part.isascii() else "bytes"
        allowed = f"this file system allows at most {limit}: shorten it by at least {length - limit}" \
            if limit is not None else "more than this file system allows: shorten it"
        if part != temporary:
            return f"the folder name {part!r} is too long ({length} {unit}); {allowed}."
        return (f"the name {name!r} is too long. While it is written it has a temporary name "
                f"{TEMPORARY_NAME_EXTRA} characters longer ({length} {unit}); {allowed}.")
    return f"the path {folder / name} is too long for this file system: choose a shorter name or folder."


def name_limit(folder: Path) -> int | None:
    """The longest name the file system holding ``folder`` (or its nearest existing parent) allows."""
    existing = next((path for path in [folder, *folder.parents] if os.path.exists(path)), None)
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def size_text(size: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}" if size < 10 * factor else f"{size / factor:.0f} {unit}"
    return f"{size / 1e3:.0f} kB"


class UnsafeOutputPathError(ValueError):
    """An output name that would write outside its folder, or that no file can have."""


def path_inside(root: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``root/name`` (with ``suffix`` added if missing), refusing names that leave ``root``:
    absolute paths, drive letters, ``..`` parts, or links that resolve elsewhere; and names with
    control characters (a NUL, a line break, a tab), which no file name should hold."""
    control = next((character for character in name if unicodedata.category(character) == "Cc"), None)
    if control is not None:
        raise UnsafeOutputPathError(
            f"Output name {name!r} contains the control character {control!r} at position {name.index(control)}; "
            "a file name cannot hold it. Type the name again with letters, digits, spaces, '-', '_' and '/' for "
            "subfolders.")
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
