"""Resumable checkpoints: a LoRA file any loader reads, plus a ``.trainstate`` sidecar.

The sidecar (safetensors inside, but an extension ComfyUI does not list under loras) holds
AdamW's moments, the loss history, the gradient scaler and the run's fingerprint, so resuming
continues exactly, and refuses a run with other layers, rank or seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..core import files, lora_format
from .trainer import TrainingState

TRAINSTATE_SUFFIX = ".trainstate"
CHECKPOINT_TAG = "_checkpoint"


def checkpoint_path(final_path: Path) -> Path:
    return final_path.with_name(final_path.stem + CHECKPOINT_TAG + final_path.suffix)


def trainstate_path(lora_path: Path) -> Path:
    return lora_path.with_suffix(TRAINSTATE_SUFFIX)


def save_checkpoint(lora_weights: lora_format.LoraWeights, state: TrainingState, path: Path,
                    fingerprint: dict[str, str]) -> Path:
    tensors = {"losses": torch.tensor(state.losses, dtype=torch.float64)}
    for index, moments in (state.optimizer or {}).items():
        for name, value in moments.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    metadata = {
        "step": str(state.step),
        "scaler": json.dumps(state.scaler or {}),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    files.save_safetensors_atomic(tensors, trainstate_path(path), metadata)
    files.save_safetensors_atomic(lora_format.to_kohya_state_dict(lora_weights), path,
                                  {**lora_weights.metadata, "blora.checkpoint_step": str(state.step)})
    return path


def load_checkpoint(path: Path, fingerprint: dict[str, str]) -> tuple[lora_format.LoraWeights, TrainingState]:
    """The LoRA and training state saved at ``path``; a clear error if they do not fit this run."""
    sidecar = trainstate_path(path)
    if not path.is_file() or not sidecar.is_file():
        raise FileNotFoundError(
            f"No checkpoint to resume from: {path.name} and {sidecar.name} must both exist in {path.parent}. "
            "Turn 'resume' off to start a new training run."
        )
    weights = lora_format.read_lora_file(path)
    with safe_open(str(sidecar), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    saved = json.loads(metadata.get("fingerprint", "{}"))
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differing)
        raise ValueError(f"The checkpoint {path.name} is from a different training setup ({details}). "
                         "Use the same settings to resume, or turn 'resume' off to start over.")
    step = int(metadata["step"])
    if weights.metadata.get("blora.checkpoint_step") != str(step):
        raise ValueError(f"{path.name} and {sidecar.name} are from different steps; the checkpoint is incomplete.")
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
    state = TrainingState(step, tensors["losses"].tolist(), optimizer, json.loads(metadata.get("scaler", "{}")))
    return weights, state


def remove_checkpoint(path: Path) -> None:
    trainstate_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
