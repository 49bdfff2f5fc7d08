"""A tiny FLUX.1-architecture transformer built with ComfyUI's own classes, and its diffusers
twin holding the same weights through ComfyUI's ``flux_to_diffusers`` map: the reference
harness for FLUX work, as ``tiny_models`` is for SDXL.

The tiny model keeps FLUX.1-dev's topology (19 double and 38 single blocks, so SplitFlux's
paper block numbers hold; guidance embedding; patch 2; 16 latent channels) at hidden size 64
(4 heads of 16, rope axes [4, 6, 6]), about 5.3 M parameters.

How the two models are fed the same thing (checked by tests/test_flux_model.py):

- latent: ComfyUI takes ``x`` as (B, 16, H, W) and patchifies it itself; diffusers takes the
  packed sequence (B, H/2 * W/2, 64) made by ``FluxPipeline._pack_latents``, which is the same
  ``b c (h 2) (w 2) -> b (h w) (c 2 2)`` rearrangement (``pack_latents`` here), and returns the
  same layout (``unpack_latents``).
- positions: diffusers needs ``img_ids`` (H/2 * W/2, 3) = (0, row, column) and ``txt_ids``
  (T, 3) = zeros; ComfyUI builds exactly these inside ``_forward`` (``process_img``).
- timestep: both take sigma in [0, 1]. ComfyUI's ``Flux.forward`` gets
  ``model_sampling.timestep(sigma) = sigma`` and its ``timestep_embedding`` multiplies by 1000;
  diffusers' transformer multiplies ``timestep`` by 1000 itself, which is why its pipeline and
  training script pass ``t / 1000`` (t in [0, 1000]). So ComfyUI ``timestep`` = diffusers
  ``timestep`` = sigma.
- guidance: the same number on both sides (e.g. 3.5): ComfyUI's embedding multiplies it by
  1000, diffusers' transformer does too. ComfyUI takes it from the conditioning's "guidance"
  (``model_base.Flux.extra_conds``, default 3.5).
- text: ``context`` (B, T, 32) = ``encoder_hidden_states``; ComfyUI's ``y`` (the pooled vector,
  conditioning "pooled_output") = diffusers' ``pooled_projections`` (B, 8).
- output: the velocity v = noise - x0 on both sides; ComfyUI's ``apply_model`` returns the
  denoised x0 = x_t - sigma * v (``model_sampling.CONST``).
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

TINY_FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 8,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [4, 6, 6],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
    "txt_ids_dims": [],
}
"""ComfyUI ``unet_config`` of the tiny model (``flux_unet_config`` drops what a host lacks)."""

FLUX1_DEV_CONFIG = dict(TINY_FLUX_CONFIG, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24,
                        axes_dim=[16, 56, 56])
"""The full-size FLUX.1-dev ``unet_config``: what ComfyUI's ``model_detection`` derives from the
checkpoint, fields left at their defaults omitted."""

NARROW_FLUX_CONFIG = dict(FLUX1_DEV_CONFIG, vec_in_dim=768 // 16, context_in_dim=4096 // 16, hidden_size=3072 // 16,
                          axes_dim=[2, 2, 4])
"""FLUX.1-dev's every block (19 double, 38 single, 24 heads each) at 1/16 of its widths (hidden
192, heads of 8, text and pooled inputs 256 and 48): as many operations as FLUX.1 for little
arithmetic, what a CPU benchmark of the per-operation cost runs (``bench/cpu_splitflux_step.py``)."""

CONTEXT_DIM = TINY_FLUX_CONFIG["context_in_dim"]
POOLED_DIM = TINY_FLUX_CONFIG["vec_in_dim"]
HIDDEN_SIZE = TINY_FLUX_CONFIG["hidden_size"]
LATENT_CHANNELS = TINY_FLUX_CONFIG["in_channels"]
TEXT_TOKENS = 8
DEFAULT_GUIDANCE = 3.5


def flux_unet_config(config: dict) -> dict:
    """``config`` reduced to the keys this host's ``FluxParams`` has (plus ``image_model``):
    0.3.64 has no ``txt_ids_dims`` and refuses it; 0.33 requires it."""
    from comfy.ldm.flux.model import FluxParams

    fields = {field.name for field in dataclasses.fields(FluxParams)} | {"image_model"}
    return {key: value for key, value in config.items() if key in fields}


def flux_model_config(config: dict = TINY_FLUX_CONFIG, dtype: torch.dtype = torch.float32,
                      manual_cast_dtype: torch.dtype | None = None):
    """ComfyUI's ``supported_models.Flux`` for ``config``, its weights in ``dtype`` (computed in
    ``manual_cast_dtype`` when given: fp8 weights, as Load Diffusion Model's ``weight_dtype`` loads them)."""
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(flux_unet_config(config))
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return model_config


def seeded_values(module: torch.nn.Module, seed: int = 0, device: torch.device | str = "cpu"):
    """``(name, value)`` for every entry of ``module``'s state dict, in order, one at a time from
    a generator on ``device``: fan-in scaled normals for matrices, 1 + noise for norm scales, small
    noise for biases. ComfyUI 0.3.64 names the q/k RMSNorm scales ``*_norm.scale`` and 0.33
    ``*_norm.weight``; both are norm scales here (a bias-like near-zero scale would flatten every
    attention map and hide position and q/k errors)."""
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in module.state_dict().items():
        noise = torch.randn(param.shape, generator=generator, device=device)
        if param.ndim >= 2:
            yield name, noise / param[0].numel() ** 0.5
        elif name.endswith((".weight", "_norm.scale")):
            yield name, 1.0 + 0.1 * noise
        else:
            yield name, 0.02 * noise


def seeded_flux_weights(transformer: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights, the same on every host (``seeded_values`` on the CPU)."""
    return dict(seeded_values(transformer, seed))


def build_flux(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
               manual_cast_dtype: torch.dtype | None = None):
    """A ComfyUI ModelPatcher around ``model_base.Flux`` of ``config`` with fixed-seed weights (the
    host's layers skip initialisation, so every parameter is set here), in ``dtype`` (computed in
    ``manual_cast_dtype`` when given), built on ``device`` (the CPU when None) and its weights
    drawn there one at a time. Under ``torch.inference_mode()`` its weights are inference tensors,
    as a checkpoint loader's are. (ComfyUI's loaders cannot read a narrow model's config from its
    weights: they take FLUX's head size of 128 as given.)"""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    with device:
        model = comfy.model_base.Flux(flux_model_config(config, dtype, manual_cast_dtype), device=device)
    state = model.diffusion_model.state_dict()  # the parameters' own storage
    with torch.no_grad():
        for name, value in seeded_values(model.diffusion_model, seed, device):
            state[name].copy_(value)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def build_tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, manual_cast_dtype: torch.dtype | None = None):
    """The tiny FLUX (``TINY_FLUX_CONFIG``) as a ComfyUI ModelPatcher: ``build_flux``."""
    return build_flux(TINY_FLUX_CONFIG, seed, dtype, manual_cast_dtype=manual_cast_dtype)


def tiny_flux_vae(seed: int = 0):
    """ComfyUI's TAESD with 16 latent channels (FLUX's latent layout; ``comfy.sd.VAE`` reads the
    channel count from the decoder's first weight) and fixed-seed weights, its scale/shift buffers
    kept."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
    parameters = dict(taesd.named_parameters())
    state = {k: v for k, v in seeded_flux_weights(taesd, seed).items() if k in parameters}
    return comfy.sd.VAE(sd={**taesd.state_dict(), **state})


FLUX_LOADERS = {"UNETLoader": "TinyFluxModelLoader", "VAELoader": "TinyFluxVAELoader"}
"""The real FLUX loaders and the fixture nodes (``devkit/fixture_nodes/tiny_flux_fixtures``) that stand in."""


def swap_flux_loaders_for_tiny(prompt: dict) -> dict:
    """An API-format FLUX prompt with its diffusion model, VAE and text encoders replaced by the
    tiny FLUX's fixture nodes (the DualCLIPLoader is dropped: the tiny text encoder needs no
    CLIP); everything else in the graph stays as it is."""
    for node_id, node in list(prompt.items()):
        if node["class_type"] in FLUX_LOADERS:
            node["class_type"], node["inputs"] = FLUX_LOADERS[node["class_type"]], {"seed": 0}
        elif node["class_type"] == "CLIPTextEncode":
            node["class_type"], node["inputs"] = "TinyFluxTextEncode", {"text": node["inputs"]["text"]}
        elif node["class_type"] == "DualCLIPLoader":
            del prompt[node_id]
    return prompt


def tiny_flux_conditioning(text: str, guidance: float | None = DEFAULT_GUIDANCE, tokens: int = TEXT_TOKENS,
                           config: dict = TINY_FLUX_CONFIG):
    """A fixed-seed CONDITIONING of FLUX's layout for ``text`` (T5 tokens (1, tokens, 32), CLIP
    pooled (1, 8) for the tiny FLUX; ``config``'s widths for another), FLUX.1-dev's distilled
    guidance, as ``CLIPTextEncodeFlux`` makes it; equal texts, equal conditioning.
    ``guidance=None`` is what ``FluxDisableGuidance`` sets."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, config["context_in_dim"], generator=generator)
    pooled = torch.randn(1, config["vec_in_dim"], generator=generator)
    return [[context, {"pooled_output": pooled, "guidance": guidance}]]


def sample_inputs(batch: int = 1, size: int = 8, tokens: int = TEXT_TOKENS, seed: int = 1):
    """Latent (B, 16, size, size), sigma (B,), context (B, tokens, 32), pooled (B, 8), guidance (B,)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, LATENT_CHANNELS, size, size, generator=generator)
    sigma = torch.linspace(0.3, 0.9, batch)
    context = torch.randn(batch, tokens, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(batch, POOLED_DIM, generator=generator)
    guidance = torch.full((batch,), DEFAULT_GUIDANCE)
    return latent, sigma, context, pooled, guidance


def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as diffusers' ``FluxPipeline._pack_latents``."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a latent of ``height`` x ``width``."""
    b, _, channels = packed.shape
    packed = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return packed.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(H/2 * W/2, 3) rope positions (0, row, column), as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def diffusers_weights(comfy_weights: dict[str, torch.Tensor], unet_config: dict,
                      wanted: set[str]) -> dict[str, torch.Tensor]:
    """ComfyUI transformer weights renamed (and sliced, and the final modulation's halves
    swapped) into the diffusers names in ``wanted``, through the host's own
    ``comfy.utils.flux_to_diffusers`` (whose map also holds aliases: LoKr and FLUX.2 names)."""
    import comfy.utils

    weights = {}
    for diffusers_key, source in comfy.utils.flux_to_diffusers(unet_config).items():
        if diffusers_key not in wanted:
            continue
        if isinstance(source, str):
            if source in comfy_weights:
                weights[diffusers_key] = comfy_weights[source]
        elif source[0] in comfy_weights:
            weight = comfy_weights[source[0]]
            if source[1] is not None:
                dim, offset, size = source[1]
                weight = weight.narrow(dim, offset, size)
            if len(source) > 2:
                weight = source[2](weight)
            weights[diffusers_key] = weight
    return weights


def diffusers_flux_from(model_patcher, dtype: torch.dtype = torch.float32):
    """A diffusers ``FluxTransformer2DModel`` holding copies of the ComfyUI model's weights, in
    ``dtype``, on the device they are on."""
    from diffusers import FluxTransformer2DModel

    unet_config = model_patcher.model.model_config.unet_config
    head_dim = unet_config["hidden_size"] // unet_config["num_heads"]
    patch = unet_config["patch_size"]
    with torch.device("meta"):  # no random initialisation: every weight is loaded below
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=unet_config["in_channels"] * patch * patch,
            out_channels=unet_config["out_channels"] * patch * patch,
            num_layers=unet_config["depth"],
            num_single_layers=unet_config["depth_single_blocks"],
            attention_head_dim=head_dim,
            num_attention_heads=unet_config["num_heads"],
            joint_attention_dim=unet_config["context_in_dim"],
            pooled_projection_dim=unet_config["vec_in_dim"],
            guidance_embeds=unet_config["guidance_embed"],
            axes_dims_rope=tuple(unet_config["axes_dim"]),
        )
    comfy_weights = model_patcher.model.diffusion_model.state_dict()
    weights = diffusers_weights(comfy_weights, unet_config, set(transformer.state_dict()))
    transformer.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in weights.items()}, strict=True,
                                assign=True)
    return transformer.eval().requires_grad_(False)


def comfy_flux_output(model_patcher, latent, sigma, context, pooled, guidance):
    """The transformer's raw output (velocity, (B, 16, H, W)), with the patcher's weight patches
    and its ``transformer_options`` (block replacements...) applied the host's way."""
    import comfy.model_management

    options = model_patcher.model_options.get("transformer_options", {})
    comfy.model_management.load_models_gpu([model_patcher])
    try:
        return model_patcher.model.diffusion_model(latent, sigma, context=context, y=pooled, guidance=guidance,
                                                   transformer_options=options).float()
    finally:
        comfy.model_management.unload_all_models()


def comfy_denoised(model_patcher, noisy_latent, sigma, conditioning):
    """What a sampler gets from the model: the host turns ``conditioning`` into model inputs
    (``convert_cond``, ``encode_model_conds`` with ``model_base.Flux.extra_conds``) and runs
    ``apply_model``, which returns the denoised latent x_t - sigma * v."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    model = model_patcher.model
    conds = comfy.samplers.encode_model_conds(model.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                              noisy_latent, noisy_latent.device, "positive")
    inputs = {name: cond.cond for name, cond in conds[0]["model_conds"].items()}
    options = model_patcher.model_options.get("transformer_options", {})
    comfy.model_management.load_models_gpu([model_patcher])
    try:
        return model.apply_model(noisy_latent, sigma, transformer_options=options, **inputs).float()
    finally:
        comfy.model_management.unload_all_models()


def diffusers_flux_output(transformer, latent, sigma, context, pooled, guidance):
    """The twin's output for ComfyUI-shaped inputs, unpacked to (B, 16, H, W)."""
    height, width = latent.shape[-2:]
    packed = transformer(
        hidden_states=pack_latents(latent),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=image_ids(height, width).to(latent.device),
        txt_ids=torch.zeros(context.shape[1], 3, device=latent.device),
        guidance=guidance,
    ).sample
    return unpack_latents(packed, height, width).float()


def transformer_weights(model_patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
