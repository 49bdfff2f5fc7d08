"""What the registry says of a method: its record, its training recipe and the layers it uses.

Plain data (no torch, no host): every other part of the pack reads these facts from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class LayerSet:
    """The layers a method puts LoRA on: in ``blocks`` (None: every block that has them), the
    modules whose path ends with one of ``projections`` inside a transformer block."""

    family: str
    projections: tuple[str, ...]
    blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    """A method's published training numbers. ``name`` is what a node's ``recipe`` combo shows
    (saved in workflows: never renamed); ``sources`` says where each number comes from."""

    name: str
    rank: int
    alpha: float | None
    """None: alpha = rank, i.e. scale 1 (B-LoRA's diffusers ``LoRALinearLayer`` has no alpha)."""
    learning_rate: float
    steps: int
    weight_decay: float
    max_grad_norm: float | None
    """None: no gradient clipping."""
    batch_size: int
    """Images per step (at most the number given)."""
    checkpoint_every: int
    sources: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The method's own numbers beyond the common ones (UnZipLoRA's column separation, ...)."""
    resume_may_raise_steps: bool = True
    """Whether a resumed run may train more steps than the checkpoint's run was set to (not when
    the schedule depends on the step count, as UnZipLoRA's column periods do)."""

    def resolved(self, rank: int = 0, learning_rate: float = 0.0, alpha: float = 0.0) -> tuple[int, float, float]:
        """``(rank, learning rate, alpha)`` to train with: each input given as 0 takes the recipe's
        published value; alpha unset means alpha = rank (scale 1), decided here and nowhere else."""
        rank = rank or self.rank
        alpha = alpha or self.alpha or rank
        return rank, learning_rate or self.learning_rate, float(alpha)

    def unsourced(self) -> list[str]:
        """The numbers with no source (a test keeps this empty)."""
        numbers = [f.name for f in fields(self) if f.name not in ("name", "sources", "settings")]
        return [name for name in [*numbers, *self.settings] if not self.sources.get(name)]


@dataclass(frozen=True)
class Method:
    """One method the pack brings into ComfyUI."""

    key: str
    """The registry key and the command line's name for it (``--recipe``, ``--fuse``)."""
    title: str
    paper: str
    family: str
    """The model family it applies to (``SDXL``)."""
    help: str
    """One line on what it does, for the command line and the nodes' help."""
    nodes: tuple[str, ...]
    """The ids of the nodes that run it, its training node first."""
    layers: LayerSet | None = None
    recipe: Recipe | None = None
    memory_peak_gib: Mapping[str, float] = field(default_factory=dict)
    """Training peak per memory setting at 1024 x 1024 on the full-size model, resident weights
    included, as ``bench/memory_estimate.py`` counts it for this method (BENCHMARKS.md)."""
    fastest_recomputes: int = 0
    """How many layers of the backward path, from its first, ``fastest`` recomputes on a GPU whose
    free memory cannot hold every activation (``training.memory.recomputed_layers``); 0 keeps
    every one. Set where keeping all would not fit the card the setting is for (FLUX.1's single
    blocks at 4608 tokens); ``memory_peak_gib["fastest"]`` is the peak with these recomputed."""
    keep_all_peak_gib: float | None = None
    """With ``fastest_recomputes``: the peak at 1024 px when ``fastest`` keeps every activation,
    what a GPU (or the CPU, which has no such limit) needs free for ``fastest`` to recompute nothing."""
    block_roles: Mapping[str, str] = field(default_factory=dict)
    """Per block, the role the method gives it (see each record)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Numbers of a method that trains nothing (K-LoRA's schedule, ReChar's edges)."""
    sources: Mapping[str, str] = field(default_factory=dict)
    """Where each of ``defaults`` comes from."""
    fuses: bool = False
    """Whether it combines a content LoRA with a style LoRA (the command line's ``--fuse``)."""
    file_label: str = ""
    """What its trained files' ``blora.method`` says, when not the title."""

    def block_of_role(self, role: str) -> str:
        (block,) = [b for b, r in self.block_roles.items() if r == role]
        return block
