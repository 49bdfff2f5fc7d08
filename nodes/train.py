"""Train B-LoRA: the in-process fine-tune of SDXL's two B-LoRA blocks on the user's own model."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..core import lora_format
from ..training import checkpoint, recipes
from ..training import memory as memory_settings
from ..training.lora_adapters import LoraAdapterSet
from ..training.trainer import PRECISIONS
from ..host import model as host_model
from ..host.training_run import TrainingRun, finish, memory_input, prepare

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
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1e-2, step=1e-6, round=False,
                               tooltip="AdamW learning rate, constant (paper: 5e-5). 0: the recipe's (B-LoRA 5e-5, "
                                       "style LoRA 1e-5)."),
                io.Int.Input("rank", default=0, min=0, max=256,
                             tooltip="LoRA rank (paper: 64). 0: the recipe's (B-LoRA 64, style LoRA 8)."),
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
                                       "Diffusion-LoRA-Style-Transfer (rank 8, alpha 16, lr 1e-5, weight decay 0.01, "
                                       "no clipping, 2 images a step); rank / learning rate / alpha at 0 take it."),
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
                memory_input(),
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
                export_diffusers: bool = False, preview_every: int = 0,
                memory: str = memory_settings.AUTO) -> io.NodeOutput:
        if recipe not in recipes.RECIPES:
            raise ValueError(f"Unknown recipe {recipe!r}; choose one of {list(recipes.RECIPES)}.")
        chosen = recipes.RECIPES[recipe]
        rank, learning_rate, alpha = chosen.settings(rank, learning_rate, alpha)
        # The executor runs nodes under inference mode; tensors made there cannot take part in
        # autograd, so everything the training touches is made outside it.
        with torch.inference_mode(False):
            prepared = prepare(model, latents, positive, "Train B-LoRA", lora_name, chosen, steps, learning_rate, seed,
                               precision, checkpoint_every)
            adapters = LoraAdapterSet(prepared.shapes, rank, alpha)
            adapters.reset(seed)
            metadata = prepared.metadata("B-LoRA" if chosen is recipes.B_LORA else "LoRA", chosen.name, rank, alpha,
                                         prompt)

            def lora_file():
                return lora_format.to_kohya_state_dict(adapters.to_lora_weights()), metadata

            run = TrainingRun(model, prepared, adapters,
                              {"recipe": chosen.name, "rank": str(rank), "alpha": f"{alpha:g}", "seed": str(seed)},
                              {checkpoint.checkpoint_path(prepared.final_path): lora_file},
                              weight_wrappers=dict(adapters.items()), preview_every=preview_every,
                              trainer="b-lora", memory=memory)
            state = run.run(cls.hidden.unique_id if cls.hidden is not None else None, resume, "Train B-LoRA")
            trained = adapters.to_lora_weights(metadata)
            outputs = {prepared.final_path: lora_file()}
            if export_diffusers:
                outputs[prepared.final_path.with_name(prepared.final_path.stem + "_diffusers")
                        / "pytorch_lora_weights.safetensors"] = (lora_format.to_official_state_dict(trained),
                                                                 {"format": "pt"})
            return finish(run, state, outputs, host_model.patched_clone(model, trained, 1.0), [prepared.final_path])


