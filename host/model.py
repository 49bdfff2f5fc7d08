"""The host side of LoRA patching: check the model, find files, patch a clone.

Patches go through ComfyUI's own LoRA machinery (``comfy.lora.load_lora`` on the stock key map,
then ``ModelPatcher.add_patches`` on a clone), so the result is what the stock LoraLoader would
make of the same weights, and the user's model is never touched.
"""

from __future__ import annotations

import math

import comfy.lora
import comfy.model_base
import folder_paths

from ..core import lora_format

LORAS_FOLDER = "loras"


FLUX_NODES = "Train SplitFlux, Load Content LoRA, Load Style LoRA and K-LoRA Fuse"
"""The nodes that take a FLUX.1 model (named in the SDXL-only nodes' refusal)."""


def require_sdxl(model, node_name: str, flux_note: bool = True) -> None:
    """Refuse anything but an SDXL-family UNet, naming what was given, the family the node
    supports and (``flux_note``; the nodes that take FLUX.1 too say so themselves) which nodes
    take FLUX.1."""
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.SDXL):
        found = type(base).__name__ if base is not None else type(model).__name__
        config = getattr(base, "model_config", None)
        detail = f" (detected as {type(config).__name__})" if config is not None else ""
        raise ValueError(
            f"{node_name} needs an SDXL model; the MODEL input is {found}{detail}. B-LoRA blocks exist only in "
            "SDXL's UNet: load an SDXL checkpoint (SDXL base or an SDXL fine-tune) and connect its MODEL output."
            + (f" It supports SDXL only; FLUX.1 models are supported by {FLUX_NODES}." if flux_note else "")
        )


def lora_file_path(lora_name: str) -> str:
    path = folder_paths.get_full_path(LORAS_FOLDER, lora_name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(LORAS_FOLDER))
        raise FileNotFoundError(
            f"LoRA file {lora_name!r} is not in the loras folder ({folders}). Put it there and refresh the page."
        )
    return path


def require_lora_files(*lora_names: str) -> bool:
    """For a node's ``validate_inputs``: True when every name is a file in the loras folder, else
    the node's message is raised. Raised, not returned: the editor's error toast (frontend 1.49+)
    shows a validation exception's message ("<node> failed during validation: <message>"), while
    for a returned one it says only that the node rejected the value (the host's own check would
    only say "Value not in list"); errors while a node runs never reach the toast."""
    for name in lora_names:
        lora_file_path(name)
    return True


def read_lora(lora_name: str) -> lora_format.LoraWeights:
    return lora_format.read_lora_file(lora_file_path(lora_name))


def check_shapes(model, weights: lora_format.LoraWeights) -> None:
    """Every layer must exist in the model with the shape its factors produce.

    ComfyUI logs and skips a patch whose shape does not fit; this pack says so before sampling.
    """
    model_weights = model.model_state_dict("diffusion_model.")
    for path, layer in weights.layers.items():
        key = f"diffusion_model.{path}.weight"
        if key not in model_weights:
            raise lora_format.LoraFormatError(
                f"The model has no layer {path} for this LoRA to patch. Was the LoRA made for another model?"
            )
        expected = tuple(model_weights[key].shape)
        produced = (layer.up.shape[0], *layer.down.shape[1:])
        if expected[0] != produced[0] or math.prod(expected) != math.prod(produced):
            raise lora_format.LoraFormatError(
                f"Layer {path} of the model is {'x'.join(map(str, expected))} but the LoRA makes "
                f"{'x'.join(map(str, produced))}: the LoRA was trained for a different model (SD1.5 or another "
                "architecture). Use a LoRA trained on SDXL."
            )


def patched_clone(model, weights: lora_format.LoraWeights, strength: float):
    """A clone of ``model`` with ``weights`` added at ``strength`` (delta scaled linearly)."""
    check_shapes(model, weights)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora_format.to_comfy_state_dict(weights), key_map)
    clone = model.clone()
    accepted = clone.add_patches(patches, strength)
    if len(accepted) != len(weights.layers):
        missing = sorted(set(f"diffusion_model.{p}.weight" for p in weights.layers) - set(accepted))
        raise lora_format.LoraFormatError(
            f"ComfyUI accepted {len(accepted)} of {len(weights.layers)} LoRA layers; not patched: {missing[:4]}."
        )
    return clone
