"""UnZipLoRA's column masks and mergers: per-output-feature weights on a LoRA's delta.

A "column" in the UnZipLoRA code (which works in ``(in, out)`` layout) is an output feature,
i.e. a row of ``up`` (B). Scaling a LoRA's delta by ``diag(m)`` is exactly scaling the rows of
``up``, so a merge is two ordinary LoRA patches with ``up`` pre-multiplied:
``W = W0 + s_c diag(m_c) B_c A_c + s_s diag(m_s) B_s A_s``.

Merger vectors come from the official ``*_merger_content.pth`` / ``*_merger_style.pth`` files
(keys ``unet.<diffusers module>.lora.merge_content``), or travel inside a pack-trained
safetensors file in its metadata, so that the file's tensors stay a plain LoRA every loader reads.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .lora_format import LoraFormatError, LoraLayer, LoraWeights, module_path_of

MERGER_SUFFIXES = (".lora.merge_content", ".lora.merge_style", ".merger")
MERGERS_METADATA_KEY = "unziplora.mergers"


def read_merger_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Merger vectors by ldm module path, from an official ``.pth`` (weights-only) or a
    ``.safetensors`` file of vectors."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise LoraFormatError(
            f"Could not read the merger file {path.name} ({type(error).__name__}: {error}). Merger files hold "
            "only tensors and are read weights-only; anything else is refused."
        ) from error
    if not isinstance(state_dict, dict) or not state_dict:
        raise LoraFormatError(f"{path.name} is not a merger file: expected a dict of vectors, found "
                              f"{type(state_dict).__name__}.")
    mergers = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            found = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise LoraFormatError(f"{path.name}: {key!r} holds {found}; a merger is one vector per layer.")
        prefix = next((key[: -len(s)] for s in MERGER_SUFFIXES if key.endswith(s)), key)
        try:
            mergers[module_path_of(prefix)] = value.float()
        except KeyError:
            raise LoraFormatError(f"{path.name}: {key!r} names no attention layer of an SDXL UNet.") from None
    return mergers


def mergers_to_metadata(mergers: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save_safetensors_bytes({p: m.float().contiguous() for p, m in mergers.items()})).decode()


def mergers_from_metadata(metadata: dict[str, str], source: str = "the LoRA file") -> dict[str, torch.Tensor] | None:
    """The mergers a pack-trained file carries, or None; damaged ones are refused, naming
    ``source`` (the file) and the metadata key."""
    encoded = metadata.get(MERGERS_METADATA_KEY)
    if not encoded:
        return None
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise damaged_mergers(source, f"not base64 text ({error})") from error
    try:
        mergers = load_safetensors_bytes(data)
    except Exception as error:  # safetensors' own SafetensorError, which it does not export by name
        raise damaged_mergers(source, f"not safetensors data ({type(error).__name__}: {error})") from error
    for path, merger in mergers.items():
        if merger.ndim != 1:
            raise damaged_mergers(source, f"the one for {path} has shape {tuple(merger.shape)}; a merger is one "
                                          "vector per layer")
    return mergers


def damaged_mergers(source: str, what: str) -> LoraFormatError:
    return LoraFormatError(f"{source}: the merger vectors in its metadata ({MERGERS_METADATA_KEY!r}) are damaged: "
                           f"{what}. Train the pair again, or give its merger files (content_merger / style_merger) "
                           "instead.")


def scale_rows(weights: LoraWeights, mergers: dict[str, torch.Tensor], what: str = "LoRA") -> LoraWeights:
    """``diag(m) B A`` for every layer: ``up`` rows times the merger (layers without one keep 1)."""
    unknown = sorted(set(mergers) - set(weights.layers))
    if unknown:
        raise LoraFormatError(f"The {what} merger has vectors for {len(unknown)} layer(s) the LoRA does not have "
                              f"(e.g. {unknown[0]}): it belongs to another LoRA.")
    layers = {}
    for path, layer in weights.layers.items():
        merger = mergers.get(path)
        if merger is None:
            layers[path] = layer
            continue
        if merger.shape[0] != layer.up.shape[0]:
            raise LoraFormatError(f"The {what} merger for {path} has {merger.shape[0]} values but the layer has "
                                  f"{layer.up.shape[0]} output features: it belongs to another LoRA.")
        up = layer.up.float() * merger.to(torch.float32).reshape(-1, *([1] * (layer.up.ndim - 1)))
        layers[path] = LoraLayer(down=layer.down, up=up, alpha=layer.alpha)
    return LoraWeights(layers, dict(weights.metadata), list(weights.other_keys))


def row_energy(delta: torch.Tensor) -> torch.Tensor:
    """How much a delta changes each output feature: the norm of each row."""
    return delta.float().flatten(1).norm(dim=1)


def row_overlap(content_delta: torch.Tensor, style_delta: torch.Tensor) -> float:
    """How much two deltas act on the same output features, in [0, 1]: the cosine between their
    per-row energies. 0 when no output feature is changed by both."""
    a, b = row_energy(content_delta), row_energy(style_delta)
    denominator = a.norm() * b.norm()
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def untrained_column_masks(content: LoraWeights, style: LoraWeights, share: float = 0.5
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Column masks for two LoRAs that were not trained together (this pack's addition).

    In each layer both touch, the output features that both change strongly (each LoRA's row
    energy, relative to its own largest, above ``share``) go to the LoRA for which the feature
    matters more; the other LoRA's row is switched off there. Features only one LoRA uses keep
    both at 1. This lowers :func:`row_overlap` without touching what either LoRA does alone.
    """
    content_masks, style_masks = {}, {}
    for path in sorted(set(content.layers) & set(style.layers)):
        energy_c = row_energy(content.layers[path].delta())
        energy_s = row_energy(style.layers[path].delta())
        relative_c = energy_c / energy_c.max().clamp_min(1e-12)
        relative_s = energy_s / energy_s.max().clamp_min(1e-12)
        contested = (relative_c > share) & (relative_s > share)
        content_masks[path] = torch.where(contested & (relative_s > relative_c), 0.0, 1.0)
        style_masks[path] = torch.where(contested & (relative_c >= relative_s), 0.0, 1.0)
    return content_masks, style_masks
