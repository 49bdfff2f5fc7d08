"""Gradient checkpointing of the layers backward traverses: each keeps only its inputs during the
forward pass and recomputes its activations in backward (``torch.utils.checkpoint``, the
non-reentrant form, which also carries the RNG state and keyword arguments).

The forward of each layer is replaced on the instance (not wrapped in another module), so code
that dispatches on the layer's type (ComfyUI's ``forward_timestep_embed``) still sees the layer;
the instance attribute is removed again on exit, whatever happened.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


ADDS_TO_ITS_INPUT = ("SingleStreamBlock",)
"""Layers that add to their input tensor in place (ComfyUI's FLUX single block: ``x += ...``): a
checkpointed one must run on a copy, or its recomputation in backward reads the changed input."""


def checkpointed_function(layer: torch.nn.Module, forward):
    """What checkpointing runs for ``layer``: its ``forward``, on a copy of its first input for a
    layer that adds to it in place (the copy is then that layer's output, one more tensor per
    checkpointed layer, which ``bench/memory_estimate.py`` counts too)."""
    if type(layer).__name__ not in ADDS_TO_ITS_INPUT:
        return forward

    def on_a_copy(inputs, *args, **kwargs):
        return forward(inputs.clone(), *args, **kwargs)

    return on_a_copy


def _checkpointed_forward(layer: torch.nn.Module):
    forward, function = layer.forward, checkpointed_function(layer, layer.forward)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed(layers: list[torch.nn.Module]):
    """Every layer in ``layers`` recomputes its activations in backward while the context is open."""
    patched = []
    try:
        for layer in layers:
            if "forward" in vars(layer):
                raise RuntimeError(f"{type(layer).__name__} already has its forward replaced; not checkpointing it twice.")
            layer.forward = _checkpointed_forward(layer)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def backward_path_layers(unet: torch.nn.Module, trained_paths) -> list[torch.nn.Module]:
    """The layers of an SDXL (ldm) UNet that backward runs through when only ``trained_paths``
    are trained and the noisy latent needs no gradient: every layer from the first block that
    holds a trained module to the output. A layer is one entry of a block (ResBlock,
    SpatialTransformer, Upsample/Downsample), the granularity the UNet's own loop calls."""
    if hasattr(unet, "single_blocks"):
        return _flux_backward_path_layers(unet, trained_paths)
    blocks = [(f"input_blocks.{i}", block) for i, block in enumerate(unet.input_blocks)]
    blocks.append(("middle_block", unet.middle_block))
    blocks += [(f"output_blocks.{i}", block) for i, block in enumerate(unet.output_blocks)]
    trained = list(trained_paths)
    first = next((index for index, (name, _) in enumerate(blocks)
                  if any(path.startswith(name + ".") for path in trained)), None)
    if first is None:
        return []
    layers = [layer for _, block in blocks[first:] for layer in block]
    return layers + [unet.out]


def _flux_backward_path_layers(transformer: torch.nn.Module, trained_paths) -> list[torch.nn.Module]:
    """FLUX (ComfyUI's ``single_blocks`` after ``double_blocks``): every block from the first
    that holds a trained module, then the final layer."""
    blocks = [(f"double_blocks.{i}", b) for i, b in enumerate(transformer.double_blocks)]
    blocks += [(f"single_blocks.{i}", b) for i, b in enumerate(transformer.single_blocks)]
    trained = list(trained_paths)
    first = next((index for index, (name, _) in enumerate(blocks)
                  if any(path.startswith(name + ".") for path in trained)), None)
    return [] if first is None else [block for _, block in blocks[first:]] + [transformer.final_layer]
