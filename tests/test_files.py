"""Every file the pack writes, written the way the pack promises (host-free):

- with the mode ``open()`` gives under the process umask (tested under 022 and 077), a replaced
  file keeping its own; LoRAs, checkpoints, records, the manifest, thumbnails and the contact sheet;
- a save killed half-way leaves a temporary file that the next save of the same name removes,
  and nothing else: not other names' temporaries, not look-alikes, not one a running save holds.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blora_pack.core import contact_sheet, files, library
from blora_pack.training import checkpoint
from blora_pack.training.trainer import TrainingState
from devkit import PACK_ROOT


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def write_every_kind(folder):
    """One file of each kind the pack writes, through the functions that write them; their paths."""
    lora, sidecar = folder / "b-lora" / "cup.safetensors", folder / "b-lora" / "cup_checkpoint.trainstate"
    state = {"layer.lora_down.weight": torch.ones(4, 8), "layer.lora_up.weight": torch.zeros(8, 4)}
    files.save_safetensors_atomic(state, lora, {"blora.method": "B-LoRA"})
    checkpoint.save_checkpoint(torch.nn.Linear(2, 2), TrainingState(3, [0.3, 0.2, 0.1]), sidecar, {"seed": "0"},
                               {checkpoint.checkpoint_path(lora): (state, {"blora.method": "B-LoRA"})})
    image = folder / "cup.png"
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(image)
    record = {"entry": "cup_0123456789ab", "image": "cup.png", "status": library.FAILED, "error": "for the test"}
    written = [lora, sidecar, checkpoint.checkpoint_path(lora), library.write_record(folder, record),
               library.write_thumbnail(image, folder / library.THUMBNAILS / f"{record['entry']}.png")]
    manifest = library.build_manifest(folder)
    written += [library.write_manifest(folder, manifest), contact_sheet.write_contact_sheet(folder, manifest)]
    return written


def test_every_kind_of_file_gets_the_mode_open_gives_and_keeps_it_when_replaced(tmp_path, umask):
    reference = tmp_path / "made_by_open"
    open(reference, "w").close()
    written = write_every_kind(tmp_path)
    assert mode_of(reference) == 0o666 & ~umask
    assert {path.name: oct(mode_of(path)) for path in written} == {path.name: oct(0o666 & ~umask) for path in written}

    os.chmod(written[0], 0o640)  # a mode the user chose
    written_again = write_every_kind(tmp_path)
    assert written_again == written
    assert mode_of(written[0]) == 0o640
    assert all(mode_of(path) == 0o666 & ~umask for path in written[1:])
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")], "no temporary file is left"


def test_a_replaced_file_holds_the_new_bytes(tmp_path):
    target = tmp_path / "out.json"
    files.write_atomic(target, lambda temporary: temporary.write_text("old"))
    files.write_atomic(target, lambda temporary: temporary.write_text("new"))
    assert target.read_text() == "new"


def run_python(code: str, wrapper: tuple[str, ...] = (), **options) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python started from the pack's folder, with ``files`` imported."""
    prelude = "import json, os, signal, sys\nfrom pathlib import Path\nimport devkit\nfrom blora_pack.core import files\n"
    return subprocess.run([*wrapper, sys.executable, "-c", prelude + code], cwd=PACK_ROOT, text=True, timeout=120,
                          **options)


def test_the_next_save_removes_what_a_killed_save_left_and_nothing_else(tmp_path):
    target = tmp_path / "cup.safetensors"
    killed = run_python(f"files.write_atomic({str(target)!r}, lambda temporary: (temporary.write_bytes(b'half a fi'), "
                        "os.kill(os.getpid(), signal.SIGKILL)))", capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and files.is_temporary_of(left[0], target.name), left
    assert (tmp_path / left[0]).read_bytes() == b"half a fi"

    decoys = [".other.safetensors.abcd1234.tmp",  # another file's temporary
              ".cup.safetensors.abc1234.tmp", ".cup.safetensors.abcd12345.tmp",  # 7 and 9 random characters
              ".cup.safetensors.ABCD1234.tmp", ".cup.safetensors.abcd-234.tmp",  # characters mkstemp never uses
              "cup.safetensors.abcd1234.tmp", ".cup.safetensors.abcd1234.tmp.bak", ".cup.safetensors.abcd1234.TMP",
              ".xcup.safetensors.abcd1234.tmp", ".cup.safetensorsXabcd1234.tmp", "cup_checkpoint.safetensors"]
    for name in decoys:
        (tmp_path / name).write_bytes(b"keep me")
    (tmp_path / ".cup.safetensors.dir12345.tmp").mkdir()  # the pattern, but a folder
    (tmp_path / ".cup.safetensors.link1234.tmp").symlink_to(tmp_path / "cup_checkpoint.safetensors")  # and a link

    running = subprocess.Popen([sys.executable, "-c", (
        "import sys, devkit\nfrom blora_pack.core import files\n"
        f"files.write_atomic({str(target)!r}, lambda temporary: (temporary.write_bytes(b'slow save'), print('writing', "
        "flush=True), sys.stdin.readline()))")], cwd=PACK_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert running.stdout.readline() == "writing\n"
        in_progress = [p.name for p in tmp_path.iterdir() if files.is_temporary_of(p.name, target.name)
                       and p.is_file() and not p.is_symlink() and p.name != left[0]]
        assert len(in_progress) == 1

        files.write_atomic(target, lambda temporary: temporary.write_bytes(b"whole file"))
        assert target.read_bytes() == b"whole file"
        assert not (tmp_path / left[0]).exists(), "the killed save's temporary file is removed"
        assert (tmp_path / in_progress[0]).read_bytes() == b"slow save", "a running save's file is kept"
        for name in decoys:
            assert (tmp_path / name).read_bytes() == b"keep me", name
        assert (tmp_path / ".cup.safetensors.dir12345.tmp").is_dir()
        assert (tmp_path / ".cup.safetensors.link1234.tmp").is_symlink()
    finally:
        running.communicate("\n", timeout=60)
    assert running.returncode == 0
    assert target.read_bytes() == b"slow save", "the running save finished normally"


def test_a_file_the_pack_saves_is_read_back_as_written(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = files.save_safetensors_atomic(tensors, tmp_path / "x.safetensors", {"k": "v"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items()) and loaded.keys() == tensors.keys()
    assert library.read_metadata(path) == {"k": "v"}
