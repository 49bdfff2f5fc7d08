"""The LoRA reader: every naming gives the same canonical layers; bad files give clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import lora_namings
from blora_pack.core import lora_format

SHAPES = {
    f"output_blocks.{b}.1.transformer_blocks.{t}.{layer}": (128, 64 if layer == "attn2.to_k" else 128)
    for b in (0, 1) for t in (0, 1) for layer in lora_namings.B_LORA_LAYERS
}


@pytest.fixture
def layers():
    return lora_namings.random_layers(SHAPES, rank=4, alpha=2.0)


@pytest.mark.parametrize("naming", sorted(lora_namings.NAMINGS))
def test_every_naming_reads_to_the_same_layers(layers, naming):
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, naming))
    assert set(weights.layers) == set(layers)
    for path, (down, up, alpha) in layers.items():
        layer = weights.layers[path]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, up)
        expected_alpha = alpha if naming in lora_namings.NAMINGS_WITH_ALPHA else None
        assert layer.alpha == expected_alpha
        torch.testing.assert_close(layer.delta().double(), lora_namings.expected_delta(down, up, expected_alpha))


def test_scale_is_alpha_over_rank_or_one(layers):
    down, up, _ = next(iter(layers.values()))
    assert lora_format.LoraLayer(down, up, alpha=2.0).scale == 0.5
    assert lora_format.LoraLayer(down, up).scale == 1.0


def test_only_block_keeps_one_block(layers):
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, "official"))
    content = weights.only_block("output_blocks.0.1")
    assert content.layers and all(p.startswith("output_blocks.0.1.") for p in content.layers)
    assert weights.block_sizes() == {"output_blocks.0.1": 16, "output_blocks.1.1": 16}


def test_missing_block_error_lists_the_blocks_found(layers):
    style_only = {p: v for p, v in layers.items() if p.startswith("output_blocks.1.1.")}
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(style_only, "official"))
    with pytest.raises(lora_format.LoraFormatError, match=r"no layers in the content block output_blocks\.0\.1.*output_blocks\.1\.1 \(16 layers\)"):
        weights.only_block("output_blocks.0.1", "content")


def test_text_encoder_keys_are_set_aside(layers):
    state_dict = lora_namings.write_naming(layers, "kohya_diffusers")
    state_dict["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
    weights = lora_format.read_lora_state_dict(state_dict)
    assert weights.other_keys == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    assert set(weights.layers) == set(layers)


def test_keys_of_another_model_family_are_refused(layers):
    state_dict = lora_namings.write_naming(layers, "comfyui")
    state_dict["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] = torch.zeros(4, 8)
    with pytest.raises(lora_format.LoraFormatError, match="name no layer of an SDXL UNet: lora_unet_double_blocks_0"):
        lora_format.read_lora_state_dict(state_dict)


def test_a_non_lora_state_dict_is_refused():
    with pytest.raises(lora_format.LoraFormatError, match="is not a LoRA for an SDXL UNet.*first_stage_model"):
        lora_format.read_lora_state_dict({"first_stage_model.encoder.conv_in.weight": torch.zeros(3)})


def test_a_half_layer_is_refused(layers):
    state_dict = lora_namings.write_naming(layers, "official")
    state_dict.pop(next(k for k in state_dict if k.endswith("lora.up.weight")))
    with pytest.raises(lora_format.LoraFormatError, match="has no up factor"):
        lora_format.read_lora_state_dict(state_dict)


def test_factors_that_do_not_multiply_are_refused(layers):
    state_dict = lora_namings.write_naming(layers, "official")
    key = next(k for k in state_dict if k.endswith("lora.up.weight"))
    state_dict[key] = torch.zeros(128, 5)
    with pytest.raises(lora_format.LoraFormatError, match=r"up \(128, 5\) and down \(4, "):
        lora_format.read_lora_state_dict(state_dict)


def test_unsupported_adapters_are_named(layers):
    state_dict = lora_namings.write_naming(layers, "comfyui")
    state_dict["diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_q.dora_scale"] = torch.ones(128)
    with pytest.raises(lora_format.LoraFormatError, match="DoRA"):
        lora_format.read_lora_state_dict(state_dict)


def test_two_namings_for_one_layer_are_refused(layers):
    state_dict = {**lora_namings.write_naming(layers, "official"), **lora_namings.write_naming(layers, "comfyui")}
    with pytest.raises(lora_format.LoraFormatError, match="two keys give the"):
        lora_format.read_lora_state_dict(state_dict)


def test_safetensors_file_round_trip_keeps_metadata(tmp_path, layers):
    path = tmp_path / "a.safetensors"
    save_file(lora_namings.write_naming(layers, "official"), str(path), metadata={"format": "pt"})
    weights = lora_format.read_lora_file(path)
    assert weights.metadata == {"format": "pt"} and len(weights.layers) == len(layers)


def test_torch_file_is_read_weights_only(tmp_path, layers):
    path = tmp_path / "a.pth"
    torch.save(lora_namings.write_naming(layers, "peft"), str(path))
    assert len(lora_format.read_lora_file(path).layers) == len(layers)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"x": Payload()}, handle, protocol=2)
    with pytest.raises(lora_format.LoraFormatError, match="weights-only"):
        lora_format.read_lora_file(path)
    assert "this must never run" not in capsys.readouterr().out


def test_corrupt_file_error_says_what_to_do(tmp_path, layers):
    path = tmp_path / "broken.safetensors"
    save_file(lora_namings.write_naming(layers, "official"), str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(lora_format.LoraFormatError, match="Could not read broken.safetensors.*corrupt"):
        lora_format.read_lora_file(path)


def test_comfy_state_dict_keeps_alpha_only_where_given(layers):
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, "kohya_ldm"))
    state_dict = lora_format.to_comfy_state_dict(weights)
    assert sum(k.endswith(".alpha") for k in state_dict) == len(layers)
    weights = lora_format.read_lora_state_dict(lora_namings.write_naming(layers, "official"))
    assert not any(k.endswith(".alpha") for k in lora_format.to_comfy_state_dict(weights))
