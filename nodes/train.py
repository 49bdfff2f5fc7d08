"""Train B-LoRA: the in-process fine-tune of SDXL's two B-LoRA blocks (or the style recipe's
attention layers) on the user's own model."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from .. import methods
from ..host import model as host_model, training_run
from ..methods.sdxl import B_LORA, STYLE_LORA
from ..training import memory as memory_settings
from ..training.job import lora_job, trained_weights
from ..training.trainer import DEFAULT_PRECISION, PRECISIONS
from .schema import TrainingNode, discovery, preview_input, resume_input, seed_input, training_output, training_schema

NODE_ID = "BLoRATrain"
RECIPES = methods.trained_by(NODE_ID)
PAPER, STYLE = B_LORA.recipe, STYLE_LORA.recipe


class TrainBLoRA(TrainingNode):
    NODE_ID = NODE_ID  # the module's, for TrainingNode

    @classmethod
    def define_schema(cls) -> io.Schema:
        return training_schema(
            NODE_ID, "Train B-LoRA",
            **discovery(NODE_ID, "train", "training", "fine-tune", "content", "style", "style lora"),
            description=(
                f"Fine-tunes LoRA on SDXL's two B-LoRA blocks (content {B_LORA.block_of_role('content')}, style "
                f"{B_LORA.block_of_role('style')}) to "
                "reconstruct the image(s), inside ComfyUI, on the loaded model (no second copy). The file lands in "
                "the loras folder, ready for Load Content LoRA / Load Style LoRA. Cancel saves a checkpoint."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to train on. It is not changed."),
                io.Latent.Input("latents", tooltip="One or more images encoded with VAE Encode (about 1024 px)."),
                io.Conditioning.Input("positive", tooltip="The prompt, e.g. 'A [v]'; one for all images or one per image."),
                io.Int.Input("steps", default=PAPER.steps, min=1, max=100000,
                             tooltip=f"Training steps (paper: {PAPER.steps})."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1e-2, step=1e-6, round=False,
                               tooltip=f"AdamW learning rate, constant (paper: {PAPER.learning_rate:g}). 0: the recipe's "
                                       f"(B-LoRA {PAPER.learning_rate:g}, style LoRA {STYLE.learning_rate:g})."),
                io.Int.Input("rank", default=0, min=0, max=256,
                             tooltip=f"LoRA rank (paper: {PAPER.rank}). 0: the recipe's (B-LoRA {PAPER.rank}, style "
                                     f"LoRA {STYLE.rank})."),
                seed_input(),
                io.String.Input("lora_name", default="b-lora/my_image",
                                tooltip="Output file inside the loras folder (subfolders allowed); .safetensors is added."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=DEFAULT_PRECISION,
                               tooltip="fp16 with a gradient scaler (the paper's), bf16, or fp32. On a CPU fp16 runs as fp32."),
                io.Int.Input("checkpoint_every", default=PAPER.checkpoint_every, min=0, max=100000, optional=True,
                             tooltip="Save a resumable checkpoint every N steps (0: only on Cancel or error)."),
                resume_input(),
                io.Combo.Input("recipe", options=[m.recipe.name for m in RECIPES], default=PAPER.name, optional=True,
                               tooltip=f"What to train. '{STYLE.name}' is the style-LoRA recipe of "
                                       f"Diffusion-LoRA-Style-Transfer (rank {STYLE.rank}, alpha {STYLE.alpha:g}, lr "
                                       f"{STYLE.learning_rate:g}, weight decay {STYLE.weight_decay:g}, no clipping, "
                                       f"{STYLE.batch_size} images a step); rank / learning rate / alpha at 0 take it."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip=f"LoRA alpha (scale = alpha / rank). 0: the recipe's (B-LoRA: alpha = rank; "
                                       f"style LoRA: {STYLE.alpha:g})."),
                io.String.Input("prompt", default="A [v]", optional=True,
                                tooltip="The prompt text, recorded in the file's metadata (conditioning carries no text)."),
                io.Boolean.Input("export_diffusers", default=False, optional=True,
                                 tooltip="Also write <name>_diffusers/pytorch_lora_weights.safetensors in the official "
                                         "B-LoRA / diffusers format."),
                preview_input("LoRA", "UNet"),
            ],
            model_tooltip="The model with the trained LoRA applied.",
            file_outputs=[
                io.String.Output(display_name="lora_name", tooltip="The saved file, relative to the loras folder."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, steps: int, learning_rate: float, rank: int, seed: int,
                lora_name: str, precision: str, checkpoint_every: int = PAPER.checkpoint_every, resume: bool = False,
                recipe: str = PAPER.name, alpha: float = 0.0, prompt: str = "A [v]", export_diffusers: bool = False,
                preview_every: int = 0, memory: str = memory_settings.AUTO, overwrite: bool = False) -> io.NodeOutput:
        method = methods.by_recipe_name(recipe)
        rank, learning_rate, alpha = method.recipe.resolved(rank, learning_rate, alpha)
        # The executor runs nodes under inference mode; tensors made there cannot take part in
        # autograd, so everything the training touches is made outside it.
        outputs = training_run.output_files(lora_name, overwrite=overwrite)  # a bad name is refused before any work
        with torch.inference_mode(False):
            inputs = training_run.TrainingInputs.of(model, latents, positive, "Train B-LoRA")
            shapes = inputs.shapes(method)
            config = inputs.config(method, steps, learning_rate, rank, alpha, seed, precision, checkpoint_every, shapes)
            job = lora_job(method, config, outputs, shapes, prompt, export_diffusers)
            result = training_run.run(job, inputs, cls.hidden.unique_id if cls.hidden else None, resume, memory,
                                      "Train B-LoRA", preview_every)
            trained = host_model.patched_clone(model, trained_weights(job), 1.0)
        return training_output(NODE_ID, lora_name, job, result, trained)


NODES = [TrainBLoRA]
