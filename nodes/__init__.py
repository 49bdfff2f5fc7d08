"""Thin ComfyUI adapters: schemas, host types in and out; the math lives in ``core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .loaders import LoadContentLoRA, LoadStyleLoRA
from .train import TrainBLoRA
from .unzip_merge import UnZipColumnMaskMerge
from .unzip_train import TrainUnZipLoRA
from .rechar import ReCharStructureFuse
from .klora import KLoRAFuse
from ..host import routes


class BLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        routes.register()  # the host loader asks for the node list once, while it loads the pack
        return [LoadContentLoRA, LoadStyleLoRA, TrainBLoRA, UnZipColumnMaskMerge, TrainUnZipLoRA,
                ReCharStructureFuse, KLoRAFuse]
