"""Train SplitFlux: content and style from one image on FLUX.1, trained jointly in-process."""

from __future__ import annotations

import dataclasses

import torch

from comfy_api.latest import io

from ..core import flux_blocks
from ..host import flux_lora, flux_training, training_run
from ..methods.flux import SPLITFLUX
from ..training import memory as memory_settings, splitflux
from ..training.job import TrainingJob
from ..training.trainer import PRECISIONS
from .schema import (TrainingNode, discovery, preview_input, resume_input, role_file_outputs, seed_input,
                     training_output, training_schema)

NODE_ID = "SplitFluxTrain"
PAPER = SPLITFLUX.recipe
DEFAULTS = splitflux.SplitFluxSettings()
LABEL = "Train SplitFlux"


class TrainSplitFlux(TrainingNode):
    NODE_ID = NODE_ID  # the module's, for TrainingNode

    @classmethod
    def define_schema(cls) -> io.Schema:
        return training_schema(
            NODE_ID, LABEL,
            **discovery(NODE_ID, "splitflux", "flux", "flux.1", "train", "training", "content", "style"),
            description=(
                "Trains SplitFlux on FLUX.1 from one image: a visual-gated content LoRA (main + residual branch) on "
                "single blocks 0-9, rank-constrained adaptation on 10-11 and a style LoRA on 12-37, which see the "
                "style prompt (prompt replacement). Saves <name>_content and <name>_style for Load Content LoRA / "
                "Load Style LoRA and ComfyUI's LoraLoader. Cancel saves a checkpoint."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.1 model (Load Diffusion Model or a checkpoint). Not changed."),
                io.Latent.Input("latents", tooltip="The image encoded with the FLUX VAE (sides multiples of 16 px)."),
                io.Conditioning.Input("positive", tooltip=f"The content prompt (paper: '{PAPER.settings['content_prompt']}')."),
                io.Conditioning.Input("style_positive",
                                      tooltip=f"The style prompt the style blocks see (paper: '{PAPER.settings['style_prompt']}'); "
                                              "same token length as the content prompt."),
                io.Int.Input("steps", default=PAPER.steps, min=1, max=100000, tooltip=f"Training steps (paper: {PAPER.steps})."),
                io.Float.Input("learning_rate", default=PAPER.learning_rate, min=1e-7, max=1e-2, step=1e-6, round=False,
                               tooltip=f"AdamW learning rate, constant (paper: {PAPER.learning_rate:g})."),
                seed_input(),
                io.String.Input("lora_name", default="splitflux/my_image",
                                tooltip="Output name in the loras folder; _content and _style files are written."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="bf16 (FLUX's own), fp16 with a gradient scaler, or fp32. On a CPU fp16 runs as fp32."),
                io.Int.Input("checkpoint_every", default=PAPER.checkpoint_every, min=0, max=100000, optional=True,
                             tooltip="Save a resumable checkpoint every N steps (0: only on Cancel or error)."),
                resume_input(),
                io.Mask.Input("mask", optional=True,
                              tooltip="The subject (e.g. from a segmentation node): replaces the computed visual gate "
                                      "(this pack's addition; the paper computes it from feature norms)."),
                io.Boolean.Input("prompt_replacement", default=DEFAULTS.prompt_replacement, optional=True,
                                 tooltip="The style blocks see the style prompt's text tokens (the paper's Fig. 2A)."),
                io.Float.Input("complementary_weight", default=DEFAULTS.complementary_weight, min=0.0, max=100.0,
                               step=0.01, optional=True,
                               tooltip=f"Weight of the complementary loss between the content branches (paper: "
                                       f"{DEFAULTS.complementary_weight:g})."),
                io.String.Input("prompt", default=PAPER.settings["content_prompt"], optional=True,
                                tooltip="Prompt text for the files' metadata."),
                preview_input("LoRAs", "transformer"),
            ],
            model_tooltip="The model with the content (main + residual) and style LoRAs.",
            file_outputs=role_file_outputs(splitflux.ROLES),
        )

    @classmethod
    def execute(cls, model, latents, positive, style_positive, steps, learning_rate, seed, lora_name, precision,
                checkpoint_every=PAPER.checkpoint_every, resume=False, mask=None,
                prompt_replacement=DEFAULTS.prompt_replacement, complementary_weight=DEFAULTS.complementary_weight,
                prompt=PAPER.settings["content_prompt"], preview_every=0, memory=memory_settings.AUTO,
                overwrite=False) -> io.NodeOutput:
        settings = dataclasses.replace(DEFAULTS, prompt_replacement=prompt_replacement,
                                       complementary_weight=complementary_weight)
        files = training_run.output_files(lora_name, splitflux.ROLES, overwrite)  # a bad name: refused before any work
        with torch.inference_mode(False):
            inputs, job = training_job(model, latents, positive, style_positive, steps, learning_rate, seed,
                                       precision, checkpoint_every, mask, settings, prompt, files)
            result = training_run.run(job, inputs, cls.hidden.unique_id if cls.hidden else None, resume, memory, LABEL,
                                      preview_every)
            trained = model
            for role in splitflux.ROLES:
                trained = flux_lora.patched_clone(trained, job.lora_file(role)[0], 1.0, f"SplitFlux {role} LoRA")
        return training_output(NODE_ID, lora_name, job, result, trained)


def training_job(model, latents, positive, style_positive, steps: int, learning_rate: float, seed: int,
                 precision: str, checkpoint_every: int, mask, settings: splitflux.SplitFluxSettings, prompt: str,
                 files) -> tuple[flux_training.FluxTrainingInputs, TrainingJob]:
    """The node's inputs checked and the job it trains (``training_run.run``); also what the
    SplitFlux benchmarks train (``bench/splitflux_sides.py``)."""
    inputs = flux_training.FluxTrainingInputs.of_flux(
        model, latents, positive, style_positive, LABEL, mask,
        flux_blocks.STYLE_SINGLE_BLOCKS if settings.prompt_replacement else ())
    hidden = model.model.model_config.unet_config["hidden_size"]
    paths = {f"{block}.linear1": None for block in SPLITFLUX.layers.blocks}
    recorded = {**dataclasses.asdict(settings), "masked": mask is not None}
    rank, learning_rate, alpha = PAPER.resolved(0, learning_rate)
    config = inputs.config(SPLITFLUX, steps, learning_rate, rank, alpha, seed, precision,
                           checkpoint_every, paths, **recorded)
    return inputs, splitflux.splitflux_job(config, files, hidden, settings, prompt, inputs.layout)


NODES = [TrainSplitFlux]
