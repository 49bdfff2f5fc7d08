"""``python cli.py library train|index``: a B-LoRA for every image of a folder, on Ray.

The driver (this process, which never starts ComfyUI) plans the library and hands each image
that still needs training to Ray as one task; a worker trains it with the pack's own trainer
through the same graph as ``cli.py train`` (``command_line.library_worker``). Ray is an optional
dependency (``requirements-library.txt``): without ``--ray`` a local Ray instance is started for
the run, on loopback only; with ``--ray ADDRESS`` the tasks go to that cluster.

- Idempotent: an image whose LoRA exists for the same image bytes (the file name holds their
  hash), settings and base-model hash (the file's metadata) is not trained again.
- Nothing lost: every task checkpoints; a task whose worker dies is retried by Ray
  (``--retries``) and resumes from its last checkpoint; one bad image fails its own entry.
- The result: ``LIBRARY/manifest.json`` and ``LIBRARY/contact_sheet.png``, rebuilt from the files
  by ``library index`` (the files' metadata is the truth), and one progress bar for the run.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import library_files as library
from ..training import memory as memory_settings
from . import training_options
from .comfyui import PACK_ROOT
from .runner import CommandLineError

if TYPE_CHECKING:
    from .library_worker import ImageJob

REQUIREMENTS = PACK_ROOT / "requirements-library.txt"
SOME_IMAGES_FAILED = 3
"""``library train``'s exit code when the run finished, manifest written, but some image failed
(2: the command itself could not run; 0: every image is in the library)."""
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""A local instance: with clusters off, Ray binds and connects on 127.0.0.1 only; no usage report."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise CommandLineError(
            "library needs Ray, which the pack does not install by default. Install it into the Python "
            f"that runs this command: {sys.executable} -m pip install -r {REQUIREMENTS}") from None
    return ray


@dataclass
class PlannedImage:
    """One image of the folder: its bytes and the job a worker gets for it."""

    path: Path
    data: bytes
    job: ImageJob


def plan_images(folder: Path, run_id: str) -> list[PlannedImage]:
    from .library_worker import ImageJob

    if not folder.is_dir():
        raise CommandLineError(f"--images {folder}: no such folder. Make it and copy your reference images into it "
                               "(one B-LoRA each), or name the folder that holds them.")
    files = library.image_files(folder)
    if not files:
        raise CommandLineError(f"--images {folder}: no image in it (looked for {', '.join(library.IMAGE_SUFFIXES)}).")
    try:
        captions = library.read_captions(folder)
    except ValueError as error:
        raise CommandLineError(str(error)) from None
    planned = {}
    for path in files:
        data = path.read_bytes()
        sha256 = library.sha256_of(data)
        entry = library.entry_name(path.name, sha256)
        if entry in planned:  # e.g. cup.png and cup.PNG, same bytes: one LoRA
            print(f"{path.name} is the same image as {planned[entry].path.name}; training it once.")
            continue
        planned[entry] = PlannedImage(path, data, ImageJob(path.name, sha256, entry, library.prompt_for(path, captions),
                                                           run_id))
    return list(planned.values())


CONNECT_TIMEOUT_S = 10.0


def require_reachable(address: str) -> None:
    """Refuse a cluster address nothing answers at, within ``CONNECT_TIMEOUT_S`` (Ray itself
    retries for minutes, logging every attempt). ``auto`` (the address this machine's ``ray start``
    wrote) is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise CommandLineError(f"--ray {address}: give the head node as HOST:PORT (e.g. 10.0.0.5:6379), or auto.")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise CommandLineError(f"--ray {address}: nothing answers there ({error.strerror or error}). Start the head "
                               f"node with 'ray start --head --port={port}' on {host}, or check the address and that "
                               "the port is open to this machine.") from None


@contextmanager
def ray_cluster(ray, address: str | None, workers: int):
    """Connected to the cluster at ``address``, or to a local instance started for this run.
    Either way the workers import this pack as ``cli.py`` does (the pack's folder on their path,
    ``devkit`` registering it), so the pack must sit at the same path on every node."""
    python_path = os.pathsep.join(filter(None, [str(PACK_ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path}, "worker_process_setup_hook": "devkit.register_pack"}
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, runtime_env=runtime_env)
    if address:
        require_reachable(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, object_store_memory=256 * 2**20,
                     **quiet)
    except Exception as error:
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray instance"
        raise CommandLineError(f"Could not {where}: {type(error).__name__}: {error}") from None
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def gpus_per_task(ray, args) -> float:
    """``--gpus-per-task``, or 1 when the cluster has GPUs (0 with ``--cpu``)."""
    available = ray.cluster_resources().get("GPU", 0)
    wanted = 0 if args.cpu else args.gpus_per_task
    if wanted is None:
        return 1 if available else 0
    if wanted > available:
        raise CommandLineError(f"--gpus-per-task {wanted:g}, but the Ray cluster has {available:g} GPUs; "
                               "give --gpus-per-task 0 (or --cpu) to train on CPUs.")
    return wanted


def run_description(ray, address: str | None, gpus: float) -> str:
    resources = ray.cluster_resources()
    where = f"Ray cluster at {address}" if address else "local Ray instance (127.0.0.1)"
    slots = resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 0)
    return (f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; up to {slots:g} "
            f"trainings at once ({gpus:g} GPU each)" if gpus else
            f"{where}: {resources.get('CPU', 0):g} CPUs; up to {slots:g} trainings at once on CPUs")


def check_options(args) -> None:
    if args.ray and args.workers:
        raise CommandLineError("--workers sizes a local Ray instance; with --ray the cluster's own resources decide "
                               "how many trainings run at once.")
    for option, value, least in (("--steps", args.steps, 1), ("--workers", args.workers, 1),
                                 ("--checkpoint-every", args.checkpoint_every, 0), ("--retries", args.retries, 0)):
        if value is not None and value < least:
            raise CommandLineError(f"{option} must be at least {least}, got {value}.")
    if not args.tiny and not args.checkpoint:
        raise CommandLineError("Give --checkpoint (an SDXL file in ComfyUI's checkpoints folder on every node) or "
                               "run with --tiny.")


def settings_for(args, prompt: str, base_model_sha256: str) -> library.Settings:
    """What ``cli.py train`` would train with these options (the recipe's values where none is given)."""
    recipe = training_options.RECIPES[args.recipe].recipe
    rank, learning_rate, _alpha = recipe.resolved(args.rank or 0, args.learning_rate or 0.0)
    steps = training_options.steps_for(args.steps, args.tiny, recipe)
    return library.Settings(recipe.name, steps, rank, learning_rate, args.seed, prompt, base_model_sha256)


def command_library_train(args) -> None:
    from .library_worker import WorkerSetup, base_model_sha256, train_image

    check_options(args)
    if not args.ray:
        for name, value in LOOPBACK_ONLY.items():
            os.environ.setdefault(name, value)  # before Ray is imported: it reads them then
    ray = import_ray()
    library_dir = Path(args.out).expanduser().resolve()
    images = plan_images(Path(args.images).expanduser().resolve(), uuid.uuid4().hex)

    with ray_cluster(ray, args.ray, args.workers or os.cpu_count() or 1):
        library_dir.mkdir(parents=True, exist_ok=True)  # once connected: a refused run creates nothing
        gpus = gpus_per_task(ray, args)
        print(run_description(ray, args.ray, gpus))
        setup = WorkerSetup(str(library_dir), args.comfyui, args.checkpoint, args.tiny, gpus == 0,
                            training_options.RECIPES[args.recipe].recipe.name, args.precision, args.memory, args.checkpoint_every)
        options = dict(num_cpus=1, num_gpus=gpus, max_retries=args.retries, max_calls=0)
        hashed = ray.get(ray.remote(**options)(base_model_sha256).remote(setup))
        if "error" in hashed:
            raise CommandLineError(f"The base model could not be loaded on a worker: {hashed['error']} "
                                   f"(log: {library_dir / library.LOGS / 'base_model.log'}).")
        planned = [(image, settings_for(args, image.job.prompt, hashed["sha256"])) for image in images]
        todo = [(image, settings) for image, settings in planned if not is_done(library_dir, image.job, settings)]
        kept = len(images) - len(todo)
        print(f"{len(images)} images: {kept} already in the library, {len(todo)} to train "
              f"({planned[0][1].steps} steps each, recipe {args.recipe})")
        train = ray.remote(**options)(train_image)
        try:
            results = run_with_progress(ray, {train.remote(setup, image.job, image.data, settings): image.job
                                              for image, settings in todo}, library_dir, args.retries)
        except KeyboardInterrupt:
            write_index(library_dir)  # what finished is in; the rest resumes from its checkpoints next time
            raise
    failed = print_summary(library_dir, write_index(library_dir), results, kept)
    if failed:
        print(f"error: {failed} image(s) failed; see the manifest ({library_dir / library.MANIFEST}). Exit code "
              f"{SOME_IMAGES_FAILED}.", file=sys.stderr)
        raise SystemExit(SOME_IMAGES_FAILED)


def print_summary(library_dir: Path, manifest: dict, results: list[dict], kept: int) -> int:
    """The run's counts, each failure with its reason, the index; returns how many failed."""
    failed = [record for record in results if record["status"] != library.DONE]
    print(f"trained {len(results) - len(failed)}, failed {len(failed)}, already in the library {kept}")
    for record in failed:
        print(f"failed: {record['image']}: {record['error']}")
    print_index(library_dir, manifest)
    return len(failed)


def print_index(library_dir: Path, manifest: dict) -> None:
    print(f"manifest: {library_dir / library.MANIFEST} ({manifest['counts']})")
    print(f"contact sheet: {library_dir / library.CONTACT_SHEET}")


def is_done(library_dir: Path, job: ImageJob, settings: library.Settings) -> bool:
    path = library.lora_path(library_dir, job.entry)
    if not path.is_file():
        return False
    try:
        metadata = library.read_metadata(path)
    except Exception:  # damaged: train it again
        return False
    return library.is_finished_lora(metadata) and not settings.differences(metadata)


def run_with_progress(ray, pending: dict, library_dir: Path, retries: int) -> list[dict]:
    """Wait for every task, one progress bar over them all (done / failed / left, ETA)."""
    from tqdm import tqdm

    results, failed = [], 0
    with tqdm(total=len(pending), desc="library", unit="image", file=sys.stderr) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:  # the task itself raised (it records its own failures)
                cause = error.cause
                record = record_failure(library_dir, job, f"the task raised {type(cause).__name__}: {cause}")
            except ray.exceptions.RayError as error:  # every attempt's worker died
                record = record_failure(library_dir, job, (
                    f"the worker training it died on all {retries + 1} attempts ({type(error).__name__}); its last "
                    f"checkpoint is kept: run the command again to resume it (log: {library.LOGS}/{job.entry}.log)"))
            results.append(record)
            failed += record["status"] != library.DONE
            bar.set_postfix(done=len(results) - failed, failed=failed, left=len(pending))
            bar.update(1)
    return results


def record_failure(library_dir: Path, job: ImageJob, error: str) -> dict:
    """The record of a task that could not write its own: its worker died on every attempt (out
    of memory, a lost node), or it failed before it could record anything."""
    record = library.read_record(library_dir, job.entry) or {"entry": job.entry, "image": job.image_name,
                                                              "image_sha256": job.image_sha256, "started": time.time()}
    record.update(status=library.FAILED, seconds=round(time.time() - record["started"], 2), error=error)
    library.write_record(library_dir, record)
    return record


def write_index(library_dir: Path) -> dict:
    from . import contact_sheet

    manifest = library.build_manifest(library_dir)
    library.write_manifest(library_dir, manifest)
    contact_sheet.write_contact_sheet(library_dir, manifest)
    return manifest


def command_library_index(args) -> None:
    library_dir = Path(args.library).expanduser().resolve()
    if not (library_dir / library.LORAS).is_dir() and not (library_dir / library.RECORDS).is_dir():
        raise CommandLineError(f"{library_dir} is not a library (no {library.LORAS}/ or {library.RECORDS}/ folder in "
                               "it); make one with: python cli.py library train --images DIR --out LIBRARY ...")
    print_index(library_dir, write_index(library_dir))


def add_parser(commands) -> None:
    """``library train`` and ``library index`` under the command line's subcommands."""
    parser = commands.add_parser("library", help="a B-LoRA for every image of a folder, on Ray (local or a cluster)",
                                 description="A B-LoRA for every image of a folder, trained on Ray (a local "
                                             "instance started for the run, or a cluster).")
    actions = parser.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train every image of a folder that is not in the library yet")
    train.add_argument("--images", required=True, metavar="DIR",
                       help="the images (optional prompts: a sidecar <image>.txt, or 'name: prompt' lines in "
                            "captions.txt; default 'A [v]')")
    train.add_argument("--out", required=True, metavar="LIBRARY", help="the library folder (made if missing)")
    train.add_argument("--checkpoint", help="an SDXL checkpoint in ComfyUI's checkpoints folder (on every node)")
    train.add_argument("--tiny", action="store_true", help="a tiny random SDXL-architecture model (images are noise)")
    train.add_argument("--ray", metavar="ADDRESS",
                       help="a Ray cluster (e.g. HEAD:6379 or ray://HEAD:10001); default: a local instance for the run")
    train.add_argument("--workers", type=int, help="local instance only: trainings at once (default: one per CPU core; "
                                                   "with GPUs, at most one per GPU)")
    train.add_argument("--gpus-per-task", type=float, help="GPUs each training takes (default: 1 if the cluster has "
                                                           "GPUs, else 0)")
    train.add_argument("--cpu", action="store_true", help="train on CPUs even where GPUs are present")
    training_options.add_recipe_arguments(train)
    train.add_argument("--seed", type=int, default=0)
    training_options.add_precision_argument(train)
    train.add_argument("--memory", choices=memory_settings.SETTINGS, default=memory_settings.AUTO,
                       help="training memory, as cli.py train --memory")
    train.add_argument("--checkpoint-every", type=int, default=100,
                       help="steps between checkpoints, what a retried task resumes from (default 100)")
    train.add_argument("--retries", type=int, default=3, help="times Ray retries a task whose worker died (default 3)")
    train.add_argument("--comfyui", help="ComfyUI folder on the workers (default: each finds its own: $COMFYUI_PATH, "
                                         "two levels above the pack, ~/ComfyUI)")
    train.set_defaults(run=command_library_train)
    index = actions.add_parser("index", help="rebuild manifest.json and contact_sheet.png from the library's files")
    index.add_argument("library", metavar="LIBRARY")
    index.set_defaults(run=command_library_index)
