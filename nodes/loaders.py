"""Load Content LoRA / Load Style LoRA: one B-LoRA block from any LoRA file onto a model."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..core import blora, flux_blocks, flux_lora
from ..host import flux_lora as host_flux_lora, flux_training, model as host_model
from ..methods.sdxl import B_LORA
from .schema import CATEGORY, discovery

CONTENT_BRANCHES = ("main + residual", "main only")
"""What Load Content LoRA applies of a SplitFlux content file: both branches (the paper's content
use) or the main branch alone (its re-contextualisation)."""
FLUX_BLOCKS = {"content": flux_blocks.CONTENT_SINGLE_BLOCKS + flux_blocks.RCA_SINGLE_BLOCKS,
               "style": flux_blocks.STYLE_SINGLE_BLOCKS}


class _BlockLoader(io.ComfyNode):
    """Shared body of the two loaders; subclasses name their role."""

    ROLE = ""
    NODE_ID = ""
    DISPLAY_NAME = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        block = B_LORA.block_of_role(cls.ROLE)
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            **discovery(cls.NODE_ID, "load lora", cls.ROLE, f"{cls.ROLE} lora", "block", "flux"),
            description=(
                f"Applies only the {cls.ROLE} block of a B-LoRA ({block}) to the model. Reads official B-LoRA, "
                "PEFT, kohya and ComfyUI LoRA files; a full-UNet LoRA works too (only this block is taken). On a "
                f"FLUX.1 model: SplitFlux's {cls.ROLE} blocks (single_blocks "
                f"{FLUX_BLOCKS[cls.ROLE][0]}-{FLUX_BLOCKS[cls.ROLE][-1]}) of any FLUX LoRA file."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model. It is not changed: a patched clone comes out."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list(host_model.LORAS_FOLDER),
                    tooltip="A LoRA file from the loras folder.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="How strongly the block is applied (see strength_mode).",
                ),
                io.Combo.Input(
                    "strength_mode", options=list(blora.STRENGTH_MODES), default=blora.STRENGTH_MODES[0],
                    optional=True,
                    tooltip=(
                        "comfyui: the weight change is strength x delta, like every ComfyUI LoRA loader. "
                        "official: strength is the B-LoRA scripts' alpha, which scales both factors, so the "
                        f"change is strength^2 x delta (paper settings: content {blora.OFFICIAL_DEFAULT_STRENGTH['content']}, "
                        f"style {blora.OFFICIAL_DEFAULT_STRENGTH['style']})."
                    ),
                ),
                *cls.extra_inputs(),
            ],
            outputs=[io.Model.Output(tooltip=f"The model with the {cls.ROLE} block patched.")],
        )

    @classmethod
    def extra_inputs(cls) -> list:
        return []

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool:
        return host_model.require_lora_files(lora_name)

    @classmethod
    def execute(cls, model, lora_name: str, strength: float,
                strength_mode: str = blora.STRENGTH_MODES[0], content_branches: str = CONTENT_BRANCHES[0]) -> io.NodeOutput:
        if flux_training.is_flux1(model):
            return io.NodeOutput(cls._on_flux(model, lora_name, strength, strength_mode, content_branches))
        try:
            host_model.require_sdxl(model, cls.DISPLAY_NAME, flux_note=False)
        except ValueError as error:
            raise ValueError(f"{error} It also takes FLUX.1 models ({flux_training.SUPPORTED_FAMILIES}), where it "
                             f"applies SplitFlux's {cls.ROLE} blocks.") from None
        block = B_LORA.block_of_role(cls.ROLE)
        weights = host_model.read_lora(lora_name).only_block(block, cls.ROLE)
        factor = blora.delta_strength(strength, strength_mode)
        return io.NodeOutput(host_model.patched_clone(model, weights, factor))

    @classmethod
    def _on_flux(cls, model, lora_name: str, strength: float, strength_mode: str, content_branches: str):
        import safetensors
        import safetensors.torch

        if strength_mode != blora.STRENGTH_MODES[0]:
            raise ValueError(f"strength_mode '{strength_mode}' is B-LoRA's (SDXL); on FLUX use "
                             f"'{blora.STRENGTH_MODES[0]}'.")
        path = host_model.lora_file_path(lora_name)
        if not path.endswith(".safetensors"):
            raise ValueError(f"{lora_name}: FLUX LoRAs are read from .safetensors files.")
        state_dict = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as opened:
            metadata = opened.metadata() or {}
        blocks = FLUX_BLOCKS[cls.ROLE]
        part = flux_lora.blocks_part(state_dict, blocks, cls.ROLE)
        if cls.ROLE == "content" and content_branches == CONTENT_BRANCHES[1]:
            if flux_lora.MAIN_RANK_METADATA_KEY not in metadata:
                raise ValueError(f"{lora_name} is not a SplitFlux content file (no {flux_lora.MAIN_RANK_METADATA_KEY} "
                                 "in its metadata), so it has no main branch: use 'main + residual'.")
            part = flux_lora.main_branch(part, int(metadata[flux_lora.MAIN_RANK_METADATA_KEY]),
                                         flux_blocks.CONTENT_SINGLE_BLOCKS)
        return host_flux_lora.patched_clone(model, part, strength, f"{cls.ROLE} LoRA {lora_name}")


class LoadContentLoRA(_BlockLoader):
    ROLE = "content"
    NODE_ID = "BLoRALoadContentLoRA"
    DISPLAY_NAME = "Load Content LoRA"

    @classmethod
    def extra_inputs(cls) -> list:
        return [io.Combo.Input(
            "content_branches", options=list(CONTENT_BRANCHES), default=CONTENT_BRANCHES[0], optional=True,
            tooltip="FLUX (SplitFlux files): 'main + residual' reproduces the subject (the paper's content use); "
                    "'main only' leaves the residual branch out, to put the subject in new contexts or styles "
                    "(re-contextualisation). The RCA blocks (single 10-11) are applied either way. SDXL: unused.")]


class LoadStyleLoRA(_BlockLoader):
    ROLE = "style"
    NODE_ID = "BLoRALoadStyleLoRA"
    DISPLAY_NAME = "Load Style LoRA"


NODES = [LoadContentLoRA, LoadStyleLoRA]
