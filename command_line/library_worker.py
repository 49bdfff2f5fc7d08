"""What runs inside a Ray worker of ``cli.py library train``: one image's B-LoRA per task.

Each task trains through the same path as ``cli.py train``: a ``Session`` (ComfyUI started as a
library, once per worker process: ``start_comfyui`` is idempotent) builds the same graph (image,
VAE Encode, prompt, **Train B-LoRA**) and ComfyUI's executor runs it (``run_prompt``). There is no
second trainer. What a task adds around it:

- the library's ``loras/`` folder registered as the loras folder, so the node writes there;
- resume: when an earlier attempt left a checkpoint for the same settings (its worker died and
  Ray retried the task, or the whole run was stopped), the node continues from it exactly;
- a record of the attempt (pid, attempts, the step it resumed from, seconds, the error) and a
  log file per image; an error fails this image's record, never the run.

Nothing here imports Ray: the driver (``command_line.library``) wraps these functions as tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import library_files as library
from ..core import files
from ..training import checkpoint
from ..training.job import OutputFiles
from .runner import CommandLineError

CLEAN_ERRORS = (CommandLineError, library.ImageRefused, files.OutputNotWritableError)
"""Errors whose message is written for the user (what was found, what to do): recorded as they are."""


@dataclass(frozen=True)
class WorkerSetup:
    """What every task of one run is given: where things are and how to train."""

    library: str
    comfyui: str | None
    """None: each worker finds ComfyUI itself ($COMFYUI_PATH, two levels above the pack, ~/ComfyUI)."""
    checkpoint: str | None
    tiny: bool
    cpu: bool
    recipe: str
    precision: str
    memory: str
    checkpoint_every: int


@dataclass(frozen=True)
class ImageJob:
    """One image's task, as the driver planned it (its bytes travel beside it)."""

    image_name: str
    image_sha256: str
    entry: str
    prompt: str
    run_id: str
    """Tells a retry of this run's task (same id: count the attempt) from a later run."""


def open_session(setup: WorkerSetup, staging: Path):
    """The command line's own ``Session`` for this worker, with the library's loras folder first
    and the image inbox and outputs in ``staging`` (nothing is left in the host's folders)."""
    from .session import Session

    session = Session(argparse.Namespace(comfyui=setup.comfyui, tiny=setup.tiny, cpu=setup.cpu,
                                         output_dir=str(staging / "output"), checkpoint=setup.checkpoint))
    (staging / "input").mkdir(parents=True, exist_ok=True)
    session.folder_paths.set_input_directory(str(staging / "input"))
    loras = Path(setup.library) / library.LORAS
    loras.mkdir(parents=True, exist_ok=True)
    session.folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return session


@contextlib.contextmanager
def output_to(log: Path):
    """Everything the task prints (ComfyUI, the node's progress bar, warnings) goes to its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as file, contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}", flush=True)
        yield file


def base_model_sha256(setup: WorkerSetup) -> dict:
    """The base-weight hash the train node records (``blora.base_model_sha256``), computed by the
    same host function on the model the graph's loader node loads. ``{"sha256"}`` or ``{"error"}``."""
    import torch

    from .comfyui import pack_module

    try:
        with output_to(Path(setup.library) / library.LOGS / "base_model.log"), \
                tempfile.TemporaryDirectory(prefix="blora_library_") as staging:
            session = open_session(setup, Path(staging))
            loader = session.checkpoint
            node_class = session.nodes.NODE_CLASS_MAPPINGS[loader.class_type]
            with torch.inference_mode():  # as the executor runs a loader
                model = getattr(node_class(), node_class.FUNCTION)(**loader.inputs)[0]
            host_training, methods = pack_module("host.training"), pack_module("methods")
            shapes = host_training.target_shapes(model, methods.by_recipe_name(setup.recipe).layers)
            return {"sha256": host_training.base_weights_sha256(model, shapes)}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def start_record(job: ImageJob, settings: library.Settings, library_dir: Path) -> dict:
    """This attempt's record: a retry within the same run counts one attempt more and keeps the
    first attempt's start; the pid is there at once (the tests kill it)."""
    earlier = library.read_record(library_dir, job.entry) or {}
    retry = earlier.get("run_id") == job.run_id and earlier.get("status") == library.RUNNING
    record = {
        "entry": job.entry, "image": job.image_name, "image_sha256": job.image_sha256, "run_id": job.run_id,
        "settings": settings.as_dict(), "status": library.RUNNING, "error": None,
        "pid": os.getpid(), "host": socket.gethostname(),
        "attempts": earlier.get("attempts", 0) + 1 if retry else 1,
        "started": earlier["started"] if retry else time.time(),
        "resumed_from": None, "seconds": None,
    }
    library.write_record(library_dir, record)
    return record


def checkpoint_to_resume(library_dir: Path, entry: str, settings: library.Settings) -> int | None:
    """The step of a checkpoint left for these settings, or None. A checkpoint of other settings
    (a changed caption, more steps) is removed: resuming it would mix two trainings."""
    outputs = OutputFiles.inside(library_dir / library.LORAS, entry)
    sidecar, lora = outputs.trainstate, outputs.checkpoint_lora()
    if not sidecar.is_file():
        return None
    try:
        if lora.is_file() and not settings.differences(library.read_metadata(lora)):
            return int(library.read_metadata(sidecar)["step"])
        print(f"checkpoint {sidecar.name} is from other settings (or lacks its LoRA file); starting over")
    except Exception as error:  # a damaged checkpoint: start over
        print(f"checkpoint {sidecar.name} unreadable ({error}); starting over")
    checkpoint.remove_checkpoint([sidecar, lora])
    return None


def train_image(setup: WorkerSetup, job: ImageJob, image_bytes: bytes, settings: library.Settings) -> dict:
    """Train one image's B-LoRA into ``LIBRARY/loras/<entry>.safetensors``; returns its record.
    Any error fails this record (with the reason, the traceback in the image's log), not the run."""
    library_dir = Path(setup.library)
    record = start_record(job, settings, library_dir)
    with output_to(library_dir / library.LOGS / f"{job.entry}.log"):
        try:
            with tempfile.TemporaryDirectory(prefix="blora_library_") as staging:
                train_in(Path(staging), setup, job, image_bytes, settings, record)
            record.update(status=library.DONE)
        except Exception as error:
            traceback.print_exc()
            reason = str(error) if isinstance(error, CLEAN_ERRORS) else \
                f"{type(error).__name__}: {error}"
            record.update(status=library.FAILED, error=f"{reason} (log: {library.LOGS}/{job.entry}.log)")
    record["seconds"] = round(time.time() - record["started"], 2)
    library.write_record(library_dir, record)
    return record


def train_in(staging: Path, setup: WorkerSetup, job: ImageJob, image_bytes: bytes, settings: library.Settings,
             record: dict) -> None:
    """The image checked, its thumbnail, the resume decision (recorded before training starts),
    then the graph of ``cli.py train`` with the checkpoint and resume inputs."""
    library_dir = Path(setup.library)
    final = library.lora_path(library_dir, job.entry)
    image = staging / f"{job.entry}{Path(job.image_name).suffix.lower()}"
    image.write_bytes(image_bytes)
    library.check_image(image, job.image_name)
    library.write_thumbnail(image, library_dir / library.THUMBNAILS / f"{job.entry}.png")
    record["resumed_from"] = checkpoint_to_resume(library_dir, job.entry, settings)
    library.write_record(library_dir, record)
    session = open_session(setup, staging)
    session.graph.node("BLoRATrain", model=session.checkpoint.out(0), latents=session.image_latent(str(image)),
                       positive=session.text(settings.prompt), steps=settings.steps,
                       learning_rate=settings.learning_rate, rank=settings.rank, seed=settings.seed,
                       lora_name=job.entry, precision=setup.precision, recipe=settings.recipe,
                       prompt=settings.prompt, memory=setup.memory, checkpoint_every=setup.checkpoint_every,
                       resume=record["resumed_from"] is not None, overwrite=True)
    session.run()
    differing = settings.differences(library.read_metadata(final))
    if differing:
        final.unlink()  # not the LoRA this library asks for
        raise CommandLineError(
            f"{final.name} came out trained with other settings than planned ({'; '.join(differing)}). A differing "
            "base model hash means this node's checkpoint file is not the one the library was planned with: give "
            "every node the same file.")
