"""Train UnZipLoRA: a content LoRA and a style LoRA from one image, trained jointly."""

from __future__ import annotations

import functools

import torch

from comfy_api.latest import io

from ..core import column_masks, lora_format
from ..core.lora_format import LoraLayer, LoraWeights
from ..training import checkpoint, recipes
from ..training import memory as memory_settings, unziplora
from ..training.trainer import PRECISIONS
from ..host import training as host_training, unzip_recombine
from ..host.training_run import TrainingRun, finish, memory_input, prepare

CATEGORY = "B-LoRA"


def _prompt_context(model, conditioning, what: str) -> torch.Tensor:
    """The token embeddings one LoRA sees in cross-attention (prompt separation)."""
    if not conditioning or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise ValueError(f"The {what} conditioning must be one prompt (e.g. 'A monadikos cat' for content).")
    return host_training.conditioning_per_image(model, conditioning, 1)[0].context


class TrainUnZipLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UnZipLoRATrain",
            display_name="Train UnZipLoRA",
            category=CATEGORY,
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
                io.Int.Input("steps", default=600, min=1, max=100000, tooltip="Training steps (paper: 600)."),
                io.Float.Input("content_learning_rate", default=5e-5, min=1e-7, max=1e-2, step=1e-6, round=False),
                io.Float.Input("style_learning_rate", default=5e-5, min=1e-7, max=1e-2, step=1e-6, round=False),
                io.Float.Input("merger_learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=False,
                               tooltip="Learning rate of the per-column mergers (paper: 5e-3)."),
                io.Int.Input("rank", default=64, min=1, max=256),
                io.Int.Input("sample_times", default=3, min=1, max=100,
                             tooltip="How many times columns are chosen (one period each)."),
                io.Float.Input("column_ratio", default=0.1, min=0.001, max=1.0, step=0.01,
                               tooltip="Fraction of columns added to each mask per period."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                io.String.Input("lora_name", default="unziplora/my_image",
                                tooltip="Output name in the loras folder; _content and _style files are written."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp16"),
                io.Int.Input("checkpoint_every", default=200, min=0, max=100000, optional=True),
                io.Boolean.Input("resume", default=False, optional=True),
                io.Boolean.Input("prompt_separation", default=True, optional=True,
                                 tooltip="Each LoRA sees its own prompt in cross-attention keys/values."),
                io.Boolean.Input("column_separation", default=True, optional=True,
                                 tooltip="Column masks and mergers (off: both LoRAs use every column)."),
                io.Boolean.Input("block_separation", default=True, optional=True,
                                 tooltip="In style blocks the style LoRA uses every column, in content blocks the "
                                         "content LoRA (off: both sparse everywhere)."),
                io.Boolean.Input("avoid_content_columns", default=True, optional=True,
                                 tooltip="The style LoRA does not pick columns the content LoRA holds."),
                io.Float.Input("overlap_weight", default=0.5, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Weight of the merger overlap term in the loss (paper: 0.5)."),
                io.String.Input("prompt", default="", optional=True, tooltip="Prompt text for the files' metadata."),
                io.Float.Input("cone_threshold", default=unziplora.UNSCALED_CONE_THRESHOLD, min=0.0, max=1.0,
                               step=1e-12, round=False, optional=True,
                               tooltip="Column scores count input rows with |W x G| above this, on unscaled "
                                       "gradients. The default equals the official 1e-5 at fp16 loss scale 2^16."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every N steps, show a quick sample of the LoRAs being trained (0: off)."),
                memory_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with both LoRAs merged (mergers applied)."),
                io.String.Output(display_name="content_lora"),
                io.String.Output(display_name="style_lora"),
                io.Image.Output(display_name="loss_curve"),
                io.LossMap.Output(display_name="loss"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, content_positive, style_positive, steps, content_learning_rate,
                style_learning_rate, merger_learning_rate, rank, sample_times, column_ratio, seed, lora_name,
                precision, checkpoint_every=200, resume=False, prompt_separation=True, column_separation=True,
                block_separation=True, avoid_content_columns=True, overlap_weight=0.5, prompt="",
                cone_threshold=unziplora.UNSCALED_CONE_THRESHOLD, preview_every=0,
                memory=memory_settings.AUTO) -> io.NodeOutput:
        settings = unziplora.UnZipConfig(
            sample_times=sample_times, column_ratio=column_ratio, merger_learning_rate=merger_learning_rate,
            style_learning_rate=style_learning_rate, overlap_weight=overlap_weight,
            prompt_separation=prompt_separation, column_separation=column_separation,
            block_separation=block_separation, avoid_content_columns=avoid_content_columns,
            cone_threshold=cone_threshold)
        with torch.inference_mode(False):
            prepared = prepare(model, latents, positive, "Train UnZipLoRA", lora_name, recipes.UNZIPLORA, steps,
                               content_learning_rate, seed, precision, checkpoint_every)
            role_contexts = {"content": _prompt_context(model, content_positive, "content"),
                             "style": _prompt_context(model, style_positive, "style")}
            layers = unziplora.make_layers(prepared.shapes, rank, settings, seed)
            method = unziplora.UnZipMethod(layers, steps, content_learning_rate, settings)
            metadata = {role: {**prepared.metadata("UnZipLoRA", f"UnZipLoRA {role}", rank, float(rank), prompt),
                               "unziplora.role": role} for role in unziplora.ROLES}

            def lora_file(role):
                return (lora_format.to_kohya_state_dict(_role_weights(layers, role)),
                        _with_mergers(metadata[role], layers, role))

            checkpoint_files = {checkpoint.checkpoint_path(prepared.final_path, f"_{role}"):
                                functools.partial(lora_file, role) for role in unziplora.ROLES}
            run = TrainingRun(model, prepared, method.modules,
                              {"method": "UnZipLoRA", "rank": str(rank), "seed": str(seed), "settings": repr(settings),
                               "steps": str(steps)},
                              checkpoint_files, method=method,
                              module_wrappers=unziplora.module_wrappers(layers, role_contexts, settings),
                              preview_every=preview_every, trainer="unziplora", memory=memory)
            state = run.run(cls.hidden.unique_id if cls.hidden is not None else None, resume, "Train UnZipLoRA")
            method.finish()
            outputs = {prepared.beside(f"_{role}"): lora_file(role) for role in unziplora.ROLES}
            # recombined as the official inference runs it: each LoRA sees its own prompt in k/v
            merged = unzip_recombine.recombined(
                model, {role: column_masks.scale_rows(_role_weights(layers, role), _mergers(layers, role))
                        for role in unziplora.ROLES},
                contexts=role_contexts if settings.prompt_separation else None)
            return finish(run, state, outputs, merged, list(outputs))


def _role_weights(layers: dict, role: str) -> LoraWeights:
    trained = {}
    for path, layer in layers.items():
        down, up = layer.saved_factors(role)
        trained[path] = LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
    return LoraWeights(trained)


def _mergers(layers: dict, role: str) -> dict[str, torch.Tensor]:
    return {path: getattr(layer, f"merge_{role}").detach().float().cpu() for path, layer in layers.items()}


def _with_mergers(metadata: dict[str, str], layers: dict, role: str) -> dict[str, str]:
    return {**metadata, column_masks.MERGERS_METADATA_KEY: column_masks.mergers_to_metadata(_mergers(layers, role))}
