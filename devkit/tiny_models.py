"""The tiny SDXL-architecture UNet (the pack's ``command_line/tiny.py``, built with ComfyUI's
own classes) and its diffusers twin, which receives the same weights through ComfyUI's
``unet_to_diffusers`` map: the pair is the reference harness every fidelity test uses.
"""

from __future__ import annotations

import torch

from blora_pack.command_line.tiny import (  # noqa: F401  (re-exported for the tests)
    CONTEXT_DIM, NUM_HEAD_CHANNELS, POOLED_DIM, TINY_UNET_CONFIG, build_tiny_sdxl, seeded_weights,
)


def build_tiny_sd15(seed: int = 0):
    """A tiny SD1.5-architecture model, to show the loaders refuse it."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(TINY_UNET_CONFIG, context_dim=64, adm_in_channels=None, num_classes=None,
                       transformer_depth=[1, 1, 1, 1, 1, 1], transformer_depth_output=[1] * 9,
                       transformer_depth_middle=1, use_linear_in_transformer=False)
    config = comfy.supported_models.SD15(unet_config)
    config.unet_config["num_head_channels"] = NUM_HEAD_CHANNELS
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(seeded_weights(model.diffusion_model, seed))
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()
    )


def diffusers_unet_from(model_patcher):
    """A diffusers ``UNet2DConditionModel`` holding the same weights as the ComfyUI model."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[2, 4, 8],
        cross_attention_dim=CONTEXT_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    comfy_weights = model_patcher.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    wanted = unet.state_dict().keys()
    diffusers_weights = {d: comfy_weights[l].clone().float() for d, l in mapping.items()
                         if d in wanted and l in comfy_weights}
    unet.load_state_dict(diffusers_weights, strict=True)
    return unet.eval()


def sample_inputs(batch: int = 1, size: int = 16, seed: int = 1):
    """Latent, timestep, context and pooled text embedding for one forward pass."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, size, size, generator=generator)
    timestep = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(batch, POOLED_DIM, generator=generator)
    return latent, timestep, context, pooled


def image_and_prompt(seed: int = 0, size: int = 8):
    """A LATENT dict of one random image and a CONDITIONING for it, in the host's formats."""
    generator = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(1, 4, size, size, generator=generator)}
    context = torch.randn(1, 77, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return latents, [[context, {"pooled_output": pooled}]]


def comfy_unet_output(model_patcher, latent, timestep, context, pooled):
    """The UNet's raw output (epsilon) for the ComfyUI model, patches applied the host's way."""
    import comfy.model_management

    size_px = latent.shape[-1] * 8
    y = model_patcher.model.encode_adm(pooled_output=pooled, width=size_px, height=size_px,
                                       crop_w=0, crop_h=0, target_width=size_px, target_height=size_px)
    comfy.model_management.load_models_gpu([model_patcher])
    try:
        return model_patcher.model.diffusion_model(latent, timesteps=timestep, context=context, y=y).float()
    finally:
        comfy.model_management.unload_all_models()


def diffusers_unet_output(unet, latent, timestep, context, pooled):
    size_px = latent.shape[-1] * 8
    time_ids = torch.tensor([[size_px, size_px, 0, 0, size_px, size_px]], dtype=torch.float32)
    time_ids = time_ids.repeat(latent.shape[0], 1)
    return unet(latent, timestep, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.float()


def patched_unet_weights(model_patcher) -> dict[str, torch.Tensor]:
    """The UNet weights as the host applies them when it loads the model for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    try:
        return {k: v.detach().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()


def unet_weights(model_patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
