"""How the CPU benchmarks print their result: the machine, the setup, each side's median step
time, the ratio pack / reference, and each further side's ratios to both."""

from __future__ import annotations

import platform
import statistics

import torch


def print_ratio(samples: dict[str, list[float]], setup: str, goal: str = "") -> None:
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(setup)
    for name, value in median.items():
        print(f"{name:>9}: {value * 1000:8.1f} ms/step (median)")
    print(f"ratio pack/reference: {median['pack'] / median['reference']:.3f}" + (f"  ({goal})" if goal else ""))
    for name in [name for name in median if name not in ("pack", "reference")]:
        print(f"ratio {name}/pack: {median[name] / median['pack']:.3f}, {name}/reference: "
              f"{median[name] / median['reference']:.3f}")
