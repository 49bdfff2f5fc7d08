"""SDXL module naming: diffusers and kohya names to ldm paths."""

from __future__ import annotations

import pytest

from blora_pack.core import sdxl_unet

FULL_SDXL_UNET_CONFIG = {
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
}


@pytest.mark.parametrize("diffusers, ldm", [
    ("up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_k", "output_blocks.0.1.transformer_blocks.9.attn2.to_k"),
    ("up_blocks.0.attentions.1.proj_in", "output_blocks.1.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj", "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj"),
    ("mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0", "middle_block.1.transformer_blocks.3.attn1.to_out.0"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("add_embedding.linear_2", "label_emb.0.2"),
])
def test_diffusers_to_ldm(diffusers, ldm):
    assert sdxl_unet.diffusers_to_ldm(diffusers) == ldm


@pytest.mark.parametrize("bad", ["up_blocks.0.attentions.3.proj_in", "down_blocks.0.resnets.2.conv1",
                                 "mid_block.attentions.1.norm", "up_blocks.0.resnets.0.bogus", "vae.decoder"])
def test_unknown_diffusers_paths_are_refused(bad):
    with pytest.raises(KeyError):
        sdxl_unet.diffusers_to_ldm(bad)


@pytest.mark.parametrize("flat, dotted", [
    ("output_blocks_0_1_transformer_blocks_0_attn1_to_q", "output_blocks.0.1.transformer_blocks.0.attn1.to_q"),
    ("up_blocks_0_attentions_1_transformer_blocks_3_attn2_to_out_0", "up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_out.0"),
    ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks.1.resnets.0.conv_shortcut"),
    ("out_2", "out.2"),
    ("conv_out", "conv_out"),
    ("input_blocks_4_0_in_layers_2", "input_blocks.4.0.in_layers.2"),
])
def test_unflatten_kohya_name(flat, dotted):
    assert sdxl_unet.unflatten_kohya_name(flat) == dotted


def test_unflatten_refuses_foreign_words():
    with pytest.raises(KeyError):
        sdxl_unet.unflatten_kohya_name("double_blocks_0_img_attn_qkv")


def test_block_of():
    assert sdxl_unet.block_of("output_blocks.0.1.transformer_blocks.0.attn1.to_q") == "output_blocks.0.1"
    assert sdxl_unet.block_of("middle_block.1.proj_in") == "middle_block.1"
    assert sdxl_unet.block_of("label_emb.0.0") == "label_emb"


@pytest.mark.parametrize("unet_config", ["tiny", "full"])
def test_mapping_equals_the_hosts_for_every_weight(host, tiny_sdxl, unet_config):
    """Every module of the tiny and the full-size SDXL UNet maps exactly as ComfyUI maps it."""
    import comfy.utils

    config = tiny_sdxl.model.model_config.unet_config if unet_config == "tiny" else FULL_SDXL_UNET_CONFIG
    host_map = comfy.utils.unet_to_diffusers(config)
    checked = 0
    for diffusers_key, ldm_key in host_map.items():
        module, _, param = diffusers_key.rpartition(".")
        if diffusers_key.startswith("class_embedding."):
            continue
        assert sdxl_unet.diffusers_to_ldm(module) + "." + param == ldm_key
        checked += 1
    assert checked > 500



@pytest.mark.parametrize("ldm, diffusers", [
    ("output_blocks.0.1.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("output_blocks.1.1.transformer_blocks.9.attn2.to_out.0", "up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_out.0"),
    ("output_blocks.5.1.proj_in", "up_blocks.1.attentions.2.proj_in"),
    ("input_blocks.4.1.transformer_blocks.1.attn1.to_k", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k"),
    ("input_blocks.8.1.norm", "down_blocks.2.attentions.1.norm"),
    ("middle_block.1.transformer_blocks.2.ff.net.2", "mid_block.attentions.0.transformer_blocks.2.ff.net.2"),
])
def test_ldm_to_diffusers_inverts_diffusers_to_ldm(ldm, diffusers):
    assert sdxl_unet.ldm_to_diffusers(ldm) == diffusers
    assert sdxl_unet.diffusers_to_ldm(diffusers) == ldm


@pytest.mark.parametrize("bad", ["input_blocks.1.1.proj_in", "output_blocks.7.1.proj_in", "input_blocks.3.1.x",
                                 "output_blocks.0.0.in_layers.0", "label_emb.0.0"])
def test_ldm_to_diffusers_refuses_modules_outside_attention_blocks(bad):
    with pytest.raises(KeyError):
        sdxl_unet.ldm_to_diffusers(bad)
