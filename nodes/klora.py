"""K-LoRA Fuse: a content LoRA and a style LoRA fused with no training (K-LoRA, CVPR 2025)."""

from __future__ import annotations

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..core import flux_lora, klora
from ..host import flux_lora as host_flux_lora, flux_training, model as host_model, step_patches
from ..methods.sdxl import K_LORA
from .schema import CATEGORY, discovery

WRAPPER_KEY = "blora_klora_fuse"


def _fused(model, content, style, settings: klora.KLoRASettings, content_strength: float, style_strength: float):
    """A clone: plain patches where only one file (or no attention projection) is involved, and
    K-LoRA layers, switched per call by the sampling wrapper, where both files change a projection."""
    for weights in (content, style):
        host_model.check_shapes(model, weights)
    fusion = klora.plan_fusion(content, style, comfy.model_management.get_torch_device())
    patched = model
    for plain, strength in ((fusion.plain_content, content_strength), (fusion.plain_style, style_strength)):
        if plain.layers:
            patched = host_model.patched_clone(patched, plain, strength)
    schedule = klora.KLoRASchedule(settings, len(fusion.switched))
    layers = klora.layer_factories(fusion, content, style, schedule, content_strength, style_strength)
    return step_patches.clone_with_step_layers(patched, layers, schedule, WRAPPER_KEY)


def _read_flux(model, lora_name: str):
    import safetensors.torch

    path = host_model.lora_file_path(lora_name)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{lora_name}: FLUX LoRAs are read from .safetensors files.")
    config = model.model.model_config.unet_config
    return flux_lora.read_pieces(safetensors.torch.load_file(path), config["hidden_size"], config["mlp_ratio"],
                                 lora_name)


def _fused_flux(model, content, style, settings: klora.KLoRASettings, content_strength: float, style_strength: float):
    """FLUX: both files cut into the pieces diffusers names (q/k/v of fused layers), K-LoRA on the
    attention pieces both change, each adding into its rows of the fused module; the rest patched
    through ComfyUI's FLUX key map."""
    config = model.model.model_config.unet_config
    fusion = klora.plan_fusion(content, style, comfy.model_management.get_torch_device(),
                               switchable=flux_lora.ATTENTION_PIECES.match, order=str)
    patched = model
    for plain, strength, what in ((fusion.plain_content, content_strength, "content LoRA"),
                                  (fusion.plain_style, style_strength, "style LoRA")):
        if plain.layers:
            patched = host_flux_lora.patched_clone(patched, flux_lora.pieces_state_dict(plain), strength, what)
    schedule = klora.KLoRASchedule(settings, len(fusion.switched))
    layers = klora.layer_factories(
        fusion, content, style, schedule, content_strength, style_strength,
        module_of=lambda piece: flux_lora.piece_target(piece, config["hidden_size"], config["mlp_ratio"]))
    return step_patches.clone_with_step_layers(patched, layers, schedule, WRAPPER_KEY)


class KLoRAFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = folder_paths.get_filename_list(host_model.LORAS_FOLDER)
        return io.Schema(
            node_id="KLoRAFuse",
            display_name="K-LoRA Fuse",
            category=CATEGORY,
            **discovery("KLoRAFuse", "klora", "fuse", "merge lora", "content", "style", "subject", "flux"),
            description=(
                "K-LoRA (Ouyang et al., CVPR 2025): fuses a content (subject) LoRA and a style LoRA with no training. "
                "On every attention projection both files change, each call uses either the content or the style "
                "delta: content when (K_c / gamma) / (K_s * S) > 1, with K the sum of the rank_c * rank_s largest "
                "|delta| entries, gamma the files' balance and S = alpha * (t mod T) / T + beta rising over sampling. "
                "Layers only one file changes get that file's delta. Works with B-LoRA, kohya, PEFT and diffusers files."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL or FLUX.1 model; a patched clone comes out."),
                io.Combo.Input("content_lora", options=loras, tooltip="The subject / content LoRA."),
                io.Combo.Input("style_lora", options=loras, tooltip="The style LoRA."),
                io.Combo.Input("pattern", options=list(klora.PATTERNS), default=K_LORA.defaults["pattern"], optional=True,
                               tooltip="How S (the weight on the style LoRA in the choice) moves over sampling. s* "
                                       "(official default): (alpha x progress + beta) mod alpha, high for the first "
                                       "steps, then from 0 rising again: style first, then content, style growing "
                                       "towards the end. s: rises from beta to beta + alpha: content early, style late."),
                io.Float.Input("alpha", default=klora.DEFAULT_ALPHA, min=0.01, max=10.0, step=0.01, optional=True,
                               tooltip=f"How far S rises over sampling (official: {klora.DEFAULT_ALPHA:g})."),
                io.Float.Input("beta", default=0.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip=f"Where S starts; 0 = the pattern's default (official: {K_LORA.defaults['beta_s*']:g} "
                                       f"x alpha for s*, {K_LORA.defaults['beta_s']:g} for s)."),
                io.Combo.Input("schedule", options=list(klora.SCHEDULES), default=klora.SCHEDULES[0], optional=True,
                               tooltip="normalized: t = step x layers + the layer's order, T = steps x layers, so S "
                                       "makes one cycle over any number of steps. official: t counts every layer "
                                       f"call, T = {klora.OFFICIAL_SUM_TIMESTEPS} (SDXL, 50 steps, cond and uncond "
                                       "batched)."),
                io.Float.Input("content_strength", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="Scales the content delta where it is chosen (linear, as ComfyUI's loaders)."),
                io.Float.Input("style_strength", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                               tooltip="Scales the style delta where it is chosen."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the two LoRAs fused, layer by layer and step by step.")],
        )

    @classmethod
    def validate_inputs(cls, content_lora: str, style_lora: str) -> bool:
        return host_model.require_lora_files(content_lora, style_lora)

    @classmethod
    def execute(cls, model, content_lora: str, style_lora: str, pattern: str = K_LORA.defaults["pattern"],
                alpha: float = klora.DEFAULT_ALPHA, beta: float = 0.0, schedule: str = klora.SCHEDULES[0],
                content_strength: float = 1.0, style_strength: float = 1.0) -> io.NodeOutput:
        settings = klora.KLoRASettings(pattern=pattern, alpha=alpha, beta=beta, schedule=schedule)
        if flux_training.is_flux1(model):
            content, style = _read_flux(model, content_lora), _read_flux(model, style_lora)
            return io.NodeOutput(_fused_flux(model, content, style, settings, content_strength, style_strength))
        try:
            host_model.require_sdxl(model, "K-LoRA Fuse", flux_note=False)
        except ValueError as error:
            raise ValueError(f"{error} It also fuses FLUX LoRAs on FLUX.1 models "
                             f"({flux_training.SUPPORTED_FAMILIES}).") from None
        content = host_model.read_lora(content_lora)
        style = host_model.read_lora(style_lora)
        return io.NodeOutput(_fused(model, content, style, settings, content_strength, style_strength))


NODES = [KLoRAFuse]
