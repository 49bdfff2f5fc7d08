"""Test data: one set of LoRA layers written out in every naming found in the wild.

Written independently of the pack's reader (its own small block table), so a reader bug cannot
hide behind the same bug in the generator.
"""

from __future__ import annotations

import torch

LDM_TO_DIFFUSERS_BLOCK = {
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "output_blocks.2.1": "up_blocks.0.attentions.2",
    "output_blocks.3.1": "up_blocks.1.attentions.0",
    "output_blocks.4.1": "up_blocks.1.attentions.1",
    "output_blocks.5.1": "up_blocks.1.attentions.2",
    "input_blocks.4.1": "down_blocks.1.attentions.0",
    "input_blocks.5.1": "down_blocks.1.attentions.1",
    "input_blocks.7.1": "down_blocks.2.attentions.0",
    "input_blocks.8.1": "down_blocks.2.attentions.1",
    "middle_block.1": "mid_block.attentions.0",
}
B_LORA_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def diffusers_name(ldm_path: str) -> str:
    for ldm_block, diffusers_block in LDM_TO_DIFFUSERS_BLOCK.items():
        if ldm_path.startswith(ldm_block + "."):
            return diffusers_block + ldm_path[len(ldm_block):]
    raise KeyError(ldm_path)


def random_layers(shapes: dict[str, tuple[int, int]], rank: int = 4, alpha: float | None = None,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """``{ldm_path: (down, up, alpha)}`` with non-zero factors for layers of the given (out, in)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (out_features, in_features) in sorted(shapes.items()):
        down = torch.randn(rank, in_features, generator=generator) * 0.1
        up = torch.randn(out_features, rank, generator=generator) * 0.1
        layers[path] = (down, up, alpha)
    return layers


def b_lora_shapes(unet_state_dict: dict[str, torch.Tensor], blocks=("output_blocks.0.1", "output_blocks.1.1"),
                  prefix: str = "") -> dict[str, tuple[int, int]]:
    """The (out, in) of every attention projection in ``blocks`` (all attention blocks when
    ``blocks`` is None) of a UNet state dict."""
    shapes = {}
    for key, value in unet_state_dict.items():
        path = key[len(prefix):].removesuffix(".weight")
        block = path.split(".transformer_blocks.")[0]
        in_blocks = ".transformer_blocks." in path and (blocks is None or block in blocks)
        if in_blocks and path.split(".transformer_blocks.")[1].split(".", 1)[-1] in B_LORA_LAYERS:
            shapes[path] = tuple(value.shape)
    return shapes


def _kohya(name: str) -> str:
    return name.replace(".", "_")


NAMINGS = {
    # name: (factor key for (path, role), alpha key or None when the naming has no alpha)
    "official": (lambda p, r: f"unet.{diffusers_name(p)}.lora.{r}.weight", None),
    "official_double_unet": (lambda p, r: f"unet.unet.{diffusers_name(p)}.lora.{r}.weight", None),
    "peft": (lambda p, r: f"unet.{diffusers_name(p)}.lora_{'A' if r == 'down' else 'B'}.weight", None),
    "peft_bare": (lambda p, r: f"{diffusers_name(p)}.lora_{'A' if r == 'down' else 'B'}.weight", None),
    "peft_default": (lambda p, r: f"unet.{diffusers_name(p)}.lora_{'A' if r == 'down' else 'B'}.default.weight", None),
    "peft_bare_default": (lambda p, r: f"{diffusers_name(p)}.lora_{'A' if r == 'down' else 'B'}.default.weight", None),
    "kohya_diffusers": (lambda p, r: f"lora_unet_{_kohya(diffusers_name(p))}.lora_{r}.weight",
                        lambda p: f"lora_unet_{_kohya(diffusers_name(p))}.alpha"),
    "kohya_ldm": (lambda p, r: f"lora_unet_{_kohya(p)}.lora_{r}.weight", lambda p: f"lora_unet_{_kohya(p)}.alpha"),
    "comfyui": (lambda p, r: f"diffusion_model.{p}.lora_{r}.weight", lambda p: f"diffusion_model.{p}.alpha"),
    "attn_processors": (
        lambda p, r: f"unet.{diffusers_name(p).replace('.to_', '.processor.to_').removesuffix('.0')}_lora.{r}.weight",
        None,
    ),
}
NAMINGS_WITH_ALPHA = {name for name, (_, alpha_key) in NAMINGS.items() if alpha_key is not None}


def write_naming(layers, naming: str) -> dict[str, torch.Tensor]:
    """The state dict of ``layers`` in ``naming``; alphas are dropped where the naming has none."""
    factor_key, alpha_key = NAMINGS[naming]
    state_dict = {}
    for path, (down, up, alpha) in layers.items():
        state_dict[factor_key(path, "down")] = down
        state_dict[factor_key(path, "up")] = up
        if alpha_key is not None and alpha is not None:
            state_dict[alpha_key(path)] = torch.tensor(float(alpha))
    return state_dict


def expected_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return scale * (up.double() @ down.double())
