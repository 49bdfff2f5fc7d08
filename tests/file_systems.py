"""Real small and read-only file systems for tests (tmpfs), so that what the pack meets is the
operating system's own refusal (``EROFS``, ``ENOSPC``), not a patched function's.

- ``private_file_system``: a command prefix running one process in its own mount namespace
  with a tmpfs mounted for it (host-free tests, no root needed where user namespaces work);
- ``mounted_tmpfs`` / ``read_only`` / ``fill``: a tmpfs mounted on a folder of this process
  (node tests: the host runs in the test process and must see the mount), needs root; skips
  with the reason where mounting is not permitted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def private_file_system(options: str, mount_point) -> tuple[str, ...]:
    """A command prefix that runs the rest in a private mount namespace with a tmpfs mounted at
    ``mount_point`` (e.g. ``size=256k`` or ``ro``); gone with the process."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small or read-only file system for one process")
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this system refuses a private mount namespace (unshare: {probe.stderr.strip()})")
    mount_point.mkdir()
    return ("unshare", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && '
            'exec "$@"', "sh", options, str(mount_point))


@contextmanager
def mounted_tmpfs(folder: Path, size: str = "3m"):
    """A tmpfs of ``size`` mounted on ``folder`` for the block, seen by this whole process (and
    unmounted after it)."""
    if os.name != "posix" or shutil.which("mount") is None:
        pytest.skip("needs mount (util-linux) to mount a small or read-only file system")
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only file system for the host's loras folder needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this system refuses to mount a tmpfs (mount: {made.stderr.strip()})")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


def read_only(mount_point: Path) -> None:
    """Make the file system mounted at ``mount_point`` read-only (``remount,ro``)."""
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True)


def fill(mount_point: Path, leave: int) -> Path:
    """Fill the file system at ``mount_point`` with a file until about ``leave`` bytes are free."""
    filler = mount_point / "filler"
    with open(filler, "wb") as handle:
        handle.write(bytes(max(shutil.disk_usage(mount_point).free - leave, 0)))
    return filler
