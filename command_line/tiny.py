"""A tiny SDXL-architecture model, for the command line's ``--tiny`` demo and for the tests.

Built with ComfyUI's own classes: the same block names and topology as SDXL (the B-LoRA blocks
``output_blocks.0.1`` and ``.1.1`` each hold two transformer blocks), about 8 M parameters,
fixed-seed random weights, ComfyUI's TAESD as the VAE. Its images are noise: it shows the whole
path working on a CPU in about a minute, nothing more. Two node classes stand in for the
checkpoint loader and the text encoder.
"""

from __future__ import annotations

import hashlib

import torch

TINY_UNET_CONFIG = {
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": 2,
    "context_dim": 64,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_linear_in_transformer": True,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
}
NUM_HEAD_CHANNELS = 16
POOLED_DIM = 1280
CONTEXT_DIM = TINY_UNET_CONFIG["context_dim"]


def seeded_weights(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights for every parameter: fan-in scaled normals, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in module.state_dict().items():
        if name.endswith("weight") and param.ndim >= 2:
            weights[name] = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
        elif name.endswith("weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            weights[name] = 0.02 * torch.randn(param.shape, generator=generator)
    return weights


def build_tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ComfyUI ModelPatcher around a tiny ``model_base.SDXL``."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_UNET_CONFIG))
    config.unet_config["num_head_channels"] = NUM_HEAD_CHANNELS
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    unet = model.diffusion_model
    unet.load_state_dict({k: v.to(dtype) for k, v in seeded_weights(unet, seed).items()})
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def tiny_vae(seed: int = 0):
    """ComfyUI's TAESD with fixed-seed weights (its layers skip initialisation, so a fresh one
    holds whatever memory held: set every parameter, keep its scale/shift buffers)."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    parameters = dict(taesd.named_parameters())
    state = {k: v for k, v in seeded_weights(taesd, seed).items() if k in parameters}
    return comfy.sd.VAE(sd={**taesd.state_dict(), **state})


def tiny_conditioning(text: str):
    """A fixed-seed conditioning of SDXL's layout for ``text``: equal texts, equal conditioning."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 77, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return [[context, {"pooled_output": pooled}]]


def tiny_controlnet(seed: int = 0):
    """An SDXL-architecture ControlNet of the same tiny size, in ComfyUI's own wrapper."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management

    config = {k: v for k, v in TINY_UNET_CONFIG.items() if k != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(**config, num_head_channels=NUM_HEAD_CHANNELS, hint_channels=3,
                                               device=comfy.model_management.unet_offload_device())
    control_model.load_state_dict(seeded_weights(control_model, seed))
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


class TinyControlNetLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    def load(self, seed):
        return (tiny_controlnet(seed),)


class TinySDXLCheckpointLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    def load(self, seed):
        return build_tiny_sdxl(seed), None, tiny_vae(seed)


class TinyTextEncode:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}, "optional": {"clip": ("CLIP",)}}

    def encode(self, text, clip=None):
        return (tiny_conditioning(text),)


TINY_NODES = {"TinySDXLCheckpointLoader": TinySDXLCheckpointLoader, "TinyTextEncode": TinyTextEncode,
              "TinyControlNetLoader": TinyControlNetLoader}


def swap_loaders_for_tiny(prompt: dict) -> dict:
    """An API-format prompt with its checkpoint, text-encoder and ControlNet loaders replaced by
    the tiny stand-ins; everything else in the graph stays as it is."""
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "TinySDXLCheckpointLoader", {"seed": 0}
        elif node["class_type"] == "CLIPTextEncode":
            node["class_type"], node["inputs"] = "TinyTextEncode", {"text": node["inputs"]["text"]}
        elif node["class_type"] == "ControlNetLoader":
            node["class_type"], node["inputs"] = "TinyControlNetLoader", {"seed": 0}
    return prompt
