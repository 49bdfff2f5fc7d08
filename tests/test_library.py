"""``python cli.py library``, as a user runs it: a fresh process from the pack's folder, a local Ray
instance on this machine's CPUs with 2 workers, the tiny model (``--tiny``), each task training
through ComfyUI inside its worker.

- a folder of 3 images (one unreadable) trains on 2 workers: the manifest and the contact sheet
  say what the files say, the bad image has its own failed entry, the others are done, and the
  command exits with 3 (some image failed) after writing the manifest;
- the same command again trains nothing; ``library index`` rebuilds the same manifest and sheet;
- a worker killed mid-task (SIGKILL to the pid its task records, once a checkpoint exists) is
  retried by Ray, resumes from the checkpoint (the manifest says from which step, and the
  losses of the steps before it are the checkpoint's), and its LoRA equals the uninterrupted one;
- without Ray, ``library train`` says what to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from blora_pack.command_line import sample_image
from blora_pack.command_line import contact_sheet, library_files as library
from devkit import PACK_ROOT
from devkit.host import COMFYUI_PATH, NO_HOST_REASON

STEPS, CHECKPOINT_EVERY = 60, 10
SOME_IMAGES_FAILED = 3
"""The exit code the README documents for a run in which some image failed."""
TRAIN = ["--tiny", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY), "--workers", "2"]


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "cli.py", "library", *arguments]


def environment() -> dict:
    return {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH)}


def run(*arguments: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(cli(*arguments), cwd=PACK_ROOT, env=environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def needs_ray_and_host():
    if COMFYUI_PATH is None:
        pytest.skip(NO_HOST_REASON)
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -r requirements-library.txt")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A cup (its prompt in a sidecar), a noise texture (its prompt in captions.txt), a file that
    is no image."""
    folder = tmp_path_factory.mktemp("images")
    sample_image.draw_sample().resize((96, 96)).save(folder / "cup.png")
    (folder / "cup.txt").write_text("A [v] cup\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "noise.png")
    (folder / "captions.txt").write_text("# name: prompt\nnoise.png: A [v] texture\n")
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    return folder


@pytest.fixture(scope="module")
def trained(needs_ray_and_host, images, tmp_path_factory):
    """The folder trained once; the manifest as that run left it."""
    out = tmp_path_factory.mktemp("library")
    result = run("train", "--images", str(images), "--out", str(out), *TRAIN, expect=SOME_IMAGES_FAILED)
    return out, result, json.loads((out / library.MANIFEST).read_text())


def by_image(manifest: dict) -> dict:
    return {entry["image"]: entry for entry in manifest["images"]}


def test_three_images_on_two_workers_the_bad_one_reported_the_others_done(trained, images):
    out, result, manifest = trained
    assert "local Ray instance (127.0.0.1): 2 CPUs; up to 2 trainings at once" in result.stdout
    assert "3 images: 0 already in the library, 3 to train" in result.stdout
    assert "done=2, failed=1, left=0" in result.stderr  # the one progress bar, at its end
    assert manifest["counts"] == {"done": 2, "failed": 1, "unfinished": 0}
    entries = by_image(manifest)
    assert sorted(entries) == ["broken.png", "cup.png", "noise.png"]

    broken = entries["broken.png"]
    assert broken["status"] == "failed" and broken["file"] is None
    assert "broken.png is not an image that can be read" in broken["error"]
    assert f"failed: broken.png: {broken['error']}" in result.stdout
    assert result.stderr.rstrip().endswith(f"error: 1 image(s) failed; see the manifest ({out / library.MANIFEST}). "
                                           "Exit code 3.")

    for name, prompt in (("cup.png", "A [v] cup"), ("noise.png", "A [v] texture")):
        entry = entries[name]
        data = (images / name).read_bytes()
        assert entry["status"] == "done" and entry["error"] is None and entry["attempts"] == 1
        assert entry["image_sha256"] == library.sha256_of(data)
        assert entry["file"] == f"loras/{library.entry_name(name, library.sha256_of(data))}.safetensors"
        metadata = library.read_metadata(out / entry["file"])
        losses = json.loads(metadata["blora.losses"])
        assert entry["prompt"] == metadata["blora.prompt"] == prompt
        assert entry["steps"] == len(losses) == STEPS and entry["final_loss"] == losses[-1]
        assert entry["settings"] == {"recipe": "B-LoRA blocks (content + style)", "steps": STEPS, "rank": 64,
                                     "learning_rate": 5e-05, "seed": 0, "prompt": prompt,
                                     "base_model_sha256": metadata["blora.base_model_sha256"]}
        assert entry["seconds"] > 0 and entry["resumed_from"] is None
        assert not (out / "loras" / f"{entry['entry']}_checkpoint.safetensors").exists(), "checkpoint removed"


def test_the_contact_sheet_shows_each_thumbnail_beside_its_loss_curve(trained):
    out, _, manifest = trained
    sheet = Image.open(out / library.CONTACT_SHEET).convert("RGB")
    layout = contact_sheet.Layout(len(manifest["images"]))
    assert sheet.size == layout.size
    for index, entry in enumerate(manifest["images"]):
        if entry["status"] != "done":
            curve = np.asarray(sheet.crop(layout.curve_box(index)))
            red = (curve[..., 0] > 150) & (curve[..., 1] < 140) & (curve[..., 2] < 140)
            assert red.sum() > 200, "a failed entry shows its error, in red, where a curve would be"
            continue
        thumbnail = Image.open(out / entry["thumbnail"]).convert("RGB")
        pasted = sheet.crop(layout.thumbnail_box(index, thumbnail.size))
        assert np.array_equal(np.asarray(pasted), np.asarray(thumbnail))
        expected = contact_sheet.curve_picture(library.losses_of(out, entry))
        assert np.array_equal(np.asarray(sheet.crop(layout.curve_box(index))), np.asarray(expected))


def test_the_same_command_again_trains_nothing_and_index_rebuilds_the_same_files(trained, images):
    out, _, first = trained
    loras = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / "loras").iterdir()}
    logs = {path.name: path.read_text() for path in (out / "logs").glob("cup_*.log")}
    result = run("train", "--images", str(images), "--out", str(out), *TRAIN, expect=SOME_IMAGES_FAILED)
    assert "3 images: 2 already in the library, 1 to train" in result.stdout  # the bad image is tried again
    assert "trained 0, failed 1, already in the library 2" in result.stdout
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / "loras").iterdir()} == loras
    assert {path.name: path.read_text() for path in (out / "logs").glob("cup_*.log")} == logs, "no training ran"
    again = json.loads((out / library.MANIFEST).read_text())
    for name in ("cup.png", "noise.png"):
        assert by_image(again)[name] == by_image(first)[name]

    sheet = (out / library.CONTACT_SHEET).read_bytes()
    (out / library.MANIFEST).unlink()
    (out / library.CONTACT_SHEET).unlink()
    result = run("index", str(out))
    assert "manifest:" in result.stdout
    assert json.loads((out / library.MANIFEST).read_text()) == again
    assert (out / library.CONTACT_SHEET).read_bytes() == sheet


def test_a_killed_worker_is_retried_and_resumes_exactly_from_its_checkpoint(trained, images, tmp_path):
    out, _, first = trained
    uninterrupted = by_image(first)["cup.png"]
    folder = tmp_path / "one_image"
    folder.mkdir()
    for name in ("cup.png", "cup.txt"):
        shutil.copy(images / name, folder / name)
    killed_library = tmp_path / "killed"
    record = killed_library / "records" / f"{uninterrupted['entry']}.json"
    checkpoint = killed_library / "loras" / f"{uninterrupted['entry']}_checkpoint.safetensors"

    process = subprocess.Popen(cli("train", "--images", str(folder), "--out", str(killed_library), *TRAIN),
                               cwd=PACK_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    killed, deadline = None, time.monotonic() + 400
    try:
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            if checkpoint.is_file() and record.is_file():
                running = json.loads(record.read_text())
                if running["status"] == "running" and running["attempts"] == 1:
                    os.kill(running["pid"], signal.SIGKILL)
                    killed = running["pid"]
            time.sleep(0.02)
        stdout, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    assert killed is not None, "training finished before its first checkpoint was seen:\n" + stdout + stderr[-2000:]
    assert process.returncode == 0, stdout + stderr[-3000:]

    entry = json.loads((killed_library / library.MANIFEST).read_text())["images"][0]
    assert entry["status"] == "done" and entry["attempts"] == 2
    assert json.loads(record.read_text())["pid"] != killed
    resumed_from = entry["resumed_from"]
    assert resumed_from is not None and CHECKPOINT_EVERY <= resumed_from < STEPS
    assert resumed_from % CHECKPOINT_EVERY == 0, "a checkpoint's step"
    assert entry["steps"] == STEPS, "the losses of the steps before the checkpoint came from it, the rest were trained"
    resumed_file, uninterrupted_file = killed_library / entry["file"], out / uninterrupted["file"]
    losses = [json.loads(library.read_metadata(path)["blora.losses"]) for path in (resumed_file, uninterrupted_file)]
    assert losses[0] == losses[1]
    resumed, expected = load_file(resumed_file), load_file(uninterrupted_file)
    assert resumed.keys() == expected.keys()
    assert all((resumed[key] == expected[key]).all() for key in expected), "resume is exact"


def test_the_readme_documents_the_exit_code_of_failed_images():
    readme = " ".join((PACK_ROOT / "README.md").read_text().split())
    assert f"**{SOME_IMAGES_FAILED} when some image failed** (the run went on, the manifest is written" in readme


def test_library_index_refuses_a_folder_that_is_no_library(tmp_path):
    result = subprocess.run(cli("index", str(tmp_path)), cwd=PACK_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a library (no loras/ or records/ folder in it)" in result.stderr


def test_without_ray_library_train_says_what_to_install(images, tmp_path):
    hide_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv[0] = 'cli.py'; "
                "runpy.run_path('cli.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_ray, "library", "train", "--tiny", "--images", str(images),
                             "--out", str(tmp_path / "library")], cwd=PACK_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f"-m pip install -r {PACK_ROOT / 'requirements-library.txt'}" in result.stderr


def test_prompts_come_from_the_sidecar_then_captions_then_the_default(tmp_path):
    for name in ("a.png", "b.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.txt").write_text("A [v] from its sidecar\n")
    (tmp_path / "captions.txt").write_text("a.png: not this one\nb: A [v] by stem\n\n# c has none\n")
    captions = library.read_captions(tmp_path)
    prompts = {path.name: library.prompt_for(path, captions) for path in library.image_files(tmp_path)}
    assert prompts == {"a.png": "A [v] from its sidecar", "b.png": "A [v] by stem", "c.jpg": "A [v]"}
    (tmp_path / "captions.txt").write_text("no colon here\n")
    with pytest.raises(ValueError, match="line 1: expected 'image name: prompt'"):
        library.read_captions(tmp_path)


def test_a_changed_image_or_setting_is_not_done():
    assert library.entry_name("my cat.png", "ab" * 32) == "my_cat_" + "ab" * 6
    first, changed = (library.entry_name("cat.png", library.sha256_of(data)) for data in (b"1", b"2"))
    assert first != changed, "a changed image is a new entry"
    settings = library.Settings("B-LoRA blocks (content + style)", 60, 64, 5e-05, 0, "A [v]", "f00")
    metadata = {"blora.recipe": settings.recipe, "blora.steps": "60", "blora.rank": "64",
                "blora.learning_rate": "5e-05", "blora.seed": "0", "blora.prompt": "A [v]",
                "blora.base_model_sha256": "f00"}
    assert settings.differences(metadata) == []
    assert settings.differences({**metadata, "blora.steps": "61", "blora.base_model_sha256": "bad"}) == [
        "steps: file '61', wanted 60", "base_model_sha256: file 'bad', wanted 'f00'"]


def test_a_file_the_worker_cannot_write_fails_its_image_with_the_packs_message(tmp_path):
    """A thumbnail whose name a folder holds: the image's record says which file and why, in the
    pack's words (not prefixed with an exception's class name), and the run goes on."""
    from blora_pack.command_line import library_worker

    entry = "cup_0123456789ab"
    (tmp_path / library.THUMBNAILS / f"{entry}.png").mkdir(parents=True)
    setup = library_worker.WorkerSetup(library=str(tmp_path), comfyui=None, checkpoint=None, tiny=True, cpu=True,
                                       recipe="B-LoRA blocks (content + style)", precision="fp32", memory="auto",
                                       checkpoint_every=0)
    job = library_worker.ImageJob(image_name="cup.png", image_sha256="0" * 64, entry=entry, prompt="A [v] cup",
                                  run_id="run")
    image = tmp_path / "cup.png"
    sample_image.draw_sample().resize((96, 96)).save(image)
    settings = library.Settings(recipe=setup.recipe, steps=2, rank=4, learning_rate=1e-4, seed=0, prompt="A [v] cup",
                                base_model_sha256="0" * 64)
    record = library_worker.train_image(setup, job, image.read_bytes(), settings)
    thumbnail = tmp_path / library.THUMBNAILS / f"{entry}.png"
    assert record["status"] == library.FAILED
    assert record["error"] == (f"Could not save {thumbnail}: a folder has the name '{entry}.png'. Rename or remove "
                               f"that folder, or choose another name. (log: {library.LOGS}/{entry}.log)")


def test_an_unreachable_cluster_is_refused_quickly_and_creates_nothing(needs_ray_and_host, images, tmp_path):
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    started = time.monotonic()
    result = run("train", "--tiny", "--ray", address, "--images", str(images), "--out", str(tmp_path / "library"),
                 expect=2)
    assert time.monotonic() - started < 90, "Ray's own retries take minutes"
    assert f"--ray {address}: nothing answers there" in result.stderr and "ray start --head" in result.stderr
    assert not (tmp_path / "library").exists()
