"""Library benchmark: wall time of ``cli.py library train --tiny`` for N images with 1 worker and
with 2, side by side on this machine.

Each round trains the same N images (drawn in code: the sample cup and seeded noise) into a fresh
library once per worker count, the order alternating between rounds so both see the same
machine state; the median wall time of each is reported with the speed-up. The wall time is the
whole command as a user runs it: starting the local Ray instance, ComfyUI in each worker, the
base-model hash, the trainings and the manifest. Each task trains on one CPU thread (Ray gives a
task one CPU), so 1 worker uses one core and 2 workers two.

    python -m bench.library_workers [--images 4] [--steps 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from devkit import PACK_ROOT
from devkit import host as bench_host

WORKER_COUNTS = (1, 2)


def draw_images(folder: Path, count: int) -> None:
    from blora_pack.command_line import sample_image

    sample_image.draw_sample().resize((96, 96)).save(folder / "cup.png")
    for index in range(1, count):
        noise = np.random.default_rng(index).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"noise_{index}.png")


def timed_run(images: Path, library: Path, workers: int, steps: int) -> float:
    command = [sys.executable, "cli.py", "library", "train", "--tiny", "--images", str(images), "--out", str(library),
               "--steps", str(steps), "--workers", str(workers)]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=PACK_ROOT, env={**os.environ, "COMFYUI_PATH": str(bench_host.COMFYUI_PATH)},
                            capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if result.returncode != 0 or f"trained {len(list(images.glob('*.png')))}, failed 0" not in result.stdout:
        sys.exit(f"library train with {workers} workers did not train every image:\n"
                 f"{result.stdout}{result.stderr[-3000:]}")
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    if bench_host.COMFYUI_PATH is None:
        sys.exit(bench_host.NO_HOST_REASON)
    walls = {workers: [] for workers in WORKER_COUNTS}
    with tempfile.TemporaryDirectory(prefix="blora_bench_library_") as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        draw_images(images, args.images)
        for round_number in range(args.rounds):
            order = WORKER_COUNTS if round_number % 2 == 0 else WORKER_COUNTS[::-1]
            for workers in order:
                library = Path(scratch) / f"library_{round_number}_{workers}"
                walls[workers].append(timed_run(images, library, workers, args.steps))
                print(f"round {round_number + 1}, {workers} worker(s): {walls[workers][-1]:.1f} s", flush=True)
    median = {workers: statistics.median(values) for workers, values in walls.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
          "at the end")
    print(f"{args.images} tiny images x {args.steps} steps, median of {args.rounds} round(s)")
    for workers, value in median.items():
        print(f"{workers} worker(s): {value:6.1f} s wall")
    print(f"speed-up 2 workers / 1 worker: {median[1] / median[2]:.2f}x")


if __name__ == "__main__":
    main()
