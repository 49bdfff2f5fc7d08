"""ReChar Structure Fuse: a character's structure from one B-LoRA, a style from another."""

from __future__ import annotations

import functools

import torch

import folder_paths
from comfy_api.latest import io

from ..core import blora
from ..methods.sdxl import RECHAR
from ..core.glyph import CANNY_HIGH, CANNY_LOW, RECHAR_SIZE, canny_edges
from ..core.windowed_lora import SigmaWindow, WindowedLoRA, sigma_window
from ..host import model as host_model, step_patches
from .schema import CATEGORY, discovery

WRAPPER_KEY = "blora_rechar_structure_window"


def _windowed(model, weights, strength: float, start: float, end: float):
    """A clone whose structure layers add their LoRA only for steps inside [start, end]."""
    window = SigmaWindow(*sigma_window(model.get_model_object("model_sampling"), start, end))
    layers = {path: functools.partial(WindowedLoRA, delta=functools.partial(layer.lora_output, strength=strength), window=window)
              for path, layer in weights.layers.items()}
    return step_patches.clone_with_step_layers(model, layers, window, WRAPPER_KEY)


def check_window(structure_start: float, structure_end: float) -> None:
    if not 0.0 <= structure_start < structure_end <= 1.0:
        raise ValueError(f"structure_start ({structure_start}) must be below structure_end ({structure_end}), "
                         "both between 0 and 1.")


class ReCharStructureFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = folder_paths.get_filename_list(host_model.LORAS_FOLDER)
        return io.Schema(
            node_id="ReCharStructureFuse",
            display_name="ReChar Structure Fuse",
            category=CATEGORY,
            **discovery("ReCharStructureFuse", "rechar", "character", "glyph", "font", "text effect", "structure", "canny"),
            description=(
                f"ReChar: the content block ({RECHAR.block_of_role('structure')}) of the structure B-LoRA (trained on "
                f"the character or glyph) with the style block ({RECHAR.block_of_role('style')}) of the style B-LoRA; "
                f"nothing else. With a glyph, also its Canny edges ({CANNY_LOW}/{CANNY_HIGH} at {RECHAR_SIZE} px, as "
                "ReChar) for the host's ControlNet nodes. This pack's "
                "addition: structure_start / structure_end limit the structure block to part of the sampling "
                "schedule, through the host's object patches and a sampling wrapper (no re-patching of weights)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model; a patched clone comes out."),
                io.Combo.Input("structure_lora", options=loras, tooltip="B-LoRA trained on the character/glyph."),
                io.Combo.Input("style_lora", options=loras, tooltip="B-LoRA trained on the style reference."),
                io.Float.Input("structure_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the structure LoRA's change (1: as trained; 0: off)."),
                io.Float.Input("style_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the style LoRA's change (1: as trained; 0: off)."),
                io.Image.Input("glyph", optional=True, tooltip="The character image, for the Canny control map."),
                io.Float.Input("structure_start", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the schedule where the structure block starts acting."),
                io.Float.Input("structure_end", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of the schedule where it stops."),
                io.Combo.Input("strength_mode", options=list(blora.STRENGTH_MODES), default=blora.STRENGTH_MODES[0],
                               optional=True, tooltip="official: strengths are ReChar's alphas (squared)."),
            ],
            outputs=[
                io.Model.Output(tooltip="Structure block from the structure LoRA, style block from the style LoRA."),
                io.Image.Output(display_name="glyph_edges", tooltip="Canny edges of the glyph (empty without one)."),
                io.Mask.Output(display_name="edge_mask", tooltip="The same edges as a mask."),
            ],
        )

    @classmethod
    def validate_inputs(cls, structure_lora: str, style_lora: str, structure_start: float = 0.0,
                        structure_end: float = 1.0) -> bool:
        check_window(structure_start, structure_end)
        return host_model.require_lora_files(structure_lora, style_lora)

    @classmethod
    def execute(cls, model, structure_lora: str, style_lora: str, structure_strength: float, style_strength: float,
                glyph=None, structure_start: float = 0.0, structure_end: float = 1.0,
                strength_mode: str = blora.STRENGTH_MODES[0]) -> io.NodeOutput:
        host_model.require_sdxl(model, "ReChar Structure Fuse")
        check_window(structure_start, structure_end)
        structure = host_model.read_lora(structure_lora).only_block(RECHAR.block_of_role("structure"), "structure (content)")
        style = host_model.read_lora(style_lora).only_block(RECHAR.block_of_role("style"), "style")
        structure_factor = blora.delta_strength(structure_strength, strength_mode)
        patched = host_model.patched_clone(model, style, blora.delta_strength(style_strength, strength_mode))
        if (structure_start, structure_end) == (0.0, 1.0):
            patched = host_model.patched_clone(patched, structure, structure_factor)
        else:
            host_model.check_shapes(model, structure)
            patched = _windowed(patched, structure, structure_factor, structure_start, structure_end)
        if glyph is None:
            return io.NodeOutput(patched, None, None)
        edges = torch.stack([canny_edges(image) for image in glyph])
        return io.NodeOutput(patched, edges[..., None].expand(*edges.shape, 3).contiguous(), edges)


NODES = [ReCharStructureFuse]
