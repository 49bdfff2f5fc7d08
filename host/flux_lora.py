"""FLUX LoRA files on a FLUX model, through ComfyUI's own machinery: the stock key map
(``comfy.lora.model_lora_keys_unet``, which maps diffusers' separate q/k/v onto row slices of
``linear1``) and ``ModelPatcher.add_patches`` on a clone, so the result is what the stock
LoraLoader makes of the same tensors and the user's model is never touched."""

from __future__ import annotations

import comfy.lora

from ..core import lora_format


def patched_clone(model, state_dict: dict, strength: float, what: str = "LoRA"):
    """A clone of the FLUX ``model`` with the LoRA ``state_dict`` (any naming the host reads)
    added at ``strength``; every module of the file must be patched."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(state_dict, key_map, log_missing=False)
    modules = {key.rsplit(".lora_", 1)[0] for key in state_dict if ".lora_" in key}
    if len(patches) != len(modules):
        raise lora_format.LoraFormatError(
            f"ComfyUI's FLUX key map takes {len(patches)} of the {len(modules)} layers of this {what}: it was not made "
            "for a FLUX.1 transformer.")
    clone = model.clone()
    clone.add_patches(patches, strength)
    return clone

