"""K-LoRA Fuse on FLUX.1: two FLUX LoRAs in different namings (diffusers' separate q/k/v; kohya's
whole ``linear1``) cut into the same pieces, fused per piece and call by K-LoRA's rule; model
calls through the host equal K-LoRA written from the official equations on the diffusers twin
(``devkit/klora_reference.py``), with identical choices; the pieces only one file changes are
plain patches; the model unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from blora_pack.core import flux_lora
from devkit.klora_reference import KLoRAReference

FUSE = "KLoRAFuse"
HIDDEN, MLP = 64, 256
SWITCHED_BLOCKS = range(4)


def factors(seed: int, rank: int, rows: int, spread: bool = True):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, HIDDEN, generator=generator) / HIDDEN ** 0.5
    up = 0.05 * torch.randn(rows, rank, generator=generator)
    if spread:
        up = up * math.exp(0.8 * float(torch.randn(1, generator=generator)))
    return down, up


@pytest.fixture
def flux_files(loras_dir):
    """content: diffusers naming, rank 4, alpha 8 (scale 2), q/k/v of single blocks 0-3 and to_q
    of block 4; style: kohya naming, rank 2, no alpha, the whole linear1 of single blocks 0-3."""
    content, style = {}, {}
    for block in SWITCHED_BLOCKS:
        for n, projection in enumerate(("to_q", "to_k", "to_v")):
            prefix = f"transformer.single_transformer_blocks.{block}.attn.{projection}"
            down, up = factors(100 * block + n, 4, HIDDEN)
            content.update({f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up,
                            f"{prefix}.alpha": torch.tensor(8.0)})
        down, up = factors(1000 + block, 2, 3 * HIDDEN + MLP)
        style.update({f"lora_unet_single_blocks_{block}_linear1.lora_down.weight": down,
                      f"lora_unet_single_blocks_{block}_linear1.lora_up.weight": up})
    down, up = factors(7, 4, HIDDEN)
    prefix = "transformer.single_transformer_blocks.4.attn.to_q"
    content.update({f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up, f"{prefix}.alpha": torch.tensor(8.0)})
    save_file(content, str(loras_dir / "flux_content.safetensors"))
    save_file(style, str(loras_dir / "flux_style.safetensors"))
    return content, style


def reference_layers(content, style):
    """{diffusers module: (down, up, scale)} of the switched pieces, from the files' tensors."""
    ours, theirs = {}, {}
    for block in SWITCHED_BLOCKS:
        down_s = style[f"lora_unet_single_blocks_{block}_linear1.lora_down.weight"]
        up_s = style[f"lora_unet_single_blocks_{block}_linear1.lora_up.weight"]
        for n, projection in enumerate(("to_q", "to_k", "to_v")):
            name = f"single_transformer_blocks.{block}.attn.{projection}"
            ours[name] = (content[f"transformer.{name}.lora_A.weight"], content[f"transformer.{name}.lora_B.weight"], 2.0)
            theirs[name] = (down_s, up_s[n * HIDDEN:(n + 1) * HIDDEN], 1.0)
    return ours, theirs


def test_fuse_on_flux_equals_the_official_equations_call_by_call(host, flux_files):
    from devkit import tiny_flux

    content, style = flux_files
    with torch.inference_mode():
        model = tiny_flux.build_tiny_flux()
    before = tiny_flux.transformer_weights(model)
    fused = host.run_node(FUSE, model, "flux_content.safetensors", "flux_style.safetensors", schedule="official").result[0]
    layer_class = host.pack("core.klora").KLoRALayer
    patched_modules = [p for p in fused.object_patches.values() if callable(p)]
    assert len(patched_modules) == len(SWITCHED_BLOCKS)  # one chained forward per linear1

    twin = tiny_flux.diffusers_flux_from(model)
    with torch.no_grad():  # the plain pieces: block 4's to_q (content, scale 2), the MLP rows (style)
        blocks = twin.single_transformer_blocks
        blocks[4].attn.to_q.weight += 2.0 * (content["transformer.single_transformer_blocks.4.attn.to_q.lora_B.weight"]
                                             @ content["transformer.single_transformer_blocks.4.attn.to_q.lora_A.weight"])
        for block in SWITCHED_BLOCKS:
            up = style[f"lora_unet_single_blocks_{block}_linear1.lora_up.weight"][3 * HIDDEN:]
            blocks[block].proj_mlp.weight += up @ style[f"lora_unet_single_blocks_{block}_linear1.lora_down.weight"]
    ours, theirs = reference_layers(content, style)
    reference = KLoRAReference(twin, ours, theirs, alpha=1.5, beta=0.85 * 1.5, sum_timesteps=28000, pattern="s*")
    conditioning = tiny_flux.tiny_flux_conditioning("a photo of a cat")
    context, pooled = conditioning[0][0], conditioning[0][1]["pooled_output"]
    worst = 0.0
    try:
        for seed, sigma in ((1, 0.9), (2, 0.6), (3, 0.3)):
            noisy = tiny_flux.sample_inputs(size=8, seed=seed)[0]
            sigmas = torch.tensor([sigma])
            with torch.inference_mode():  # as the host's executor samples
                denoised = tiny_flux.comfy_denoised(fused, noisy, sigmas, conditioning)
            with torch.no_grad():
                velocity = tiny_flux.diffusers_flux_output(twin, noisy, sigmas, context, pooled, torch.tensor([3.5]))
            expected = noisy - sigma * velocity
            worst = max(worst, float((denoised - expected).abs().max() / expected.abs().max()))
    finally:
        reference.remove()
    schedules = {id(p.schedule) for p in _klora_layers(fused, layer_class)}
    assert len(schedules) == 1
    choices = _klora_layers(fused, layer_class)[0].schedule.choices
    assert len(choices) == len(reference.choices) == 3 * 12
    assert choices == reference.choices, "identical choices, call by call"
    assert 0 < sum(choices) < len(choices), "both LoRAs are chosen"
    assert worst < 1e-4
    assert all(torch.equal(before[k], v) for k, v in tiny_flux.transformer_weights(model).items())


def _klora_layers(fused, layer_class):
    """The K-LoRA layers inside the chained forwards (each wraps the one before)."""
    layers = []
    for patch in fused.object_patches.values():
        while isinstance(patch, layer_class):
            layers.append(patch)
            patch = patch.base
    return layers


def test_pieces_of_every_naming_meet():
    """A whole linear1 (kohya), its qkv rows (ComfyUI ``linear1_qkv``) and diffusers' separate q/k/v
    give the same pieces; the MLP rows are a piece of their own."""
    down, up = factors(0, 2, 3 * HIDDEN + MLP, spread=False)
    kohya = flux_lora.read_pieces({"lora_unet_single_blocks_3_linear1.lora_down.weight": down,
                                   "lora_unet_single_blocks_3_linear1.lora_up.weight": up}, HIDDEN, 4.0)
    assert sorted(kohya.layers) == [f"transformer.single_transformer_blocks.3.{p}"
                                    for p in ("attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp")]
    qkv = flux_lora.read_pieces({"diffusion_model.single_blocks.3.linear1_qkv.lora_A.weight": down,
                                 "diffusion_model.single_blocks.3.linear1_qkv.lora_B.weight": up[:3 * HIDDEN]},
                                HIDDEN, 4.0)
    assert set(qkv.layers) == set(kohya.layers) - {"transformer.single_transformer_blocks.3.proj_mlp"}
    for name, layer in qkv.layers.items():
        assert torch.equal(layer.up, kohya.layers[name].up)
    assert flux_lora.piece_target("transformer.single_transformer_blocks.3.attn.to_v", HIDDEN, 4.0) == (
        "single_blocks.3.linear1", slice(2 * HIDDEN, 3 * HIDDEN))
    assert flux_lora.ATTENTION_PIECES.match("transformer.single_transformer_blocks.3.attn.to_v")
    assert not flux_lora.ATTENTION_PIECES.match("transformer.single_transformer_blocks.3.proj_mlp")
