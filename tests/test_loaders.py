"""Load Content LoRA / Load Style LoRA on the real host: every naming, fidelity, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_namings
from devkit import tiny_models

CONTENT, STYLE = "BLoRALoadContentLoRA", "BLoRALoadStyleLoRA"
BLOCK_OF_NODE = {CONTENT: "output_blocks.0.1", STYLE: "output_blocks.1.1"}
LINEAR, OFFICIAL = "comfyui (linear)", "official B-LoRA (squared)"


@pytest.fixture
def b_lora_layers(tiny_sdxl):
    shapes = lora_namings.b_lora_shapes(tiny_sdxl.model.diffusion_model.state_dict())
    assert len(shapes) == 2 * 2 * 8
    return lora_namings.random_layers(shapes, rank=4, alpha=2.0)


def write_lora(folder, name, state_dict):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / name))
    return name


def run_node(host, node_id, *args, **kwargs):
    return host.run_node(node_id, *args, **kwargs).result[0]


@pytest.mark.parametrize("naming", sorted(lora_namings.NAMINGS))
@pytest.mark.parametrize("node_id", [CONTENT, STYLE])
def test_patched_weights_are_w0_plus_scaled_delta(host, tiny_sdxl, loras_dir, b_lora_layers, naming, node_id):
    name = write_lora(loras_dir, f"{naming}.safetensors", lora_namings.write_naming(b_lora_layers, naming))
    before = tiny_models.unet_weights(tiny_sdxl)
    strength = 0.7
    patched = run_node(host, node_id, tiny_sdxl, name, strength)
    weights = tiny_models.patched_unet_weights(patched)
    block = BLOCK_OF_NODE[node_id]
    alpha_kept = naming in lora_namings.NAMINGS_WITH_ALPHA
    changed = 0
    for key, w0 in before.items():
        path = key.removesuffix(".weight")
        if path in b_lora_layers and path.startswith(block + "."):
            down, up, alpha = b_lora_layers[path]
            delta = lora_namings.expected_delta(down, up, alpha if alpha_kept else None)
            torch.testing.assert_close(weights[key].double(), w0.double() + strength * delta, rtol=1e-5, atol=1e-6)
            changed += 1
        else:
            assert torch.equal(weights[key], w0), f"{key} changed but is outside {block}"
    assert changed == 16
    assert all(torch.equal(v, before[k]) for k, v in tiny_models.unet_weights(tiny_sdxl).items())


def test_a_full_unet_lora_applies_only_its_block(host, tiny_sdxl, loras_dir):
    unet_weights = tiny_sdxl.model.diffusion_model.state_dict()
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in unet_weights.items()
              if v.ndim == 2 and ("transformer_blocks" in k or ".proj_" in k)}
    assert any(p.startswith("input_blocks.") for p in shapes)
    layers = lora_namings.random_layers(shapes, rank=2, alpha=1.0)
    name = write_lora(loras_dir, "full.safetensors", lora_namings.write_naming(layers, "kohya_ldm"))
    weights = tiny_models.patched_unet_weights(run_node(host, CONTENT, tiny_sdxl, name, 1.0))
    changed = {k for k, v in weights.items() if not torch.equal(v, unet_weights[k])}
    assert changed and all(k.startswith("output_blocks.0.1.") for k in changed)
    assert "output_blocks.0.1.proj_in.weight" in changed


def test_official_strength_mode_squares_the_strength(host, tiny_sdxl, loras_dir, b_lora_layers):
    name = write_lora(loras_dir, "b.safetensors", lora_namings.write_naming(b_lora_layers, "official"))
    official = tiny_models.patched_unet_weights(run_node(host, STYLE, tiny_sdxl, name, 1.1, OFFICIAL))
    linear = tiny_models.patched_unet_weights(run_node(host, STYLE, tiny_sdxl, name, 1.21, LINEAR))
    key = "output_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(official[key], tiny_sdxl.model.diffusion_model.state_dict()[key])
    torch.testing.assert_close(official[key], linear[key])


def official_inference_unet(diffusers_unet, state_dict, content_alpha, style_alpha):
    """What the official ``inference.py`` does: filter by block (substring), scale both factors
    by alpha (``scale_lora``), merge the two dicts, ``load_lora_into_unet`` with no alphas."""
    from diffusers import StableDiffusionXLPipeline

    def filter_lora(sd, blocks):
        return {k: v for k, v in sd.items() if any(b in k for b in blocks)}

    def scale_lora(sd, alpha):
        return {k: v * alpha for k, v in sd.items()}

    lora = {}
    if content_alpha is not None:
        lora.update(scale_lora(filter_lora(state_dict, ["unet.up_blocks.0.attentions.0"]), content_alpha))
    if style_alpha is not None:
        lora.update(scale_lora(filter_lora(state_dict, ["unet.up_blocks.0.attentions.1"]), style_alpha))
    StableDiffusionXLPipeline.load_lora_into_unet(lora, None, diffusers_unet)
    return diffusers_unet


@pytest.mark.parametrize("content_alpha, style_alpha", [(1.0, None), (None, 1.1), (1.0, 1.1)])
def test_unet_output_equals_official_inference(host, tiny_sdxl, loras_dir, b_lora_layers, content_alpha, style_alpha):
    official_file = {k: v for k, v in lora_namings.write_naming(b_lora_layers, "official").items()}
    name = write_lora(loras_dir, "pytorch_lora_weights.safetensors", official_file)
    inputs = tiny_models.sample_inputs(batch=2)
    reference_unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    with torch.no_grad():
        base_output = tiny_models.diffusers_unet_output(reference_unet, *inputs)
        official_inference_unet(reference_unet, official_file, content_alpha, style_alpha)
        reference = tiny_models.diffusers_unet_output(reference_unet, *inputs)

    model = tiny_sdxl
    if content_alpha is not None:
        model = run_node(host, CONTENT, model, name, content_alpha, OFFICIAL)
    if style_alpha is not None:
        model = run_node(host, STYLE, model, name, style_alpha, OFFICIAL)
    with torch.no_grad():
        ours = tiny_models.comfy_unet_output(model, *inputs)
    assert (reference - base_output).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_a_file_without_the_block_lists_what_it_has(host, tiny_sdxl, loras_dir, b_lora_layers):
    style_only = {p: v for p, v in b_lora_layers.items() if p.startswith("output_blocks.1.1.")}
    name = write_lora(loras_dir, "style_only.safetensors", lora_namings.write_naming(style_only, "official"))
    with pytest.raises(ValueError, match=r"no layers in the content block output_blocks\.0\.1\. UNet blocks it does contain: output_blocks\.1\.1 \(16 layers\)"):
        run_node(host, CONTENT, tiny_sdxl, name, 1.0)


def test_a_non_sdxl_model_is_refused(host, loras_dir, b_lora_layers):
    sd15 = tiny_models.build_tiny_sd15()
    name = write_lora(loras_dir, "b.safetensors", lora_namings.write_naming(b_lora_layers, "official"))
    with pytest.raises(ValueError, match=r"needs an SDXL model; the MODEL input is BaseModel \(detected as SD15\)"):
        run_node(host, CONTENT, sd15, name, 1.0)


def test_a_lora_for_other_shapes_is_refused(host, tiny_sdxl, loras_dir):
    shapes = {f"output_blocks.0.1.transformer_blocks.0.attn2.to_k": (320, 768)}
    name = write_lora(loras_dir, "sd15.safetensors",
                      lora_namings.write_naming(lora_namings.random_layers(shapes), "kohya_ldm"))
    with pytest.raises(ValueError, match=r"is 128x64 but the LoRA makes 320x768: the LoRA was trained for a different model"):
        run_node(host, CONTENT, tiny_sdxl, name, 1.0)


def test_a_corrupt_file_is_refused(host, tiny_sdxl, loras_dir, b_lora_layers):
    name = write_lora(loras_dir, "cut.safetensors", lora_namings.write_naming(b_lora_layers, "official"))
    path = loras_dir / name
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="Could not read cut.safetensors"):
        run_node(host, CONTENT, tiny_sdxl, name, 1.0)


def test_a_checkpoint_is_not_a_lora(host, tiny_sdxl, loras_dir):
    name = write_lora(loras_dir, "model.safetensors",
                      {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)})
    with pytest.raises(ValueError, match="is not a LoRA for an SDXL UNet"):
        run_node(host, CONTENT, tiny_sdxl, name, 1.0)


def test_a_missing_file_names_the_loras_folder(host, tiny_sdxl, loras_dir):
    with pytest.raises(FileNotFoundError, match="is not in the loras folder"):
        run_node(host, STYLE, tiny_sdxl, "nope.safetensors", 1.0)
