"""FLUX block naming: paper block numbers, SplitFlux's groups, and LoRA keys of every common
trainer mapped onto ComfyUI weights (checked against the host's own key map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from blora_pack.core import flux_blocks
from blora_pack.core.flux_blocks import LoraTarget

H = flux_blocks.FLUX1_HIDDEN_SIZE


def test_naming_module_is_host_free():
    """core/ never imports the host: only the standard library (and torch) here, and the
    registry's plain data (``methods``, where SplitFlux's blocks are defined)."""
    source = Path(flux_blocks.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "re", "typing", "torch", "methods", ""}  # "": from . import (core/)


def test_paper_numbers_round_trip_through_both_namings():
    for number in range(1, flux_blocks.LAST_PAPER_BLOCK + 1):
        assert flux_blocks.paper_block(flux_blocks.comfy_block(number)) == number
        assert flux_blocks.paper_block(flux_blocks.diffusers_block(number)) == number
    assert flux_blocks.comfy_block(1) == "double_blocks.0"
    assert flux_blocks.comfy_block(19) == "double_blocks.18"
    assert flux_blocks.comfy_block(20) == "single_blocks.0"
    assert flux_blocks.diffusers_block(57) == "single_transformer_blocks.37"
    assert flux_blocks.paper_block("single_blocks.10") == 30


@pytest.mark.parametrize("bad", [0, 58, -1])
def test_paper_numbers_outside_flux1_are_refused(bad):
    with pytest.raises(KeyError):
        flux_blocks.comfy_block(bad)


@pytest.mark.parametrize("bad", ["double_blocks.19", "single_blocks.38", "single_blocks", "blocks.3"])
def test_unknown_blocks_are_refused(bad):
    with pytest.raises(KeyError):
        flux_blocks.paper_block(bad)


def test_splitflux_groups_cover_the_single_blocks_once_in_paper_order():
    content, rca, style = (flux_blocks.CONTENT_SINGLE_BLOCKS, flux_blocks.RCA_SINGLE_BLOCKS,
                           flux_blocks.STYLE_SINGLE_BLOCKS)
    assert list(content) + list(rca) + list(style) == list(range(flux_blocks.SINGLE_BLOCKS))
    assert [flux_blocks.paper_block(f"single_blocks.{i}") for i in (content[0], content[-1])] == [20, 29]
    assert [flux_blocks.paper_block(f"single_blocks.{i}") for i in rca] == [30, 31]
    assert [flux_blocks.paper_block(f"single_blocks.{i}") for i in (style[0], style[-1])] == [32, 57]
    assert [flux_blocks.splitflux_group(i) for i in (0, 9, 10, 11, 12, 37)] == [
        "content", "content", "rca", "rca", "style", "style"]


def test_splitflux_groups_reproduce_the_papers_trainable_parameter_counts():
    """q/k/v LoRAs on the groups (content 48+16, RCA 32, style 64) give SplitFlux's 43.65M and
    rank 64 on all 38 single blocks LoRA-Flux's 44.83M (reference/splitflux.md §1.1)."""
    per_rank = sum(flux_blocks.qkv_rows(p, H).stop - flux_blocks.qkv_rows(p, H).start + H
                   for p in flux_blocks.QKV_PROJECTIONS)
    ranks = {"content": 48 + 16, "rca": 32, "style": 64}
    splitflux = sum(ranks[flux_blocks.splitflux_group(i)] * per_rank for i in range(flux_blocks.SINGLE_BLOCKS))
    assert splitflux == 43_646_976
    assert 64 * per_rank * flux_blocks.SINGLE_BLOCKS == 44_826_624


def test_single_block_qkv_are_row_slices_of_linear1():
    assert [flux_blocks.qkv_rows(p) for p in ("to_q", "to_k", "to_v")] == [
        slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)]
    assert flux_blocks.single_block_qkv(3, "to_k") == LoraTarget(
        "diffusion_model.single_blocks.3.linear1.weight", slice(H, 2 * H))
    assert flux_blocks.diffusers_single_qkv_name(3, "to_v") == "single_transformer_blocks.3.attn.to_v"


@pytest.mark.parametrize("prefix, target", [
    ("transformer.single_transformer_blocks.0.attn.to_q", ("single_blocks.0.linear1", slice(0, H))),
    ("transformer.single_transformer_blocks.37.attn.to_v", ("single_blocks.37.linear1", slice(2 * H, 3 * H))),
    ("single_transformer_blocks.5.attn.to_k", ("single_blocks.5.linear1", slice(H, 2 * H))),
    ("transformer.single_transformer_blocks.5.proj_mlp", ("single_blocks.5.linear1", slice(3 * H, 7 * H))),
    ("transformer.single_transformer_blocks.5.proj_out", ("single_blocks.5.linear2", None)),
    ("transformer.single_transformer_blocks.5.norm.linear", ("single_blocks.5.modulation.lin", None)),
    ("lora_transformer_single_transformer_blocks_12_attn_to_q", ("single_blocks.12.linear1", slice(0, H))),
    ("lycoris_single_transformer_blocks_12_attn_to_v", ("single_blocks.12.linear1", slice(2 * H, 3 * H))),
    ("lora_unet_single_blocks_12_linear1", ("single_blocks.12.linear1", None)),
    ("lora_unet_double_blocks_3_img_attn_qkv", ("double_blocks.3.img_attn.qkv", None)),
    ("lora_unet_double_blocks_3_txt_mod_lin", ("double_blocks.3.txt_mod.lin", None)),
    ("diffusion_model.single_blocks.4.linear1_qkv", ("single_blocks.4.linear1", slice(0, 3 * H))),
    ("diffusion_model.double_blocks.18.img_mlp.2", ("double_blocks.18.img_mlp.2", None)),
    ("transformer.transformer_blocks.2.attn.add_k_proj", ("double_blocks.2.txt_attn.qkv", slice(H, 2 * H))),
    ("transformer.transformer_blocks.2.attn.to_out.0", ("double_blocks.2.img_attn.proj", None)),
    ("transformer.transformer_blocks.2.ff_context.net.0.proj", ("double_blocks.2.txt_mlp.0", None)),
    ("lycoris_transformer_blocks_2_norm1_context_linear", ("double_blocks.2.txt_mod.lin", None)),
    ("transformer.x_embedder", ("img_in", None)),
    ("lycoris_time_text_embed_guidance_embedder_linear_2", ("guidance_in.out_layer", None)),
    ("transformer.proj_out", ("final_layer.linear", None)),
])
def test_lora_targets_of_every_naming(prefix, target):
    module, rows = target
    assert flux_blocks.lora_target(prefix) == LoraTarget(f"diffusion_model.{module}.weight", rows)


@pytest.mark.parametrize("bad", [
    "transformer.norm_out.linear",  # ComfyUI swaps its halves: not a row slice
    "transformer.single_transformer_blocks.38.attn.to_q",
    "transformer.transformer_blocks.19.attn.to_q",
    "transformer.single_transformer_blocks.0.attn.norm_q",
    "diffusion_model.single_blocks.0.norm.query_norm",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_unet_output_blocks_0_1_proj_in",
])
def test_unknown_lora_modules_are_refused(bad):
    with pytest.raises(KeyError):
        flux_blocks.lora_target(bad)


@pytest.mark.parametrize("flat, dotted", [
    ("single_transformer_blocks_3_attn_to_q", "single_transformer_blocks.3.attn.to_q"),
    ("transformer_blocks_0_ff_context_net_0_proj", "transformer_blocks.0.ff_context.net.0.proj"),
    ("time_text_embed_timestep_embedder_linear_1", "time_text_embed.timestep_embedder.linear_1"),
    ("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1"),
    ("double_blocks_7_img_attn_proj", "double_blocks.7.img_attn.proj"),
])
def test_unflatten_kohya_name(flat, dotted):
    assert flux_blocks.unflatten_kohya_name(flat) == dotted


def _host_target(value) -> LoraTarget:
    if isinstance(value, str):
        return LoraTarget(value, None)
    weight_key, (dim, offset, size) = value[0], value[1]
    assert dim == 0
    return LoraTarget(weight_key, slice(offset, offset + size))


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_mapping_equals_the_hosts_for_every_linear_weight(host, size):
    """Every LoRA key the host maps onto a Flux linear weight (diffusers, SimpleTuner LyCORIS,
    OneTrainer, kohya, ComfyUI's generic and ``linear1_qkv`` forms) maps to the same weight and
    rows here, on the tiny model and on the full-size FLUX.1-dev (built on the meta device)."""
    import comfy.lora
    import comfy.model_base

    from devkit import tiny_flux

    config = tiny_flux.TINY_FLUX_CONFIG if size == "tiny" else tiny_flux.FLUX1_DEV_CONFIG
    model = comfy.model_base.Flux(tiny_flux.flux_model_config(config), device=torch.device("meta"))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    host_map = comfy.lora.model_lora_keys_unet(model, {})
    checked, refused = set(), 0
    for lora_key, value in host_map.items():
        weight_key = value if isinstance(value, str) else value[0]
        if weight_key not in shapes or lora_key.endswith((".bias", ".weight")):
            continue  # modules of other Flux variants (controlnet input), full keys of biases and norms
        transformed = isinstance(value, tuple) and len(value) > 2  # norm_out.linear: halves swapped
        if transformed or not weight_key.endswith(".weight") or len(shapes[weight_key]) != 2:
            with pytest.raises(KeyError):
                flux_blocks.lora_target(lora_key, hidden_size=config["hidden_size"])
            refused += 1
            continue
        assert flux_blocks.lora_target(lora_key, hidden_size=config["hidden_size"]) == _host_target(value), lora_key
        checked.add(lora_key)
    for i in range(flux_blocks.SINGLE_BLOCKS):
        for projection in flux_blocks.QKV_PROJECTIONS:
            name = flux_blocks.diffusers_single_qkv_name(i, projection)
            for form in (f"transformer.{name}", "lycoris_" + name.replace(".", "_"),
                         "lora_transformer_" + name.replace(".", "_")):
                assert form in checked
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "transformer.transformer_blocks.18.attn.add_v_proj",
                 "transformer.transformer_blocks.5.ff.net.2", "diffusion_model.single_blocks.0.linear1_qkv"):
        assert name in checked
    assert len(checked) > 2000 and refused > 100
