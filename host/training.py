"""The host side of training: turn ComfyUI objects into what ``training.trainer`` needs, and
leave the user's model exactly as it was on every exit path.

The training clone carries the LoRA adapters as weight wrappers (``ModelPatcher.add_weight_wrapper``):
the host applies them in each forward on the shared module without changing any weight.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

import torch

import comfy.model_base
import comfy.model_management
import comfy.utils

from ..core import layer_sets
from ..methods import LayerSet
from ..training import gradient_checkpointing
from ..training.diffusion import alphas_cumprod_from_sigmas
from . import compat

OFFICIAL_RESOLUTION = 1024
"""The official script's size conditioning: (1024, 1024, 0, 0, 1024, 1024) whatever the image."""

SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


@dataclass
class ImageConditioning:
    context: torch.Tensor
    """(1, tokens, 2048) cross-attention context."""
    y: torch.Tensor
    """(1, 2816) SDXL's pooled text + size embedding."""


def prediction_type(model) -> str:
    model_type = model.model.model_type
    if model_type == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if model_type == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise ValueError(f"Training supports epsilon and v-prediction SDXL models; this one is {model_type.name}.")


def noise_schedule(model) -> torch.Tensor:
    return alphas_cumprod_from_sigmas(model.get_model_object("model_sampling").sigmas.detach().cpu())


def training_latents(model, latents: dict) -> torch.Tensor:
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if samples is None or samples.ndim != 4 or samples.shape[0] == 0:
        found = "nothing" if samples is None else f"a tensor of shape {tuple(samples.shape)}"
        raise ValueError(f"The latents input holds {found}; encode at least one image with VAE Encode.")
    channels = model.model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ValueError(f"The latents have {samples.shape[1]} channels but this model works on {channels}: "
                         "encode the image with the VAE of the same SDXL checkpoint.")
    if not torch.isfinite(samples).all():
        raise ValueError("The latents contain NaN/inf: the VAE overflowed (an fp16 SDXL VAE does this); "
                         "use the fp16-fix VAE or run the VAE in fp32 (--fp32-vae).")
    return model.model.process_latent_in(samples.detach().clone().float())


def conditioning_per_image(model, positive, num_images: int) -> list[ImageConditioning]:
    """One conditioning for all images, or one per image in order (the captions of a multi-image run)."""
    if not positive:
        raise ValueError("The positive conditioning is empty; connect a text encoder's output (prompt 'A [v]').")
    context_dim = model.model.model_config.unet_config["context_dim"]
    entries = []
    for cond, extras in positive:
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise ValueError("The conditioning has no pooled output, so it is not from an SDXL text encoder. Encode "
                             "the prompt with the CLIP of the same SDXL checkpoint.")
        if cond.shape[-1] != context_dim:
            raise ValueError(f"The conditioning has {cond.shape[-1]} features per token but this model expects "
                             f"{context_dim}: it was encoded by another model's text encoder.")
        size = {key: extras.get(key, OFFICIAL_RESOLUTION if "crop" not in key else 0) for key in SIZE_KEYS}
        for row in range(cond.shape[0]):
            y = model.model.encode_adm(pooled_output=pooled[row:row + 1], **size)
            entries.append(ImageConditioning(cond[row:row + 1].detach().clone(), y.detach().clone()))
    if len(entries) == 1:
        return entries * num_images
    if len(entries) != num_images:
        raise ValueError(f"{num_images} latent image(s) but {len(entries)} conditionings: give one prompt for "
                         "all images, or one per image in the same order (e.g. with Conditioning Combine).")
    return entries


def target_shapes(model, layers: LayerSet) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of each layer of ``model`` that ``layers`` selects."""
    weights = model.model_state_dict("diffusion_model.")
    paths = [key[len("diffusion_model."):-len(".weight")] for key in weights if key.endswith(".weight")]
    shapes = {path: tuple(weights[f"diffusion_model.{path}.weight"].shape) for path in layer_sets.select(layers, paths)}
    if not shapes:
        raise ValueError(f"The model has no layers of the kind this method trains ({', '.join(layers.projections)}); "
                         f"is it an {layers.family} model?")
    return shapes


def base_weights_sha256(model, paths) -> str:
    """A fingerprint of the base weights the LoRA was trained against."""
    digest = hashlib.sha256()
    weights = model.model_state_dict("diffusion_model.")
    for path in sorted(paths):
        tensor = weights[f"diffusion_model.{path}.weight"].detach().to("cpu").contiguous()
        digest.update(path.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def free_vram_gib() -> float | None:
    """VRAM training could use at start: free memory plus what models loaded now would release
    when unloaded (the host unloads them to make room). None on a CPU."""
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        return None
    loaded = sum(m.model_loaded_memory() for m in comfy.model_management.current_loaded_models
                 if getattr(m, "device", device) == device)
    return (comfy.model_management.get_free_memory(device) + loaded) / 2**30


def _thaw_inference_tensors(module: torch.nn.Module) -> int:
    """Autograd cannot save inference tensors (the host loads models under inference mode);
    swap each such parameter for an ordinary tensor with the same values, one at a time."""
    thawed = 0
    for name, param in list(module.named_parameters()):
        if param.is_inference():
            comfy.utils.set_attr_param(module, name, param.detach().clone())
            thawed += 1
    return thawed


def _unload(model_patcher, disposable: bool) -> None:
    """Takes ``model_patcher`` off the host's loaded models. A disposable one is only let go of:
    its weights stay where they are and are freed with it, instead of first being copied to
    the offload device (RAM) and unpatched, which only a module that lives on needs."""
    for loaded in list(comfy.model_management.current_loaded_models):
        if loaded.model is model_patcher:
            loaded.model_unload(unpatch_weights=not disposable)
            comfy.model_management.current_loaded_models.remove(loaded)


@contextlib.contextmanager
def training_model(model, trainable: torch.nn.Module, weight_wrappers: dict | None = None,
                   module_wrappers: dict | None = None, recomputed_layers: int | None = 0):
    """A clone of ``model`` (of the host's non-dynamic delegate under dynamic VRAM, which lives
    only as long as this context, see ``compat.trainable_patcher``) loaded for training ``trainable``.

    ``weight_wrappers`` maps module paths to functions of the weight (``W -> W + delta``), added
    with ``ModelPatcher.add_weight_wrapper``; ``module_wrappers`` maps module paths to functions
    that wrap the module itself (e.g. a LoRA on another input), added as object patches. The
    host applies both to the shared module only while the clone is loaded. The first
    ``recomputed_layers`` of the layers backward traverses (None: every one, the ``8 GB`` memory
    setting; see ``training.memory.recomputed_layers``) recompute their activations in backward. Yields
    ``(clone, device)``; on exit, success or not, the clone is unloaded (weights and modules
    restored by the host; a disposable delegate is let go of where it is), the wrappers are taken
    off and every grad flag is restored.
    """
    weight_wrappers = weight_wrappers or {}
    with compat.trainable_patcher(model) as (base, disposable):
        clone = base.clone()
        for path, wrapper in weight_wrappers.items():
            clone.add_weight_wrapper(f"diffusion_model.{path}.weight", wrapper)
        for path, wrap in (module_wrappers or {}).items():
            name = f"diffusion_model.{path}"
            clone.add_object_patch(name, wrap(base.get_model_object(name)))
        unet = clone.model.diffusion_model
        requires_grad = {name: param.requires_grad for name, param in unet.named_parameters()}
        try:
            with torch.inference_mode(False):
                comfy.model_management.load_models_gpu([clone], force_full_load=True)
                device = clone.load_device
                trainable.to(device)
                thawed = _thaw_inference_tensors(unet)
                logging.debug("B-LoRA training: %d frozen weights made autograd-ready", thawed)
                unet.requires_grad_(False)  # gradients for the trained parameters only; backward stops early
                trainable.requires_grad_(True)
                trained = [*weight_wrappers, *(module_wrappers or {})]
                layers = gradient_checkpointing.backward_path_layers(unet, trained)[:recomputed_layers]
                with gradient_checkpointing.checkpointed(layers):
                    yield clone, device
        finally:
            _unload(clone, disposable)
            for path, wrapper in weight_wrappers.items():
                module = comfy.utils.get_attr(unet, path)
                if any(f is wrapper for f in getattr(module, "weight_function", [])):
                    module.weight_function = [f for f in module.weight_function if f is not wrapper]
            for name, param in unet.named_parameters():
                param.requires_grad_(requires_grad.get(name, False))
            trainable.to("cpu")


def unet_predict(clone, conditionings: list[ImageConditioning], device: torch.device):
    """``predict(noisy, timesteps, index)``: the raw UNet output for image ``index``, fed the way
    the host's own ``apply_model`` feeds it (inputs in the UNet's compute dtype)."""
    unet = clone.model.diffusion_model
    dtype = clone.model.manual_cast_dtype or clone.model.get_dtype()
    prepared = [(c.context.to(device, dtype), c.y.to(device, dtype)) for c in conditionings]

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        context, y = prepared[index]
        return unet(noisy.to(dtype), timesteps=timesteps, context=context, y=y)

    return predict


PREVIEW_STEPS = 8


def preview_image(clone, predict, latent_shape, schedule, config, device):
    """A PIL image of a quick sample from the model as it is now (the LoRA being trained
    included), shown through the host's own latent-to-RGB previewer: no VAE needed."""
    import latent_preview

    from ..training.preview import sample
    from ..training.trainer import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES[config.precision]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        latent = sample(predict, latent_shape, schedule, PREVIEW_STEPS, config.seed, config.prediction, device=device)
    latent_format = clone.model.latent_format
    previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias)
    return previewer.decode_latent_to_preview(latent)
