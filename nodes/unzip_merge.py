"""UnZip Column Mask Merge: a content LoRA and a style LoRA recombined with per-column weights."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..core import column_masks
from ..host import model as host_model, unzip_recombine
from .schema import CATEGORY, discovery

NO_MERGER = "none"


def _merger_for(weights, merger_name: str, lora_name: str):
    """The merger file's vectors, else the ones the LoRA file carries, else None (m = 1)."""
    if merger_name and merger_name != NO_MERGER:
        return column_masks.read_merger_file(host_model.lora_file_path(merger_name))
    return column_masks.mergers_from_metadata(weights.metadata, lora_name)


class UnZipColumnMaskMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = folder_paths.get_filename_list(host_model.LORAS_FOLDER)
        return io.Schema(
            node_id="UnZipColumnMaskMerge",
            display_name="UnZip Column Mask Merge",
            category=CATEGORY,
            **discovery("UnZipColumnMaskMerge", "unziplora", "unzip", "merge", "recombine", "content", "style"),
            description=(
                "Recombines a content LoRA and a style LoRA (UnZipLoRA): on every layer, W0 + s_c diag(m_c) B_c A_c + "
                "s_s diag(m_s) B_s A_s, where m are per-output-feature merger weights. Reads the official "
                "*_content / *_style LoRAs with their *_merger_*.pth files, and this pack's trained files (mergers "
                "inside). Content and style may come from different images. With content_positive and "
                "style_positive connected it runs as the official inference (prompt-separated): in cross-attention "
                "keys/values the base weights see the sampled (combined) prompt, the content LoRA the content prompt, "
                "the style LoRA the style prompt. Without them: the plain weight merge, one prompt for all three, "
                "which matches the official result only when the three prompts are equal."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model; a patched clone comes out."),
                io.Combo.Input("content_lora", options=loras, tooltip="The content LoRA (e.g. <name>_content)."),
                io.Combo.Input("style_lora", options=loras, tooltip="The style LoRA, from the same or another image."),
                io.Float.Input("content_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the content LoRA's change (1: as trained; 0: off)."),
                io.Float.Input("style_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the style LoRA's change (1: as trained; 0: off)."),
                io.Combo.Input("content_merger", options=[NO_MERGER] + loras, default=NO_MERGER,
                               tooltip="The content LoRA's merger (official *_merger_content.pth). 'none': the one "
                                       "inside a pack-trained file, else 1 everywhere."),
                io.Combo.Input("style_merger", options=[NO_MERGER] + loras, default=NO_MERGER,
                               tooltip="The style LoRA's merger (official *_merger_style.pth), as above."),
                io.Boolean.Input("untrained_masks", default=False, optional=True,
                                 tooltip="For two LoRAs with no mergers (two B-LoRAs, two kohya LoRAs): on output "
                                         "features both change strongly, keep only the LoRA that changes it more, "
                                         "so the pair interferes less than a plain sum."),
                io.String.Input("content_lora_file", optional=True, force_input=True,
                                tooltip="Connect a training node's content_lora output to use the file it just saved "
                                        "(overrides content_lora)."),
                io.String.Input("style_lora_file", optional=True, force_input=True,
                                tooltip="Connect a training node's style_lora output (overrides style_lora)."),
                io.Conditioning.Input("content_positive", optional=True,
                                      tooltip="The content prompt (e.g. 'A monadikos cat'): the content LoRA sees it in "
                                              "cross-attention keys/values, as the official inference. Unconnected: "
                                              "it sees the sampled prompt (plain merge)."),
                io.Conditioning.Input("style_positive", optional=True,
                                      tooltip="The style prompt (e.g. 'A cat in sketch style'; official prompts use "
                                              "the content's class noun): the style LoRA sees it."),
            ],
            outputs=[io.Model.Output(tooltip="The model with both LoRAs merged in.")],
        )

    @classmethod
    def validate_inputs(cls, content_lora: str, style_lora: str, content_merger: str, style_merger: str) -> bool:
        """The names are checked when the node runs, not here: a training node earlier in the same
        prompt may create these files (connected through content_lora_file / style_lora_file)."""
        return True

    @classmethod
    def execute(cls, model, content_lora: str, style_lora: str, content_strength: float, style_strength: float,
                content_merger: str = NO_MERGER, style_merger: str = NO_MERGER,
                untrained_masks: bool = False, content_lora_file: str = "", style_lora_file: str = "",
                content_positive=None, style_positive=None) -> io.NodeOutput:
        host_model.require_sdxl(model, "UnZip Column Mask Merge")
        content_name, style_name = content_lora_file or content_lora, style_lora_file or style_lora
        content, style = host_model.read_lora(content_name), host_model.read_lora(style_name)
        merger_c = _merger_for(content, content_merger, content_name)
        merger_s = _merger_for(style, style_merger, style_name)
        if untrained_masks:
            if merger_c is not None or merger_s is not None:
                logging.info("UnZip Column Mask Merge: mergers given, untrained masks not used.")
            else:
                merger_c, merger_s = column_masks.untrained_column_masks(content, style)
        if merger_c:
            content = column_masks.scale_rows(content, merger_c, "content")
        if merger_s:
            style = column_masks.scale_rows(style, merger_s, "style")
        contexts = {"content": unzip_recombine.prompt_context(model, content_positive, "content_positive"),
                    "style": unzip_recombine.prompt_context(model, style_positive, "style_positive")}
        return io.NodeOutput(unzip_recombine.recombined(model, {"content": content, "style": style},
                                                        {"content": content_strength, "style": style_strength},
                                                        contexts))


NODES = [UnZipColumnMaskMerge]
