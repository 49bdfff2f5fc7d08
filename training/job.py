"""A training run as one host-free job: its resolved configuration, every file it writes (all
derived from the one name the user gave), what it trains and how each file is built.

A method builds its job (``lora_job`` here for B-LoRA and the style recipe,
``unziplora.unziplora_job``); the host runs any job the same way (``host/training_run.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core import files, lora_format, sdxl_unet
from ..core.lora_format import LoraWeights
from ..methods import Method
from .lora_adapters import LoraAdapterSet
from .trainer import TrainConfig, TrainingMethod

PACK_VERSION = "0.1.0"
"""Recorded in every trained file; equal to pyproject.toml's (a test keeps them so)."""
CHECKPOINT_TAG = "_checkpoint"
TRAINSTATE_SUFFIX = ".trainstate"
LORA_SUFFIX = ".safetensors"

LoraFile = tuple[dict[str, torch.Tensor], dict[str, str]]
"""A file's tensors and metadata."""


@dataclass(frozen=True)
class OutputFiles:
    """Every path a run writes, from ``lora_name`` (relative to the loras folder ``root``):

    - the LoRA file of each role: ``<name>.safetensors``, or ``<name>_<role>.safetensors`` for
      a method with roles (UnZipLoRA's ``content`` and ``style``), under ``final_name`` (the
      name itself, or the next free ``<name>_2``, ``<name>_3``... when a finished file of that
      name exists and overwriting was not asked for);
    - its checkpoint: ``<name>_checkpoint[_<role>].safetensors`` (LoRA files any loader reads)
      and ``<name>_checkpoint.trainstate``, always under the name asked for, so a resume finds it;
    - the official diffusers export: ``<name>_diffusers/pytorch_lora_weights.safetensors``.
    """

    root: Path
    name: str
    roles: tuple[str, ...] = ("",)
    final_name: str = ""

    @classmethod
    def inside(cls, root: str | Path, lora_name: str, roles: tuple[str, ...] = ("",),
               overwrite: bool = True) -> "OutputFiles":
        """The files of ``lora_name`` in ``root``; a name that leaves ``root`` is refused
        (``files.UnsafeOutputPathError``)."""
        root = Path(root).resolve()
        name = files.path_inside(root, lora_name).relative_to(root).as_posix()[:-len(LORA_SUFFIX)]
        chosen = cls(root, name, roles, name)
        number = 1
        while not overwrite and any(path.exists() for path in chosen.lora_files()):
            number += 1
            chosen = cls(root, name, roles, f"{name}_{number}")
        return chosen

    def _path(self, name: str, tag: str = "", suffix: str = LORA_SUFFIX) -> Path:
        return self.root / f"{name}{tag}{suffix}"

    def lora(self, role: str = "") -> Path:
        return self._path(self.final_name or self.name, f"_{role}" if role else "")

    def lora_files(self) -> list[Path]:
        return [self.lora(role) for role in self.roles]

    def checkpoint_lora(self, role: str = "") -> Path:
        return self._path(self.name, CHECKPOINT_TAG + (f"_{role}" if role else ""))

    def checkpoint_files(self) -> list[Path]:
        return [self.checkpoint_lora(role) for role in self.roles]

    @property
    def trainstate(self) -> Path:
        return self._path(self.name, CHECKPOINT_TAG, TRAINSTATE_SUFFIX)

    @property
    def diffusers_export(self) -> Path:
        return self.root / f"{self.final_name or self.name}_diffusers" / "pytorch_lora_weights.safetensors"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def replaced(self) -> list[Path]:
        """The finished files this run will write over."""
        return [path for path in self.lora_files() if path.exists()]


def config_record(config: TrainConfig) -> dict:
    """The configuration as JSON-ready values (what checkpoints and files record)."""
    return json.loads(json.dumps(asdict(config), sort_keys=True))


def file_metadata(method: Method, config: TrainConfig, blocks: list[str], prompt: str) -> dict[str, str]:
    """What a trained file says about itself (safetensors metadata: strings only): the whole
    configuration, and its common numbers under their own keys (kohya's too) for other tools."""
    return {
        "blora.method": method.file_label or method.title,
        "blora.recipe": config.recipe,
        "blora.blocks": json.dumps(blocks),
        "blora.rank": str(config.rank),
        "blora.alpha": f"{config.alpha:g}",
        "blora.steps": str(config.steps),
        "blora.learning_rate": str(config.learning_rate),
        "blora.seed": str(config.seed),
        "blora.precision": config.precision,
        "blora.prompt": prompt,
        "blora.base_model_sha256": config.base_model_sha256,
        "blora.config": json.dumps(config_record(config), sort_keys=True),
        "blora.pack_version": PACK_VERSION,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_base_model_version": "sdxl_base_v1-0",
    }


def blocks_of(paths) -> list[str]:
    return sorted({sdxl_unet.block_of(path) for path in paths})


@dataclass
class TrainingJob:
    """One training run, ready for the host: the trainer's inputs and what to write."""

    method: Method
    config: TrainConfig
    files: OutputFiles
    trainable: nn.Module
    build_files: Callable[[TrainConfig, str], LoraFile]
    """(configuration, role) -> the LoRA file of that role as trained so far."""
    training_method: TrainingMethod | None = None
    weight_wrappers: dict = field(default_factory=dict)
    module_wrappers: dict = field(default_factory=dict)
    exports: Callable[[], dict[Path, LoraFile]] = dict
    """Files only the finished run writes (the official diffusers export)."""

    def optimized_parameters(self) -> list[nn.Parameter]:
        """The parameters in the order the optimizer holds them (its state is indexed so)."""
        method = self.training_method or TrainingMethod(self.trainable, self.config.learning_rate)
        return [parameter for group in method.parameter_groups() for parameter in group["params"]]

    def lora_file(self, role: str = "") -> LoraFile:
        return self.build_files(self.config, role)

    def checkpoint_loras(self) -> dict[Path, LoraFile]:
        return {self.files.checkpoint_lora(role): self.lora_file(role) for role in self.files.roles}

    def final_files(self) -> dict[Path, LoraFile]:
        return {**{self.files.lora(role): self.lora_file(role) for role in self.files.roles}, **self.exports()}

    def file_sizes(self) -> dict[Path, int]:
        """Every file the run may write, with the bytes it takes on disk at most: each LoRA file
        (final, checkpoint, export) and the trainstate (parameters, two AdamW moments), which
        also counts the temporary copy of the largest file while it replaces the old one."""
        parameters = self.trainable.state_dict()
        loras = {role: files.safetensors_bytes(*self.lora_file(role)) for role in self.files.roles}
        trainstate = 3 * files.safetensors_bytes(parameters)
        sizes = {self.files.lora(role): size for role, size in loras.items()}
        sizes.update({self.files.checkpoint_lora(role): size for role, size in loras.items()})
        sizes[self.files.trainstate] = trainstate + max(trainstate, sum(loras.values()))
        if self.exports is not dict:
            sizes[self.files.diffusers_export] = sum(loras.values())
        return sizes


def lora_job(method: Method, config: TrainConfig, files_: OutputFiles, shapes: dict[str, tuple[int, int]],
             prompt: str, export_diffusers: bool = False) -> TrainingJob:
    """Plain LoRA on ``shapes`` (B-LoRA's blocks, the style recipe's attention layers): one
    adapter per layer with the official init from the seed, one file."""
    adapters = LoraAdapterSet(shapes, config.rank, config.alpha)
    adapters.reset(config.seed)

    def build(config: TrainConfig, role: str = "") -> LoraFile:
        metadata = file_metadata(method, config, blocks_of(shapes), prompt)
        return lora_format.to_kohya_state_dict(adapters.to_lora_weights()), metadata

    def exports() -> dict[Path, LoraFile]:
        official = lora_format.to_official_state_dict(adapters.to_lora_weights())
        return {files_.diffusers_export: (official, {"format": "pt"})}

    return TrainingJob(method, config, files_, adapters, build, weight_wrappers=adapters.weight_wrappers(),
                       exports=exports if export_diffusers else dict)


def trained_weights(job: TrainingJob, role: str = "") -> LoraWeights:
    """The LoRA of ``role`` as the job's files hold it."""
    state_dict, metadata = job.lora_file(role)
    return lora_format.read_lora_state_dict(state_dict, metadata)
