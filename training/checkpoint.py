"""Resumable checkpoints: LoRA files any loader reads, plus a ``.trainstate`` sidecar.

The sidecar (safetensors inside, but an extension ComfyUI does not list under loras) holds
everything needed to continue exactly: the trained parameters and buffers as they are (for
UnZipLoRA also the column masks, unbaked), AdamW's moments, the loss history, the gradient
scaler and the run's fingerprint, which a resume must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core import files
from .trainer import TrainingState

TRAINSTATE_SUFFIX = ".trainstate"
CHECKPOINT_TAG = "_checkpoint"


def checkpoint_path(final_path: Path, tag: str = "") -> Path:
    """``<name>_checkpoint<tag>.safetensors`` beside the final file."""
    return final_path.with_name(final_path.stem + CHECKPOINT_TAG + tag + final_path.suffix)


def trainstate_path(final_path: Path) -> Path:
    return final_path.with_name(final_path.stem + CHECKPOINT_TAG + TRAINSTATE_SUFFIX)


def save_checkpoint(trainable: nn.Module, state: TrainingState, sidecar: Path, fingerprint: dict[str, str],
                    lora_files: dict[Path, tuple[dict[str, torch.Tensor], dict[str, str]]]) -> None:
    """Write the sidecar, then each ``path: (state_dict, metadata)`` LoRA file, atomically."""
    tensors = {"losses": torch.tensor(state.losses, dtype=torch.float64)}
    tensors.update({f"trainable.{k}": v.detach().cpu() for k, v in trainable.state_dict().items()})
    for index, moments in (state.optimizer or {}).items():
        for name, value in moments.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    metadata = {
        "step": str(state.step),
        "scaler": json.dumps(state.scaler or {}),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    files.save_safetensors_atomic(tensors, sidecar, metadata)
    for path, (state_dict, lora_metadata) in lora_files.items():
        files.save_safetensors_atomic(state_dict, path, {**lora_metadata, "blora.checkpoint_step": str(state.step)})


def load_checkpoint(sidecar: Path, fingerprint: dict[str, str]) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """The trained module's state dict and the training state; a clear error if the checkpoint
    is missing or from another setup."""
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"No checkpoint to resume from: {sidecar.name} is not in {sidecar.parent}. "
            "Turn 'resume' off to start a new training run."
        )
    with safe_open(str(sidecar), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    saved = json.loads(metadata.get("fingerprint", "{}"))
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differing)
        raise ValueError(f"The checkpoint {sidecar.name} is from a different training setup ({details}). "
                         "Use the same settings to resume, or turn 'resume' off to start over.")
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    trainable = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
        elif key.startswith("trainable."):
            trainable[key[len("trainable."):]] = value
    state = TrainingState(int(metadata["step"]), tensors["losses"].tolist(), optimizer,
                          json.loads(metadata.get("scaler", "{}")))
    return trainable, state


def remove_checkpoint(sidecar: Path, lora_files) -> None:
    for path in [sidecar, *lora_files]:
        Path(path).unlink(missing_ok=True)
