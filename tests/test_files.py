"""Every file the pack writes, written the way the pack promises (host-free):

- with the mode ``open()`` gives under the process umask (tested under 022 and 077), a replaced
  file keeping its own; LoRAs, checkpoints, records, the manifest, thumbnails and the contact sheet.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blora_pack.core import contact_sheet, files, library
from blora_pack.training import checkpoint
from blora_pack.training.trainer import TrainingState


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


def test_a_file_the_pack_saves_is_read_back_as_written(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = files.save_safetensors_atomic(tensors, tmp_path / "x.safetensors", {"k": "v"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items()) and loaded.keys() == tensors.keys()
    assert library.read_metadata(path) == {"k": "v"}
