"""The trainers' memory settings: what each does, and how ``auto`` picks one.

- ``fastest``: the whole fp16 UNet resident, activations kept for backward (no recomputation);
  on FLUX.1, on a GPU whose free memory cannot hold them all, all but the first single blocks'
  (the method's ``fastest_recomputes``), so that 1024 px fits a 24 GB card.
- ``8 GB``: the same weights, with gradient checkpointing of every layer backward traverses
  (``gradient_checkpointing.backward_path_layers``): activations are recomputed in backward
  instead of kept, for about one more forward pass of those layers per step.

Each method's record in the registry (``methods``, ``memory_peak_gib``) holds its whole training
peak per setting at 1024 x 1024 on the full-size model (resident weights included), counted by
``bench/memory_estimate.py`` on the meta device for that method (BENCHMARKS.md);
``auto`` takes the fastest setting whose peak, plus a margin for the CUDA context and the
allocator, fits the free VRAM at start; the peaks are estimates, so if the GPU still runs out
of memory, ``auto`` goes on with the next smaller setting (``smaller_after_oom``).
"""

from __future__ import annotations

from typing import Mapping

AUTO, FASTEST, EIGHT_GB = "auto", "fastest", "8 GB"
SETTINGS = (AUTO, FASTEST, EIGHT_GB)
RESOLVED = (FASTEST, EIGHT_GB)
"""The settings training runs with, fastest first, smallest last."""

MARGIN_GIB = 0.8
"""CUDA context and allocator fragmentation, on top of the estimated peak."""


def resolve(setting: str, peak_gib: Mapping[str, float], free_gib: float | None,
            pixels: int = 1024 * 1024) -> tuple[str, str]:
    """The setting to train with and why, for the status text and the log. ``peak_gib``: the
    method's estimated peak per setting (its registry record). ``free_gib``: free
    VRAM at start (None on a CPU, where memory is not the limit). Peaks scale with the image's
    pixel count for the activation part; the estimate at 1024 x 1024 is used for larger images."""
    if setting not in SETTINGS:
        raise ValueError(f"memory must be one of {SETTINGS}, got {setting!r}.")
    if setting != AUTO:
        return setting, f"memory {setting} (as chosen)"
    if free_gib is None:
        return FASTEST, "memory auto: fastest (no GPU memory limit on this device)"
    scale = max(pixels / (1024 * 1024), 1.0)
    for candidate in (FASTEST, EIGHT_GB):
        needed = peak_gib[candidate] * scale + MARGIN_GIB
        if needed <= free_gib:
            return candidate, f"memory auto: {candidate} (needs about {needed:.1f} GiB, {free_gib:.1f} GiB free)"
    needed = peak_gib[EIGHT_GB] * scale + MARGIN_GIB
    return EIGHT_GB, (f"memory auto: 8 GB, the smallest setting (needs about {needed:.1f} GiB but only "
                      f"{free_gib:.1f} GiB are free: close other programs or lower the image size)")


def smaller_after_oom(chosen: str, resolved: str) -> str | None:
    """The setting to go on with when ``resolved`` ran out of GPU memory: the next smaller one,
    only when the user left the choice to ``auto`` (a setting chosen by hand is kept, and the
    error says what to pick instead)."""
    order = list(RESOLVED)
    if chosen != AUTO or order.index(resolved) == len(order) - 1:
        return None
    return order[order.index(resolved) + 1]


def out_of_memory_advice(resolved: str) -> str:
    if resolved != EIGHT_GB:
        return f"Set memory to '{EIGHT_GB}' (or 'auto', which moves to it by itself)."
    return ("This is the smallest setting: close other programs using the GPU, or train on a smaller image; "
            "a checkpoint of the last completed step is kept, so run again with resume on.")


def recomputed_layers(setting: str, method, free_gib: float | None, pixels: int = 1024 * 1024) -> int | None:
    """How many layers of the backward path (``gradient_checkpointing.backward_path_layers``),
    from its first, recompute their activations in backward under a resolved ``setting`` for
    ``method`` (its registry record): None for every one (``8 GB``). ``fastest`` recomputes none
    where ``free_gib`` holds every activation (or is None: no GPU limit), else the method's
    ``fastest_recomputes`` (0 for most: they keep all anyway)."""
    if setting not in RESOLVED:
        raise ValueError(f"memory {setting!r} is not a resolved setting {RESOLVED}.")
    if setting == EIGHT_GB:
        return None
    if not method.fastest_recomputes or free_gib is None:
        return 0
    keep_all = method.keep_all_peak_gib * max(pixels / (1024 * 1024), 1.0) + MARGIN_GIB
    return 0 if keep_all <= free_gib else method.fastest_recomputes
