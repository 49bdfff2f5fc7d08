"""The faults a demanding user meets while training, on the real host: nothing lost, nothing
silently wrong.

- Cancel landing after the last step's update (in the host's progress hook) keeps every step,
  and a resume with the same settings writes the files without training (both train nodes);
- an output that cannot be written (a folder where no file can be made, a name whose temporary
  name is too long, a full disk) stops the node before step 1, naming the folder and the cause;
  a save that fails later says which file and why;
- a resume is refused, each differing setting shown with both values, when the learning rate,
  the image or the prompt changed; a tampered or incomplete checkpoint is refused with the
  reason; raising ``steps`` continues the same run;
- the small ones: the pack's messages instead of raw ones, a seed widget that changed since
  the Cancel, the status after Cancel, no silent overwrite.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from devkit import host as host_harness
from devkit import tiny_models
import file_systems

TRAIN, UNZIP_TRAIN = "BLoRATrain", "UnZipLoRATrain"
NEVER = 10**9
"""A step number no test run reaches (``press_cancel_during_step`` as a counter of UNet calls)."""


def train(host, model, steps=3, learning_rate=1e-3, seed=0, name="b-lora/cat", image_seed=0, **optional):
    latents, positive = tiny_models.image_and_prompt(image_seed)
    optional.setdefault("checkpoint_every", 0)
    return host.run_node(TRAIN, model, latents, positive, steps, learning_rate, 4, seed, name, "fp32", **optional)


def train_unzip(host, model, name="uz/cat", steps=3, **optional):
    latents, positive = tiny_models.image_and_prompt(0)
    _, content = tiny_models.image_and_prompt(100)
    _, style = tiny_models.image_and_prompt(200)
    optional.setdefault("checkpoint_every", 0)
    return host.run_node(UNZIP_TRAIN, model, latents, positive, content, style, steps, 1e-3, 1e-3, 5e-3, 4, 3, 0.25,
                         0, name, "fp32", **optional)


def status_of(output) -> str:
    return "".join(output.ui["text"])


def same_tensors(first: Path, second: Path) -> bool:
    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def cancelled(host, monkeypatch, run, after_step: int | None = None, during_step: int | None = None):
    """``run()`` with the host's Cancel pressed after (or during) a step."""
    import comfy.model_management

    with monkeypatch.context() as patch:
        if after_step is not None:
            host_harness.press_cancel_after_step(host, patch, after_step)
        else:
            host_harness.press_cancel_during_step(host, patch, during_step)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run()


# A. Cancel in the last step

@pytest.mark.parametrize("node", ["B-LoRA", "UnZipLoRA"])
def test_cancel_after_the_last_step_then_resume_writes_the_files_without_training(host, loaded_sdxl, loras_dir,
                                                                                   monkeypatch, node):
    run = (lambda **kw: train(host, loaded_sdxl, **kw)) if node == "B-LoRA" else \
        (lambda **kw: train_unzip(host, loaded_sdxl, **kw))
    folder, roles = ("b-lora", [""]) if node == "B-LoRA" else ("uz", ["_content", "_style"])
    run(name=f"{folder}/straight")
    cancelled(host, monkeypatch, lambda: run(name=f"{folder}/cut"), after_step=3)
    with safe_open(str(loras_dir / folder / f"cut_checkpoint{roles[0]}.safetensors"), "pt") as handle:
        assert handle.metadata()["blora.checkpoint_step"] == "3", "the last step's work is kept"

    with monkeypatch.context() as patch:
        calls = host_harness.press_cancel_during_step(host, patch, NEVER)
        output = run(name=f"{folder}/cut", resume=True)
    assert calls["n"] == 0, "nothing more is trained"
    assert "(3 steps, last loss" in status_of(output)
    for role in roles:
        assert same_tensors(loras_dir / folder / f"cut{role}.safetensors", loras_dir / folder / f"straight{role}.safetensors")
    assert not (loras_dir / folder / "cut_checkpoint.trainstate").exists()


# B. An output that cannot be written is found before step 1

@contextmanager
def immutable(folder: Path):
    """``folder`` made immutable (``chattr +i``): no file can be created in it, not even by root."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs) to make a folder no process can write to")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this file system has no immutable flag (chattr: {made.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def no_step_may_run(host, monkeypatch):
    host_training = host.pack("host.training")
    monkeypatch.setattr(host_training, "unet_predict", lambda *a: pytest.fail("training started"))


def test_a_folder_where_no_file_can_be_made_stops_the_node_before_step_1(host, loaded_sdxl, loras_dir, monkeypatch):
    files = host.pack("core.files")
    (loras_dir / "b-lora").mkdir()
    no_step_may_run(host, monkeypatch)
    with immutable(loras_dir / "b-lora"), pytest.raises(files.OutputNotWritableError) as refused:
        train(host, loaded_sdxl)
    assert str(refused.value).startswith(f"Cannot write files in {loras_dir / 'b-lora'}: permission denied: this "
                                         "process may not create files there. Give the user ComfyUI runs as write ")


def test_a_name_whose_temporary_name_is_too_long_stops_the_node_before_step_1(host, loaded_sdxl, loras_dir,
                                                                            monkeypatch):
    files = host.pack("core.files")
    name = "c" * (255 - len("_checkpoint.safetensors"))  # every final name fits; the temporary ones do not
    no_step_may_run(host, monkeypatch)
    with pytest.raises(files.OutputNotWritableError) as refused:
        train(host, loaded_sdxl, name=name)
    message = str(refused.value)
    assert message.startswith(f"Cannot write files in {loras_dir}: the name '{name}_checkpoint.safetensors' is too long. "
                              f"While it is written it has a temporary name {files.TEMPORARY_NAME_EXTRA} characters "
                              "longer"), message
    assert "this file system allows at most 255: shorten it by at least" in message
    assert list(loras_dir.iterdir()) == []


def test_a_full_disk_stops_the_node_before_step_1_saying_how_much_is_needed(host, loaded_sdxl, loras_dir, monkeypatch):
    files = host.pack("core.files")
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    no_step_may_run(host, monkeypatch)
    with pytest.raises(files.OutputNotWritableError, match=rf"^Cannot write files in {loras_dir / 'b-lora'}: the disk "
                                                           rf"holding {loras_dir / 'b-lora'} is full: 1 kB free, "
                                                           r"[\d.]+ [kMG]B needed\. Free some space there, or choose a "
                                                           "folder on another disk."):
        train(host, loaded_sdxl)


def test_a_save_that_fails_after_training_says_which_file_and_why(host, loaded_sdxl, loras_dir, monkeypatch):
    """The folder stops taking files during training (as a disk that fills does): the final save
    says which file and why, in the pack's words."""
    files = host.pack("core.files")
    (loras_dir / "b-lora").mkdir()
    host_training = host.pack("host.training")
    real = host_training.unet_predict
    locked = []

    def locking_predict(*args):
        predict = real(*args)

        def run(*inputs):
            if not locked:
                locked.append(subprocess.run(["chattr", "+i", str(loras_dir / "b-lora")]).returncode)
            return predict(*inputs)

        return run

    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs)")
    monkeypatch.setattr(host_training, "unet_predict", locking_predict)
    try:
        with pytest.raises(files.OutputNotWritableError) as failed:
            train(host, loaded_sdxl, steps=2)
    finally:
        subprocess.run(["chattr", "-i", str(loras_dir / "b-lora")], check=True)
    if locked != [0]:
        pytest.skip("this file system has no immutable flag")
    assert str(failed.value).startswith(f"Could not save {loras_dir / 'b-lora' / 'cat.safetensors'}: permission "
                                        "denied: this process may not create files there."), str(failed.value)
    assert not [p for p in (loras_dir / "b-lora").iterdir()], "nothing half-written is left"


@pytest.mark.parametrize("subfolder", ["missing", "there"])
def test_a_read_only_file_system_as_the_loras_folder_stops_the_node_before_step_1(host, loaded_sdxl, loras_dir,
                                                                                  monkeypatch, subfolder):
    """A real read-only file system (a tmpfs remounted ``ro``) as the loras folder, with or
    without the run's subfolder on it: the operating system's EROFS, not a patched refusal."""
    files = host.pack("core.files")
    no_step_may_run(host, monkeypatch)
    with file_systems.mounted_tmpfs(loras_dir):
        if subfolder == "there":
            (loras_dir / "b-lora").mkdir()
        file_systems.read_only(loras_dir)
        with pytest.raises(files.OutputNotWritableError) as refused:
            train(host, loaded_sdxl)
    assert refused.value.errno == errno.EROFS
    assert str(refused.value) == (f"Cannot write files in {loras_dir / 'b-lora'}: the folder is on a read-only file "
                                  "system. Choose a folder on a writable disk, or make the disk writable (remount it "
                                  "read-write).")


def test_a_disk_that_fills_during_training_fails_the_save_naming_the_file_and_keeps_the_earlier_lora(
        host, loaded_sdxl, loras_dir, monkeypatch):
    """A 3 MB tmpfs as the loras folder: the check before step 1 passes, then something else
    fills the disk during the training (from the host's progress hook, after step 1), and the
    final save of a LoRA replacing an earlier one does not fit."""
    import comfy.utils

    files = host.pack("core.files")
    lora = loras_dir / "b-lora" / "cat.safetensors"
    with file_systems.mounted_tmpfs(loras_dir, "3m"):
        train(host, loaded_sdxl, steps=2)
        earlier = lora.read_bytes()
        filled = []

        def fill_the_disk(value, total, preview_image, prompt_id=None, node_id=None):
            if value == 1:
                filled.append(file_systems.fill(loras_dir, leave=len(earlier) // 2))

        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", fill_the_disk)
        with pytest.raises(files.OutputNotWritableError) as failed:
            train(host, loaded_sdxl, steps=2, learning_rate=2e-3, overwrite=True)
        assert filled, "the disk filled after the check before step 1"
        message = str(failed.value)
        assert failed.value.errno == errno.ENOSPC
        assert re.fullmatch(rf"Could not save {re.escape(str(lora))}: the disk holding {re.escape(str(lora.parent))} "
                            r"is full: \d+ kB free, this file needs [\d.]+ [kM]B\. Free some space there, or choose a "
                            r"folder on another disk\.", message), message
        assert not re.search(r"os error|Errno|SafetensorError|No space left", message), "never the raw library text"
        assert lora.read_bytes() == earlier, "the earlier LoRA of the same name survives"
        assert sorted(path.name for path in lora.parent.iterdir()) == ["cat.safetensors"], "no temporary file is left"


# C. Resume accepts only the run it continues

def cancel_during_step_3(host, model, monkeypatch, **settings):
    cancelled(host, monkeypatch, lambda: train(host, model, steps=6, **settings), during_step=3)


@pytest.mark.parametrize("changed, differs", [
    ({"learning_rate": 5e-3}, "learning_rate: checkpoint 0.001, now 0.005"),
    ({"image_seed": 1}, "images_sha256: checkpoint '"),
    ({"prompt_seed": 1}, "conditioning_sha256: checkpoint '"),
])
def test_resume_with_other_settings_is_refused_naming_each_with_both_values(host, loaded_sdxl, loras_dir, monkeypatch,
                                                                          changed, differs):
    cancel_during_step_3(host, loaded_sdxl, monkeypatch)
    latents, positive = tiny_models.image_and_prompt(0)
    other_latents, other_positive = tiny_models.image_and_prompt(1)
    latents = other_latents if changed.get("image_seed") else latents
    positive = other_positive if changed.get("prompt_seed") else positive
    with pytest.raises(ValueError) as refused:
        host.run_node(TRAIN, loaded_sdxl, latents, positive, 6, changed.get("learning_rate", 1e-3), 4, 0, "b-lora/cat",
                      "fp32", checkpoint_every=0, resume=True)
    message = str(refused.value)
    assert message.startswith("The checkpoint cat_checkpoint.trainstate is from a different training setup (") and \
        message.endswith("). Use the same settings to resume, or turn 'resume' off to start over."), message
    assert differs in message and message.count("checkpoint ") == 2, "the one differing setting, with both values"


def tamper(sidecar: Path, metadata: dict | None = None, drop_prefix: str | None = None) -> None:
    with safe_open(str(sidecar), "pt") as handle:
        recorded = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {key: value for key, value in tensors.items() if not (drop_prefix and key.startswith(drop_prefix))}
    save_file(tensors, str(sidecar), {**recorded, **(metadata or {})})


@pytest.mark.parametrize("damage, why", [
    ({"metadata": {"step": "-5"}}, "it claims step -5 of a 6-step run"),
    ({"drop_prefix": "optimizer."}, "its optimizer state is missing or damaged (moments of 0 parameters, recorded "),
])
def test_a_tampered_or_incomplete_checkpoint_is_refused_with_the_reason(host, loaded_sdxl, loras_dir, monkeypatch,
                                                                        damage, why):
    checkpoint = host.pack("training.checkpoint")
    cancel_during_step_3(host, loaded_sdxl, monkeypatch)
    tamper(loras_dir / "b-lora" / "cat_checkpoint.trainstate", **damage)
    no_step_may_run(host, monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match=r"^The checkpoint cat_checkpoint\.trainstate cannot be "
                                                         r"resumed: " + why.replace("(", r"\(")):
        train(host, loaded_sdxl, steps=6, resume=True)


def test_raising_steps_continues_the_same_run(host, loaded_sdxl, loras_dir, monkeypatch):
    cancel_during_step_3(host, loaded_sdxl, monkeypatch)
    output = train(host, loaded_sdxl, steps=8, resume=True)
    assert len(output.result[3]["loss"]) == 8
    with safe_open(str(loras_dir / "b-lora" / "cat.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["blora.config"])["steps"] == 8


# F and G. The small ones

def test_a_seed_widget_changed_since_the_cancel_does_not_stop_the_resume(host, loaded_sdxl, loras_dir, monkeypatch):
    """A seed widget on "randomize" (ComfyUI's default for a node from the search) has a new
    value when the user re-queues to resume: the checkpoint's seed is used."""
    train(host, loaded_sdxl, steps=6, name="b-lora/straight")
    cancel_during_step_3(host, loaded_sdxl, monkeypatch)
    output = train(host, loaded_sdxl, steps=6, seed=673523960, resume=True)
    assert output.result[1] == "b-lora/cat.safetensors"
    assert same_tensors(loras_dir / "b-lora" / "cat.safetensors", loras_dir / "b-lora" / "straight.safetensors")


def test_the_status_after_cancel_says_what_was_saved_and_how_to_resume(host, loaded_sdxl, loras_dir, monkeypatch,
                                                                       caplog):
    with caplog.at_level(logging.WARNING):
        cancel_during_step_3(host, loaded_sdxl, monkeypatch)
    with safe_open(str(loras_dir / "b-lora" / "cat_checkpoint.trainstate"), "pt") as handle:
        step = handle.metadata()["step"]
    assert (f"Cancelled: the checkpoint at step {step} of 6 is saved (b-lora/cat_checkpoint.trainstate). To continue, "
            "turn 'resume' on and run again with the same settings (the seed is taken from the checkpoint); to start "
            "over, leave 'resume' off.") in caplog.text


def test_a_finished_lora_is_never_overwritten_unless_asked(host, loaded_sdxl, loras_dir):
    train(host, loaded_sdxl, steps=2)
    first = (loras_dir / "b-lora" / "cat.safetensors").read_bytes()
    again = train(host, loaded_sdxl, steps=2, learning_rate=2e-3)
    assert again.result[1] == "b-lora/cat_2.safetensors"
    assert status_of(again).startswith("saved b-lora/cat_2.safetensors (2 steps")
    assert status_of(again).endswith("(b-lora/cat.safetensors exists: turn 'overwrite' on to replace it)")
    assert (loras_dir / "b-lora" / "cat.safetensors").read_bytes() == first
    replaced = train(host, loaded_sdxl, steps=2, learning_rate=2e-3, overwrite=True)
    assert replaced.result[1] == "b-lora/cat.safetensors"
    assert status_of(replaced).endswith("; replaced the earlier b-lora/cat.safetensors")
    assert same_tensors(loras_dir / "b-lora" / "cat.safetensors", loras_dir / "b-lora" / "cat_2.safetensors")


def test_a_nul_in_the_name_and_a_pickle_for_a_checkpoint_get_the_packs_messages(host, loaded_sdxl, loras_dir,
                                                                                 monkeypatch):
    files, checkpoint = host.pack("core.files"), host.pack("training.checkpoint")
    no_step_may_run(host, monkeypatch)
    with pytest.raises(files.UnsafeOutputPathError, match=r"contains the control character '\\x00' at position 8"):
        train(host, loaded_sdxl, name="b-lora/c\x00at")
    (loras_dir / "b-lora").mkdir()
    torch.save({"step": 2}, loras_dir / "b-lora" / "cat_checkpoint.trainstate")  # a pickle
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be resumed: it is not a checkpoint this pack wrote "
                                                         r"\(unreadable as safetensors: .*\); it is never unpickled"):
        train(host, loaded_sdxl, resume=True)
