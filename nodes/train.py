"""Train B-LoRA: the in-process fine-tune of SDXL's two B-LoRA blocks on the user's own model."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import folder_paths
import comfy.model_management
from comfy_api.latest import io, ui

from ..core import files, lora_format, loss_plot, sdxl_unet
from ..training import checkpoint, recipes
from ..training.lora_adapters import LoraAdapterSet
from ..training.trainer import PRECISIONS, TrainConfig
from ..host import model as host_model, training as host_training
from ..host.training_run import TrainingRun, file_metadata, precision_for

CATEGORY = "B-LoRA"


class TrainBLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BLoRATrain",
            display_name="Train B-LoRA",
            category=CATEGORY,
            description=(
                "Fine-tunes LoRA on SDXL's two B-LoRA blocks (content output_blocks.0.1, style output_blocks.1.1) to "
                "reconstruct the image(s), inside ComfyUI, on the loaded model (no second copy). The file lands in "
                "the loras folder, ready for Load Content LoRA / Load Style LoRA. Cancel saves a checkpoint."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to train on. It is not changed."),
                io.Latent.Input("latents", tooltip="One or more images encoded with VAE Encode (about 1024 px)."),
                io.Conditioning.Input("positive", tooltip="The prompt, e.g. 'A [v]'; one for all images or one per image."),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Training steps (paper: 1000)."),
                io.Float.Input("learning_rate", default=5e-5, min=1e-7, max=1e-2, step=1e-6, round=False,
                               tooltip="AdamW learning rate, constant (paper: 5e-5)."),
                io.Int.Input("rank", default=64, min=1, max=256, tooltip="LoRA rank (paper: 64)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seeds the LoRA init, timesteps and noise."),
                io.String.Input("lora_name", default="b-lora/my_image",
                                tooltip="Output file inside the loras folder (subfolders allowed); .safetensors is added."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp16",
                               tooltip="fp16 with a gradient scaler (the paper's), bf16, or fp32. On a CPU fp16 runs as fp32."),
                io.Int.Input("checkpoint_every", default=250, min=0, max=100000, optional=True,
                             tooltip="Save a resumable checkpoint every N steps (0: only on Cancel or error)."),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue from this lora_name's checkpoint (same settings) instead of starting over."),
                io.Combo.Input("recipe", options=list(recipes.RECIPES), default=recipes.B_LORA.name, optional=True,
                               tooltip="What to train. 'all attention layers' is the style-LoRA recipe of "
                                       "Diffusion-LoRA-Style-Transfer: use rank 8, learning rate 1e-5 with it."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="LoRA alpha (scale = alpha / rank). 0: the recipe's (B-LoRA: alpha = rank; "
                                       "style LoRA: 16)."),
                io.String.Input("prompt", default="A [v]", optional=True,
                                tooltip="The prompt text, recorded in the file's metadata (conditioning carries no text)."),
                io.Boolean.Input("export_diffusers", default=False, optional=True,
                                 tooltip="Also write <name>_diffusers/pytorch_lora_weights.safetensors in the official "
                                         "B-LoRA / diffusers format."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every N steps, show a quick sample of the LoRA being trained on this node "
                                     "(0: off). Costs a few UNet passes each time."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The saved file, relative to the loras folder."),
                io.Image.Output(display_name="loss_curve", tooltip="Per-step loss with a smoothed line."),
                io.LossMap.Output(display_name="loss", tooltip="Per-step losses ({'loss': [...]})."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, steps: int, learning_rate: float, rank: int, seed: int,
                lora_name: str, precision: str, checkpoint_every: int = 250, resume: bool = False,
                recipe: str = recipes.B_LORA.name, alpha: float = 0.0, prompt: str = "A [v]",
                export_diffusers: bool = False, preview_every: int = 0) -> io.NodeOutput:
        # The executor runs nodes under inference mode; tensors made there cannot take part in
        # autograd, so everything the training touches is made outside it.
        with torch.inference_mode(False):
            return cls._train(model, latents, positive, steps, learning_rate, rank, seed, lora_name, precision,
                              checkpoint_every, resume, recipe, alpha, prompt, export_diffusers, preview_every)

    @classmethod
    def _train(cls, model, latents, positive, steps, learning_rate, rank, seed, lora_name, precision,
               checkpoint_every, resume, recipe, alpha, prompt, export_diffusers, preview_every) -> io.NodeOutput:
        loras_root = Path(folder_paths.get_folder_paths(host_model.LORAS_FOLDER)[0])
        final_path = files.path_inside(loras_root, lora_name)
        host_model.require_sdxl(model, "Train B-LoRA")
        if recipe not in recipes.RECIPES:
            raise ValueError(f"Unknown recipe {recipe!r}; choose one of {list(recipes.RECIPES)}.")
        chosen = recipes.RECIPES[recipe]
        lora_alpha = alpha if alpha > 0 else chosen.alpha
        samples = host_training.training_latents(model, latents)
        conditionings = host_training.conditioning_per_image(model, positive, samples.shape[0])
        shapes = host_training.target_shapes(model, chosen)
        adapters = LoraAdapterSet(shapes, rank, lora_alpha)
        adapters.reset(seed)
        device = comfy.model_management.get_torch_device()
        config = TrainConfig(steps=steps, learning_rate=learning_rate, seed=seed,
                             precision=precision_for(device, precision), checkpoint_every=checkpoint_every,
                             prediction=host_training.prediction_type(model))
        blocks = sorted({sdxl_unet.block_of(p) for p in shapes})
        alpha_value = float(rank if lora_alpha is None else lora_alpha)
        metadata = file_metadata("B-LoRA" if chosen is recipes.B_LORA else "LoRA", chosen.name, blocks, rank,
                                 alpha_value, steps, learning_rate, seed, config.precision, prompt,
                                 host_training.base_weights_sha256(model, shapes))
        fingerprint = {"recipe": chosen.name, "rank": str(rank), "alpha": str(lora_alpha), "seed": str(seed),
                       "images": str(samples.shape[0]), "base_model_sha256": metadata["blora.base_model_sha256"]}
        checkpoint_file = checkpoint.checkpoint_path(final_path)

        def checkpoint_lora():
            return lora_format.to_kohya_state_dict(adapters.to_lora_weights()), metadata

        run = TrainingRun(model, samples, conditionings, adapters, config, final_path, fingerprint,
                          {checkpoint_file: checkpoint_lora},
                          weight_wrappers=dict(adapters.items()), preview_every=preview_every)
        state = run.run(cls.hidden.unique_id if cls.hidden is not None else None, resume, "Train B-LoRA")
        trained = adapters.to_lora_weights({**metadata, "blora.created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        saved = _save_outputs(trained, final_path, export_diffusers)
        run.remove_checkpoint()
        relative = saved.relative_to(loras_root).as_posix()
        patched = host_model.patched_clone(model, trained, 1.0)
        return io.NodeOutput(patched, relative, loss_plot.loss_curve_image(state.losses), {"loss": state.losses},
                             ui=ui.PreviewText(f"saved {relative} ({state.step} steps, last loss {state.losses[-1]:.4f})"))


def _save_outputs(trained, final_path: Path, export_diffusers: bool) -> Path:
    files.save_safetensors_atomic(lora_format.to_kohya_state_dict(trained), final_path, trained.metadata)
    if export_diffusers:
        folder = final_path.with_name(final_path.stem + "_diffusers")
        files.save_safetensors_atomic(lora_format.to_official_state_dict(trained),
                                      folder / "pytorch_lora_weights.safetensors", {"format": "pt"})
    return final_path
