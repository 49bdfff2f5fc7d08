"""Test-only ComfyUI nodes: a tiny SDXL-architecture checkpoint and text encoder.

They stand in for the checkpoint and text-encoder loaders when the tests run real workflows
through a real ComfyUI server (no weights can be downloaded). The model is built with ComfyUI's
own classes (tests/tiny_models.py); the VAE is ComfyUI's own TAESD; the "text encoder" turns a
prompt into a fixed-seed conditioning of SDXL's shape, so equal prompts give equal conditioning.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tiny_models  # noqa: E402


class TinySDXLCheckpointLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    def load(self, seed):
        import comfy.sd
        import comfy.taesd.taesd

        torch.manual_seed(seed)
        vae = comfy.sd.VAE(sd=comfy.taesd.taesd.TAESD().state_dict())
        return tiny_models.build_tiny_sdxl(seed), None, vae


class TinyTextEncode:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}, "optional": {"clip": ("CLIP",)}}

    def encode(self, text, clip=None):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, 77, tiny_models.CONTEXT_DIM, generator=generator)
        pooled = torch.randn(1, tiny_models.POOLED_DIM, generator=generator)
        return ([[context, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"TinySDXLCheckpointLoader": TinySDXLCheckpointLoader, "TinyTextEncode": TinyTextEncode}
