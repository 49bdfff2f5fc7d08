"""Train UnZipLoRA: a content LoRA and a style LoRA from one image, trained jointly."""

from __future__ import annotations

import dataclasses

import torch

from comfy_api.latest import io

from ..core import column_masks
from ..host import training as host_training, training_run, unzip_recombine
from ..methods.sdxl import UNZIPLORA
from ..training import memory as memory_settings, unziplora
from ..training.job import trained_weights
from ..training.trainer import DEFAULT_PRECISION, PRECISIONS
from .schema import (TrainingNode, discovery, preview_input, resume_input, role_file_outputs, seed_input,
                     training_output, training_schema)

NODE_ID = "UnZipLoRATrain"
PAPER = UNZIPLORA.recipe
DEFAULTS = unziplora.UnZipConfig()


def _prompt_context(model, conditioning, what: str) -> torch.Tensor:
    """The token embeddings one LoRA sees in cross-attention (prompt separation)."""
    if not conditioning or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise ValueError(f"The {what} conditioning must be one prompt (e.g. 'A monadikos cat' for content).")
    return host_training.conditioning_per_image(model, conditioning, 1)[0].context


class TrainUnZipLoRA(TrainingNode):
    NODE_ID = NODE_ID  # the module's, for TrainingNode

    @classmethod
    def define_schema(cls) -> io.Schema:
        return training_schema(
            NODE_ID, "Train UnZipLoRA",
            **discovery(NODE_ID, "unziplora", "unzip", "train", "training", "content", "style"),
            description=(
                "Trains a content LoRA and a style LoRA from one image at once (UnZipLoRA), kept apart by prompts "
                "(each LoRA sees its own prompt in cross-attention), column masks with learned mergers, and block "
                "roles. Saves <name>_content and <name>_style (mergers inside) for UnZip Column Mask Merge and the loaders."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to train on. It is not changed."),
                io.Latent.Input("latents", tooltip="The image encoded with VAE Encode (about 1024 px)."),
                io.Conditioning.Input("positive", tooltip="Combined prompt, e.g. 'A monadikos cat in sketch style'."),
                io.Conditioning.Input("content_positive", tooltip="Content prompt, e.g. 'A monadikos cat'."),
                io.Conditioning.Input("style_positive", tooltip="Style prompt, e.g. 'A cat in sketch style'."),
                io.Int.Input("steps", default=PAPER.steps, min=1, max=100000,
                             tooltip=f"Training steps (paper: {PAPER.steps})."),
                io.Float.Input("content_learning_rate", default=PAPER.learning_rate, min=1e-7, max=1e-2, step=1e-6,
                               round=False, tooltip=f"Learning rate of the content LoRA (paper: {PAPER.learning_rate:g})."),
                io.Float.Input("style_learning_rate", default=DEFAULTS.style_learning_rate, min=1e-7, max=1e-2,
                               step=1e-6, round=False,
                               tooltip=f"Learning rate of the style LoRA (paper: {DEFAULTS.style_learning_rate:g})."),
                io.Float.Input("merger_learning_rate", default=DEFAULTS.merger_learning_rate, min=1e-6, max=1.0,
                               step=1e-4, round=False,
                               tooltip=f"Learning rate of the per-column mergers (paper: {DEFAULTS.merger_learning_rate:g})."),
                io.Int.Input("rank", default=PAPER.rank, min=1, max=256, tooltip=f"Rank of both LoRAs (paper: {PAPER.rank})."),
                io.Int.Input("sample_times", default=DEFAULTS.sample_times, min=1, max=100,
                             tooltip=f"How many times columns are chosen (one period each; paper: {DEFAULTS.sample_times})."),
                io.Float.Input("column_ratio", default=DEFAULTS.column_ratio, min=0.001, max=1.0, step=0.01,
                               tooltip=f"Fraction of columns added to each mask per period (paper: {DEFAULTS.column_ratio:g})."),
                seed_input(),
                io.String.Input("lora_name", default="unziplora/my_image",
                                tooltip="Output name in the loras folder; _content and _style files are written."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=DEFAULT_PRECISION,
                               tooltip="fp16 with a gradient scaler (the paper's), bf16, or fp32. On a CPU fp16 runs as fp32."),
                io.Int.Input("checkpoint_every", default=PAPER.checkpoint_every, min=0, max=100000, optional=True,
                             tooltip="Save a resumable checkpoint every N steps (0: only on Cancel or error)."),
                resume_input(),
                io.Boolean.Input("prompt_separation", default=True, optional=True,
                                 tooltip="Each LoRA sees its own prompt in cross-attention keys/values."),
                io.Boolean.Input("column_separation", default=True, optional=True,
                                 tooltip="Column masks and mergers (off: both LoRAs use every column)."),
                io.Boolean.Input("block_separation", default=True, optional=True,
                                 tooltip="In style blocks the style LoRA uses every column, in content blocks the "
                                         "content LoRA (off: both sparse everywhere)."),
                io.Boolean.Input("avoid_content_columns", default=True, optional=True,
                                 tooltip="The style LoRA does not pick columns the content LoRA holds."),
                io.Float.Input("overlap_weight", default=DEFAULTS.overlap_weight, min=0.0, max=100.0, step=0.01,
                               optional=True,
                               tooltip=f"Weight of the merger overlap term in the loss (paper: {DEFAULTS.overlap_weight:g})."),
                io.String.Input("prompt", default="", optional=True, tooltip="Prompt text for the files' metadata."),
                io.Float.Input("cone_threshold", default=DEFAULTS.cone_threshold, min=0.0, max=1.0,
                               step=1e-12, round=False, optional=True,
                               tooltip="Column scores count input rows with |W x G| above this, on unscaled "
                                       "gradients. The default equals the official 1e-5 at fp16 loss scale 2^16."),
                preview_input("LoRAs", "UNet"),
            ],
            model_tooltip="The model with both LoRAs merged (mergers applied).",
            file_outputs=role_file_outputs(unziplora.ROLES),
        )

    @classmethod
    def execute(cls, model, latents, positive, content_positive, style_positive, steps, content_learning_rate,
                style_learning_rate, merger_learning_rate, rank, sample_times, column_ratio, seed, lora_name,
                precision, checkpoint_every=PAPER.checkpoint_every, resume=False, prompt_separation=True,
                column_separation=True, block_separation=True, avoid_content_columns=True,
                overlap_weight=DEFAULTS.overlap_weight, prompt="", cone_threshold=DEFAULTS.cone_threshold,
                preview_every=0, memory=memory_settings.AUTO, overwrite=False) -> io.NodeOutput:
        settings = unziplora.UnZipConfig(sample_times, column_ratio, merger_learning_rate, style_learning_rate,
                                         overlap_weight, prompt_separation, column_separation, block_separation,
                                         avoid_content_columns, cone_threshold)
        rank, content_learning_rate, alpha = UNZIPLORA.recipe.resolved(rank, content_learning_rate)
        files = training_run.output_files(lora_name, unziplora.ROLES, overwrite)  # a bad name: refused before any work
        with torch.inference_mode(False):
            inputs = training_run.TrainingInputs.of(model, latents, positive, "Train UnZipLoRA")
            contexts = {"content": _prompt_context(model, content_positive, "content"),
                        "style": _prompt_context(model, style_positive, "style")}
            shapes = inputs.shapes(UNZIPLORA)
            config = inputs.config(UNZIPLORA, steps, content_learning_rate, rank, alpha, seed, precision,
                                   checkpoint_every, shapes, contexts.values(), **dataclasses.asdict(settings))
            job = unziplora.unziplora_job(config, files, shapes, contexts, settings, prompt)
            result = training_run.run(job, inputs, cls.hidden.unique_id if cls.hidden else None, resume, memory,
                                      "Train UnZipLoRA", preview_every)
            # recombined as the official inference runs it: each LoRA sees its own prompt in k/v
            trained = {role: trained_weights(job, role) for role in unziplora.ROLES}
            merged = unzip_recombine.recombined(
                model, {role: column_masks.scale_rows(weights, column_masks.mergers_from_metadata(weights.metadata))
                        for role, weights in trained.items()},
                contexts=contexts if settings.prompt_separation else None)
        return training_output(NODE_ID, lora_name, job, result, merged)


NODES = [TrainUnZipLoRA]
