"""Resumable checkpoints: LoRA files any loader reads, plus a ``.trainstate`` sidecar.

The sidecar (safetensors inside, but an extension ComfyUI does not list under loras) holds
everything needed to continue exactly: the trained parameters and buffers as they are (for
UnZipLoRA also the column masks, unbaked), AdamW's moments, the loss history, the gradient
scaler and the run's whole configuration, which a resume must match (``resumable_config``).
Every field is checked on loading: a checkpoint that is damaged, out of range or from another
version of the pack is refused with the reason, never resumed into a run that is no longer exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core import files
from .job import PACK_VERSION, LoraFile, config_record
from .trainer import TrainConfig, TrainingState

FORMAT = "2"
"""The sidecar's layout; one written by another layout is refused (its LoRA file stays usable)."""
MAY_CHANGE_ON_RESUME = ("checkpoint_every", "max_bad_steps")
"""Settings that do not change what is trained. ``steps`` may be raised when the recipe allows
it; the seed is the checkpoint's (see ``resumable_config``)."""
OPTIMIZER_MOMENTS = ("step", "exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


def save_checkpoint(trainable: nn.Module, state: TrainingState, sidecar: Path, config: TrainConfig,
                    lora_files: dict[Path, LoraFile]) -> None:
    """Write the sidecar, then each ``path: (state_dict, metadata)`` LoRA file, atomically."""
    tensors = {"losses": torch.tensor(state.losses, dtype=torch.float64)}
    tensors.update({f"trainable.{k}": v.detach().cpu() for k, v in trainable.state_dict().items()})
    optimizer = state.optimizer or {}
    for index, moments in optimizer.items():
        for name, value in moments.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    metadata = {
        "format": FORMAT,
        "pack_version": PACK_VERSION,
        "step": str(state.step),
        "scaler": json.dumps(state.scaler or {}),
        "optimizer_state_of": json.dumps(sorted(int(index) for index in optimizer)),
        "config": json.dumps(config_record(config), sort_keys=True),
    }
    files.save_safetensors_atomic(tensors, sidecar, metadata)
    for path, (state_dict, lora_metadata) in lora_files.items():
        files.save_safetensors_atomic(state_dict, path, {**lora_metadata, "blora.checkpoint_step": str(state.step)})


def _refuse(sidecar: Path, why: str) -> CheckpointError:
    return CheckpointError(f"The checkpoint {sidecar.name} cannot be resumed: {why}. Its LoRA file (the same name "
                           "without .trainstate, .safetensors) still loads; turn 'resume' off to start over.")


def _read(sidecar: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"No checkpoint to resume from: {sidecar.name} is not in {sidecar.parent}. "
            "Turn 'resume' off to start a new training run."
        )
    try:
        with safe_open(str(sidecar), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {}), {key: handle.get_tensor(key) for key in handle.keys() if tensors}
    except Exception as error:
        raise _refuse(sidecar, f"it is not a checkpoint this pack wrote (unreadable as safetensors: {error}); "
                               "it is never unpickled") from None


def recorded_config(sidecar: Path) -> dict:
    """The configuration a checkpoint records (its metadata only), to compare with a resume's
    before its tensors are checked against the run's: a changed rank is reported as a changed
    setting, not as tensors that do not fit."""
    metadata, _ = _read(sidecar, tensors=False)
    _check_format(sidecar, metadata)
    try:
        return json.loads(metadata["config"])
    except (KeyError, ValueError) as error:
        raise _refuse(sidecar, f"its record is incomplete or damaged ({type(error).__name__}: {error})") from None


def _check_format(sidecar: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise _refuse(sidecar, f"it was written by another version of the pack "
                               f"({metadata.get('pack_version', 'before 0.1.0')}, now {PACK_VERSION})")


def load_checkpoint(sidecar: Path, trainable: nn.Module, optimized: list[torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], TrainingState, dict]:
    """The trained module's state dict, the training state and the recorded configuration, each
    checked against ``trainable`` (names and shapes) and against each other. ``optimized``: the
    parameters in the optimizer's order, which its saved state is indexed by (default: the
    trainable's own order; a method's parameter groups may order them otherwise)."""
    metadata, tensors = _read(sidecar)
    _check_format(sidecar, metadata)
    try:
        step = int(metadata["step"])
        recorded = json.loads(metadata["config"])
        scaler = json.loads(metadata["scaler"])
        stateful = json.loads(metadata["optimizer_state_of"])
    except (KeyError, ValueError) as error:
        raise _refuse(sidecar, f"its record is incomplete or damaged ({type(error).__name__}: {error})") from None
    losses = tensors.pop("losses", None)
    if not 1 <= step <= int(recorded.get("steps", 0)):
        raise _refuse(sidecar, f"it claims step {step} of a {recorded.get('steps')}-step run")
    if losses is None or losses.ndim != 1 or losses.numel() != step:
        found = "none" if losses is None else f"{losses.numel()}"
        raise _refuse(sidecar, f"it holds {found} losses for {step} steps")
    trained = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    expected = trainable.state_dict()
    wrong = sorted(k for k in expected.keys() | trained.keys()
                   if k not in trained or k not in expected or trained[k].shape != expected[k].shape)
    if wrong:
        raise _refuse(sidecar, f"its trained tensors do not fit this run's LoRA ({len(wrong)} differ, e.g. {wrong[0]})")
    parameters = list(trainable.parameters()) if optimized is None else list(optimized)
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
    if sorted(optimizer) != sorted(stateful):
        raise _refuse(sidecar, f"its optimizer state is missing or damaged (moments of {len(optimizer)} parameters, "
                               f"recorded {len(stateful)}), so training would no longer continue exactly")
    for index, moments in optimizer.items():
        shape = parameters[index].shape if 0 <= index < len(parameters) else None
        if sorted(moments) != sorted(OPTIMIZER_MOMENTS) or shape is None or moments["exp_avg"].shape != shape:
            raise _refuse(sidecar, f"its optimizer state of parameter {index} is damaged")
    if recorded.get("precision") == "fp16" and "scale" not in scaler:
        raise _refuse(sidecar, "its fp16 gradient scaler state is missing")
    return trained, TrainingState(step, losses.tolist(), optimizer, scaler), recorded


def resumable_config(recorded: dict, current: TrainConfig, may_raise_steps: bool, sidecar: Path) -> TrainConfig:
    """The configuration a resume continues with: the current one with the checkpoint's seed
    (a seed widget set to change after every run must not stop a resume), refused when any
    setting that changes what is trained differs (each listed with both values). ``steps`` may
    be raised to train on when ``may_raise_steps``; a checkpoint at its last step finishes the run."""
    continued = replace(current, seed=int(recorded.get("seed", current.seed)))
    now = config_record(continued)
    ignored = set(MAY_CHANGE_ON_RESUME) | ({"steps"} if may_raise_steps else set())
    names = [f.name for f in fields(TrainConfig) if f.name not in ignored]
    differing = [name for name in names if recorded.get(name) != now.get(name)]
    if differing:
        details = "; ".join(f"{name}: checkpoint {_shown(recorded.get(name))}, now {_shown(now.get(name))}"
                            for name in differing)
        raise CheckpointError(f"The checkpoint {sidecar.name} is from a different training setup ({details}). "
                              "Use the same settings to resume, or turn 'resume' off to start over.")
    return continued


def _shown(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)


def remove_checkpoint(paths) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
