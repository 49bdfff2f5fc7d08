"""Every file the pack writes, written the way the pack promises (host-free):

- with the mode ``open()`` gives under the process umask (tested under 022 and 077), a replaced
  file keeping its own; LoRAs, checkpoints, records, the manifest, thumbnails and the contact sheet;
- a save killed half-way leaves a temporary file that the next save of the same name removes,
  and nothing else: not other names' temporaries, not look-alikes, not one a running save holds;
- before training, ``check_can_write`` proves the files can be written, and a save that fails
  later says which file and why: a name too long for its temporary name, a read-only file
  system, a folder the process may not write to, a full disk. These are real conditions: a
  tmpfs mounted small or read-only in a private mount namespace (``unshare``), a folder of mode
  0555 (for root, whose privileges ignore modes, in a process that drops them with ``setpriv``);
- output names with control characters are refused with the pack's message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blora_pack.core import files
from blora_pack.command_line import contact_sheet, library_files as library
from blora_pack.training import checkpoint
from blora_pack.training.job import OutputFiles
from blora_pack.training.trainer import TrainConfig, TrainingState
from devkit import PACK_ROOT
from file_systems import private_file_system

NAME_MAX = 255


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def write_every_kind(folder):
    """One file of each kind the pack writes, through the functions that write them; their paths."""
    run = OutputFiles.inside(folder, "b-lora/cup")
    lora, sidecar, checkpoint_lora = run.lora(), run.trainstate, run.checkpoint_lora()
    state = {"layer.lora_down.weight": torch.ones(4, 8), "layer.lora_up.weight": torch.zeros(8, 4)}
    files.save_safetensors_atomic(state, lora, {"blora.method": "B-LoRA"})
    checkpoint.save_checkpoint(torch.nn.Linear(2, 2), TrainingState(3, [0.3, 0.2, 0.1]), sidecar,
                               TrainConfig(steps=3, learning_rate=1e-4), {checkpoint_lora: (state, {"blora.method": "B-LoRA"})})
    image = folder / "cup.png"
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(image)
    record = {"entry": "cup_0123456789ab", "image": "cup.png", "status": library.FAILED, "error": "for the test"}
    written = [lora, sidecar, checkpoint_lora, library.write_record(folder, record),
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


def test_a_name_too_long_for_its_temporary_name_is_found_before_training_and_named_at_save(tmp_path):
    """A 253-character name is legal (the limit is 255), its 267-character temporary name is not."""
    assert os.pathconf(tmp_path, "PC_NAME_MAX") == NAME_MAX
    name = "x" * 241 + ".safetensors"
    (tmp_path / name).write_bytes(b"a legal name")
    (tmp_path / name).unlink()
    with pytest.raises(files.OutputNotWritableError) as refused:
        files.check_can_write(tmp_path / "loras", ["short.safetensors", name], 10_000)
    message = str(refused.value)
    assert f"Cannot write files in {tmp_path / 'loras'}: the name {name!r} is too long" in message
    assert "a temporary name 14 characters longer (267 characters); this file system allows at most 255: shorten " \
           "it by at least 12." in message
    assert isinstance(refused.value.__cause__, OSError) and refused.value.errno == refused.value.__cause__.errno
    assert not list((tmp_path / "loras").iterdir())

    with pytest.raises(files.OutputNotWritableError, match=r"Could not save .*: the name .* is too long"):
        files.save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / name)

    folder = "d" * 256
    with pytest.raises(files.OutputNotWritableError) as refused:
        files.check_can_write(tmp_path / folder / "b-lora", ["cup.safetensors"], 10)
    assert str(refused.value) == (f"Cannot write files in {tmp_path / folder / 'b-lora'}: the folder name {folder!r} is "
                                  "too long (256 characters); this file system allows at most 255: shorten it by at "
                                  "least 1.")


def test_a_folder_in_the_way_and_a_full_disk_are_found_before_training(tmp_path):
    (tmp_path / "cup.safetensors").mkdir()
    in_the_way = "a folder has the name 'cup.safetensors'. Rename or remove that folder, or choose another name."
    with pytest.raises(files.OutputNotWritableError) as refused:
        files.check_can_write(tmp_path, ["other.safetensors", "cup.safetensors"], 1)
    assert str(refused.value) == f"Cannot write files in {tmp_path}: {in_the_way}"
    with pytest.raises(files.OutputNotWritableError) as refused:
        files.save_safetensors_atomic({}, tmp_path / "cup.safetensors")
    assert str(refused.value) == f"Could not save {tmp_path / 'cup.safetensors'}: {in_the_way}"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(files.OutputNotWritableError) as refused:
        files.check_can_write(tmp_path / "loras", ["other.safetensors"], free + 10**9)
    assert f"the disk holding {tmp_path / 'loras'} is full: " in str(refused.value)
    assert f"{files.size_text(free + 10**9)} needed. Free some space there" in str(refused.value)
    assert files.check_can_write(tmp_path / "loras", ["other.safetensors"], 1000) == tmp_path / "loras"


def test_every_folder_of_a_runs_files_is_checked(tmp_path):
    """What a training node asks before it starts: its LoRA and checkpoint files beside each
    other, an export in a folder of its own, not made yet."""
    loras = tmp_path / "loras" / "b-lora"
    export = "x" * 242
    sizes = {loras / "cat.safetensors": 1000, loras / "cat_checkpoint.trainstate": 3000,
             loras / "cat_diffusers" / "pytorch_lora_weights.safetensors": 1000}
    files.check_can_write_files(sizes)
    assert (loras / "cat_diffusers").is_dir() and not list((loras / "cat_diffusers").iterdir())
    with pytest.raises(files.OutputNotWritableError, match=f"Cannot write files in {loras / 'cat_diffusers'}: the name "
                                                           f"'{export}' is too long"):
        files.check_can_write_files({**sizes, loras / "cat_diffusers" / export: 10})
    with pytest.raises(files.OutputNotWritableError, match=f"Cannot write files in {loras}: the disk holding {loras} is "
                                                           "full: .* free, .* needed"):
        files.check_can_write_files({**sizes, loras / "cat.safetensors": shutil.disk_usage(tmp_path).free})


def outcome(code: str, wrapper: tuple[str, ...]) -> dict:
    """What ``code`` (which sets ``call``) raised, run in a fresh process under ``wrapper``."""
    script = code + (
        "\ntry:\n    call()\n    print(json.dumps({}))\n"
        "except Exception as error:\n"
        "    print(json.dumps({'type': type(error).__name__, 'message': str(error), 'errno': getattr(error, 'errno', None),"
        " 'cause': repr(error.__cause__), 'left': sorted(os.listdir(FOLDER)) if os.path.isdir(FOLDER) else None}))\n")
    result = run_python(script, wrapper, capture_output=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_read_only_file_system_is_found_before_training_and_named_at_save(tmp_path):
    mount = tmp_path / "read_only"
    wrapper = private_file_system("ro,size=64k", mount)
    for call in (f"files.check_can_write(Path({str(mount)!r}), ['cup.safetensors'], 10)",
                 f"files.check_can_write(Path({str(mount)!r}) / 'b-lora', ['cup.safetensors'], 10)",
                 f"files.write_atomic(Path({str(mount)!r}) / 'cup.json', lambda t: t.write_text('x'))"):
        raised = outcome(f"FOLDER = {str(mount)!r}\ncall = lambda: {call}", wrapper)
        assert raised["type"] == "OutputNotWritableError" and raised["errno"] == 30, raised
        assert "is on a read-only file system. Choose a folder on a writable disk" in raised["message"]
        assert str(mount) in raised["message"] and "OSError(30, 'Read-only file system')" in raised["cause"]


def test_a_folder_this_process_may_not_write_is_found_before_training_and_named_at_save(tmp_path):
    """Root's privileges ignore a folder's mode, so as root the check runs in a process that
    dropped them (``setpriv``): the folder's mode then applies to it as to anyone."""
    folder = tmp_path / "no_write"
    folder.mkdir()
    folder.chmod(0o555)
    wrapper = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    try:
        for call, saying in (("files.check_can_write(FOLDER, ['cup.safetensors'], 10)", f"Cannot write files in {folder}"),
                             ("files.check_can_write(FOLDER / 'b-lora', ['cup.safetensors'], 10)",
                              f"Cannot write files in {folder / 'b-lora'}"),
                             ("files.save_safetensors_atomic({}, FOLDER / 'cup.safetensors')",
                              f"Could not save {folder / 'cup.safetensors'}")):
            raised = outcome(f"FOLDER = Path({str(folder)!r})\ncall = lambda: {call}", wrapper)
            assert raised["type"] == "OutputNotWritableError" and raised["errno"] == 13, raised
            assert raised["message"].startswith(saying + ": permission denied: this process may not create files there. "
                                                         "Give the user ComfyUI runs as write permission"), raised
            assert raised["left"] == []
    finally:
        folder.chmod(0o755)


def test_a_disk_full_before_training_or_during_a_save_says_which_file_and_why(tmp_path):
    mount = tmp_path / "small"
    wrapper = private_file_system("size=256k", mount)
    preflight = outcome(f"FOLDER = {str(mount)!r}\n"
                        f"call = lambda: files.check_can_write(Path(FOLDER) / 'loras', ['cup.safetensors'], 2 * 10**6)",
                        wrapper)
    assert preflight["type"] == "OutputNotWritableError" and preflight["errno"] == 28, preflight
    assert preflight["message"] == (f"Cannot write files in {mount / 'loras'}: the disk holding {mount / 'loras'} is "
                                    "full: 262 kB free, 2.0 MB needed. Free some space there, or choose a folder on "
                                    "another disk.")

    at_save = outcome(
        f"import torch\nFOLDER = {str(mount)!r}\n"
        "files.save_safetensors_atomic({'small': torch.ones(1000)}, Path(FOLDER) / 'cup.safetensors')\n"
        "call = lambda: files.save_safetensors_atomic({'big': torch.ones(250_000)}, Path(FOLDER) / 'cup.safetensors')",
        wrapper)
    assert at_save["type"] == "OutputNotWritableError" and at_save["errno"] == 28, at_save
    assert at_save["message"].startswith(f"Could not save {mount / 'cup.safetensors'}: the disk holding {mount} is "
                                         "full: ")
    assert at_save["message"].endswith(", this file needs 1.0 MB. Free some space there, or choose a folder on "
                                       "another disk.")
    assert "No space left on device" in at_save["cause"]
    assert at_save["left"] == ["cup.safetensors"], "the old file is kept, the temporary file removed"


def test_a_file_the_pack_saves_is_read_back_as_written(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = files.save_safetensors_atomic(tensors, tmp_path / "x.safetensors", {"k": "v"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items()) and loaded.keys() == tensors.keys()
    assert library.read_metadata(path) == {"k": "v"}
    assert path.stat().st_size <= files.safetensors_bytes(tensors, {"k": "v"})


@pytest.mark.parametrize("name, shown", [("b-lora/my\x00cat", r"'\x00' at position 9"),
                                         ("b-lora/my\ncat", r"'\n' at position 9"),
                                         ("my\tcat", r"'\t' at position 2"),
                                         ("cat\x7f", r"'\x7f' at position 3"),
                                         ("cat\x85", r"'\x85' at position 3")])
def test_names_with_control_characters_are_refused_clearly(tmp_path, name, shown):
    with pytest.raises(files.UnsafeOutputPathError) as refused:
        files.path_inside(tmp_path, name)
    assert f"contains the control character {shown}; a file name cannot hold it. Type the name again" in \
        str(refused.value)


def test_ordinary_names_still_pass(tmp_path):
    assert files.path_inside(tmp_path, "b-lora/my cat é") == tmp_path.resolve() / "b-lora" / "my cat é.safetensors"
