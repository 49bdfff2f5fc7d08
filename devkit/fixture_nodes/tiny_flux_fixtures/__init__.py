"""Test-only ComfyUI nodes: the tiny FLUX.1 of ``devkit/tiny_flux.py`` (diffusion model, text
conditioning of FLUX's layout, a 16-channel VAE), registered in a real server in place of
UNETLoader / DualCLIPLoader + CLIPTextEncode / VAELoader (no weights can be downloaded).
``tiny_flux.py`` needs nothing of the pack, so it is loaded from its file."""

import importlib.util
from pathlib import Path

_TINY_FLUX = Path(__file__).resolve().parents[2] / "tiny_flux.py"
_spec = importlib.util.spec_from_file_location("blora_tiny_flux_fixtures", _TINY_FLUX)
tiny_flux = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_flux)


def _seed_input():
    return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}


class TinyFluxModelLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return _seed_input()

    def load(self, seed):
        return (tiny_flux.build_tiny_flux(seed),)


class TinyFluxTextEncode:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}, "optional": {"clip": ("CLIP",)}}

    def encode(self, text, clip=None):
        return (tiny_flux.tiny_flux_conditioning(text),)


class TinyFluxVAELoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return _seed_input()

    def load(self, seed):
        return (tiny_flux.tiny_flux_vae(seed),)


NODE_CLASS_MAPPINGS = {"TinyFluxModelLoader": TinyFluxModelLoader, "TinyFluxTextEncode": TinyFluxTextEncode,
                       "TinyFluxVAELoader": TinyFluxVAELoader}
