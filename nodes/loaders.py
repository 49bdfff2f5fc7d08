"""Load Content LoRA / Load Style LoRA: one B-LoRA block from any LoRA file onto a model."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..core import blora
from ..host import model as host_model
from .schema import CATEGORY, discovery


class _BlockLoader(io.ComfyNode):
    """Shared body of the two loaders; subclasses name their role."""

    ROLE = ""
    NODE_ID = ""
    DISPLAY_NAME = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        block = blora.BLOCK_BY_ROLE[cls.ROLE]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            **discovery(cls.NODE_ID, "load lora", cls.ROLE, f"{cls.ROLE} lora", "block"),
            description=(
                f"Applies only the {cls.ROLE} block of a B-LoRA ({block}) to the model. Reads official B-LoRA, "
                "PEFT, kohya and ComfyUI LoRA files; a full-UNet LoRA works too (only this block is taken)."
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
            ],
            outputs=[io.Model.Output(tooltip=f"The model with the {cls.ROLE} block patched.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool:
        return host_model.require_lora_files(lora_name)

    @classmethod
    def execute(cls, model, lora_name: str, strength: float,
                strength_mode: str = blora.STRENGTH_MODES[0]) -> io.NodeOutput:
        host_model.require_sdxl(model, cls.DISPLAY_NAME)
        block = blora.BLOCK_BY_ROLE[cls.ROLE]
        weights = host_model.read_lora(lora_name).only_block(block, cls.ROLE)
        factor = blora.delta_strength(strength, strength_mode)
        return io.NodeOutput(host_model.patched_clone(model, weights, factor))


class LoadContentLoRA(_BlockLoader):
    ROLE = "content"
    NODE_ID = "BLoRALoadContentLoRA"
    DISPLAY_NAME = "Load Content LoRA"


class LoadStyleLoRA(_BlockLoader):
    ROLE = "style"
    NODE_ID = "BLoRALoadStyleLoRA"
    DISPLAY_NAME = "Load Style LoRA"


NODES = [LoadContentLoRA, LoadStyleLoRA]
