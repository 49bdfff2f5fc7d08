"""The host side of training on FLUX.1: the model check, FLUX's conditioning, the flow-matching
schedule and the transformer call (with SplitFlux's prompt replacement as the host's per-block
replacement of single blocks), for ``training_run.run``.

Three host facts a FLUX backward needs (``tests/test_flux_model.py`` pins them): every single
block's ``pre_norm`` runs on a copy of its input (the job's module wrappers do it); the frozen
weights must not ask for gradients (``training.training_model`` freezes them); on hosts with
``comfy.model_management.in_training`` (0.33) it is set while training, else the rope has no
backward (``training_context``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.model_base
import comfy.model_management

from ..core import flux_blocks
from ..training.diffusion import FLOW, flow_sigmas
from ..training.splitflux import StylePromptStreams, TokenLayout
from . import training as host_training
from .training_run import TrainingInputs

DEFAULT_GUIDANCE = 3.5
"""What ``model_base.Flux.extra_conds`` feeds when the conditioning has no "guidance"."""
SUPPORTED_FAMILIES = "FLUX.1 (dev or schnell, loaded with Load Diffusion Model or as an all-in-one checkpoint)"


def is_flux1(model) -> bool:
    """A FLUX.1 transformer: ComfyUI's Flux with 19 double and 38 single blocks."""
    base = getattr(model, "model", None)
    unet_config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    return (isinstance(base, comfy.model_base.Flux) and unet_config.get("image_model") == "flux"
            and unet_config.get("depth") == flux_blocks.DOUBLE_BLOCKS
            and unet_config.get("depth_single_blocks") == flux_blocks.SINGLE_BLOCKS)


def require_flux1(model, node_name: str) -> None:
    """Refuse anything but a FLUX.1 transformer, naming what was given and what the pack supports."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if not is_flux1(model):
        found = type(base).__name__ if base is not None else type(model).__name__
        detail = f" (detected as {type(config).__name__})" if config is not None else ""
        raise ValueError(
            f"{node_name} needs a FLUX.1 model; the MODEL input is {found}{detail}. It supports {SUPPORTED_FAMILIES}; "
            "its block numbers are FLUX.1's. For SDXL use Train B-LoRA or Train UnZipLoRA.")


@dataclass
class FluxConditioning:
    context: torch.Tensor
    """(1, tokens, 4096) T5 tokens."""
    y: torch.Tensor
    """(1, 768) CLIP pooled."""
    guidance: torch.Tensor | None
    """(1,) FLUX.1-dev's distilled guidance, or None (FluxDisableGuidance)."""


def flux_conditioning(model, conditioning, what: str) -> list[FluxConditioning]:
    if not conditioning:
        raise ValueError(f"The {what} conditioning is empty; connect a FLUX text encoder's output "
                         "(DualCLIPLoader type flux + CLIP Text Encode).")
    unet_config = model.model.model_config.unet_config
    entries = []
    for cond, extras in conditioning:
        pooled = extras.get("pooled_output")
        if pooled is None or cond.shape[-1] != unet_config["context_in_dim"] or pooled.shape[-1] != unet_config["vec_in_dim"]:
            raise ValueError(f"The {what} conditioning is not FLUX's (T5 tokens of {unet_config['context_in_dim']} "
                             f"features and a CLIP pooled vector of {unet_config['vec_in_dim']}): encode it with the "
                             "FLUX text encoders (DualCLIPLoader type flux).")
        guidance = extras.get("guidance", DEFAULT_GUIDANCE)
        for row in range(cond.shape[0]):
            entries.append(FluxConditioning(cond[row:row + 1].detach().clone(), pooled[row:row + 1].detach().clone(),
                                            None if guidance is None else torch.tensor([float(guidance)])))
    return entries


def token_mask(mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """A MASK (B, H, W) or (H, W) at any size, averaged onto FLUX's image tokens (2 x 2 latent
    pixels each, row by row, as the host patchifies): (1, H/2 * W/2), values in [0, 1]."""
    mask = mask.detach().float()
    mask = mask[None] if mask.ndim == 2 else mask[:1]
    height, width = latent_shape[-2] // 2, latent_shape[-1] // 2
    return F.interpolate(mask[None], size=(height, width), mode="area").reshape(1, -1).clamp(0, 1)


@contextlib.contextmanager
def in_training_flag():
    """``comfy.model_management.in_training`` on while the model trains (0.33: the rope's
    differentiable path, as the host's own trainer sets it); absent on 0.3.64."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


@dataclass
class FluxTrainingInputs(TrainingInputs):
    """A FLUX.1 training node's inputs: the content prompt per image, the style prompt for the
    style blocks (None: no prompt replacement), and the token layout the gate reads."""

    style: FluxConditioning | None = None
    layout: TokenLayout = field(default_factory=TokenLayout)
    streams: StylePromptStreams | None = None
    style_blocks: tuple[int, ...] = ()

    @classmethod
    def of_flux(cls, model, latents, positive, style_positive, node_name: str, mask=None,
                style_blocks: tuple[int, ...] = ()) -> "FluxTrainingInputs":
        require_flux1(model, node_name)
        samples = host_training.training_latents(model, latents)
        if samples.shape[-1] % 2 or samples.shape[-2] % 2:
            raise ValueError(f"The latent is {samples.shape[-1]} x {samples.shape[-2]}; FLUX patches 2 x 2 latent "
                             "pixels, so use an image whose sides are multiples of 16 pixels.")
        conditionings = flux_conditioning(model, positive, "positive (content)")
        if len(conditionings) == 1:
            conditionings = conditionings * samples.shape[0]
        elif len(conditionings) != samples.shape[0]:
            raise ValueError(f"{samples.shape[0]} latent image(s) but {len(conditionings)} conditionings.")
        layout = TokenLayout(mask=None if mask is None else token_mask(mask, samples.shape))
        style = None
        if style_positive is not None:
            (style,) = flux_conditioning(model, style_positive, "style")[:1]
        streams = StylePromptStreams(layout) if style is not None and style_blocks else None
        return cls(model, samples, conditionings, style, layout, streams, tuple(style_blocks))

    def config(self, *args, **kwargs):
        extra = [self.style.context, self.style.y] if self.style is not None else []
        mask = [self.layout.mask] if self.layout.mask is not None else []
        return super().config(*args, extra_streams=extra + mask, **kwargs)

    def prediction(self) -> str:
        return FLOW

    def schedule(self, clone) -> torch.Tensor:
        return flow_sigmas()

    def training_context(self):
        return in_training_flag()

    def predictor(self, clone, device: torch.device):
        transformer = clone.model.diffusion_model
        dtype = clone.model.manual_cast_dtype or clone.model.get_dtype()
        if self.streams is not None:
            for index in self.style_blocks:
                clone.set_model_patch_replace(self.streams.patch(index), "dit", "single_block", index)
        options = clone.model_options.get("transformer_options", {})

        def moved(c: FluxConditioning):
            guidance = None if c.guidance is None else c.guidance.to(device, dtype)
            return c.context.to(device, dtype), c.y.to(device, dtype), guidance

        prepared = [moved(c) for c in self.conditionings]
        style = moved(self.style) if self.style is not None else None
        layout = self.layout
        if layout.mask is not None:
            layout.mask = layout.mask.to(device)

        def run(inputs, noisy, sigmas):
            context, y, guidance = inputs
            layout.text_tokens = context.shape[1]
            return transformer(noisy.to(dtype), sigmas, context=context, y=y, guidance=guidance,
                               transformer_options=options)

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor, index: int) -> torch.Tensor:
            if self.streams is not None:
                self.streams.capturing = True
                try:
                    with torch.no_grad():
                        run(style, noisy, sigmas)
                finally:
                    self.streams.capturing = False
            return run(prepared[index], noisy, sigmas)

        return predict
