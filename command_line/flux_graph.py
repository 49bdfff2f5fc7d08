"""The FLUX.1 pieces of a command's graph: FLUX.1-dev loaded as its own files (Load Diffusion
Model, CLIP-L + T5-XXL, the FLUX VAE), as ComfyUI's own FLUX examples and the shipped
workflows (``tools/flux_workflows.py``) do, or the tiny FLUX with ``--tiny``; prompts through
FluxGuidance (FLUX.1-dev is guidance-distilled: the sampler runs at CFG 1)."""

from __future__ import annotations

from ..methods.flux import FAMILY

GUIDANCE = 3.5
SAMPLER = {"cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
DEFAULT_FILES = {"unet": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5": "t5xxl_fp16.safetensors",
                 "vae": "ae.safetensors"}
TINY_SIZE = 64
"""The tiny FLUX's image side (pixels) for training and samples: a multiple of 16."""


def wants_flux(args, recipe_family: str | None = None) -> bool:
    """Whether a command runs on FLUX.1: ``--flux``, ``--unet``, or a recipe of that family."""
    return bool(getattr(args, "flux", False) or getattr(args, "unet", None) or recipe_family == FAMILY)


def tiny_nodes() -> dict:
    """The tiny FLUX's nodes (``devkit/fixture_nodes/tiny_flux_fixtures``)."""
    from devkit.fixture_nodes.tiny_flux_fixtures import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS


def load(graph, args, tiny: bool):
    """(model, clip, vae) outputs; ``clip`` is None with ``--tiny`` (its text encoder needs none)."""
    if tiny:
        return graph.node("TinyFluxModelLoader", seed=0).out(0), None, graph.node("TinyFluxVAELoader", seed=0).out(0)
    files = {key: getattr(args, key, None) or default for key, default in DEFAULT_FILES.items()}
    model = graph.node("UNETLoader", unet_name=files["unet"], weight_dtype="default").out(0)
    clip = graph.node("DualCLIPLoader", clip_name1=files["clip_l"], clip_name2=files["t5"], type="flux").out(0)
    return model, clip, graph.node("VAELoader", vae_name=files["vae"]).out(0)


def text(graph, prompt: str, clip):
    if clip is None:
        return graph.node("TinyFluxTextEncode", text=prompt).out(0)
    return graph.node("CLIPTextEncode", text=prompt, clip=clip).out(0)


def guided(graph, conditioning):
    return graph.node("FluxGuidance", conditioning=conditioning, guidance=GUIDANCE).out(0)


def empty_latent(graph, size: int):
    return graph.node("EmptySD3LatentImage", width=size, height=size, batch_size=1).out(0)


def scaled(graph, image, size: int):
    """The image at ``size`` x ``size`` (centre crop): sides multiples of 16, as FLUX needs."""
    return graph.node("ImageScale", image=image, upscale_method="lanczos", width=size, height=size, crop="center").out(0)
