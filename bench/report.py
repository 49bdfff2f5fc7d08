"""What the CPU benchmarks share: their command line (``--size``, ``--steps``, ``--rounds``,
``--json``), the rounds that alternate their sides, and how they print their result: the
machine, the setup, each side's median step time, the ratio pack / reference, and each further
side's ratios to both (also written to ``--json``)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch


def arguments(description: str, size: int, steps: int, size_help: str = "latent size") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--size", type=int, default=size, help=size_help)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="times over every side, in turn")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser


def alternate(sides: dict[str, Callable[[], list[float]]], rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Every side in turn, ``rounds`` times over, so that each sees the machine in the same
    states; each side's step times after the first ``warmup`` of each round (they warm caches up)."""
    samples = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            samples[name] += run()[warmup:]
    return samples


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_ratio(samples: dict[str, list[float]], setup: str, goal: str = "", json_path: Path | None = None) -> None:
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"machine: {machine()}")
    print(setup)
    for name, value in median.items():
        print(f"{name:>9}: {value * 1000:8.1f} ms/step (median)")
    ratio = median["pack"] / median["reference"]
    print(f"ratio pack/reference: {ratio:.3f}" + (f"  ({goal})" if goal else ""))
    for name in [name for name in median if name not in ("pack", "reference")]:
        print(f"ratio {name}/pack: {median[name] / median['pack']:.3f}, {name}/reference: "
              f"{median[name] / median['reference']:.3f}")
    if json_path:
        json_path.write_text(json.dumps({"machine": machine(), "setup": setup, "ratio": ratio,
                                         "ms": {name: 1000 * value for name, value in median.items()},
                                         "steps": {name: len(values) for name, values in samples.items()}}, indent=2))
