"""ReChar Structure Fuse on the real host: only the two blocks, the glyph's Canny edges as
ReChar computes them, and the structure window through real sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lora_namings
from devkit import tiny_models

FUSE = "ReCharStructureFuse"


@pytest.fixture
def two_b_loras(tiny_sdxl, loras_dir):
    """Two full B-LoRA files (both blocks each): the structure one and the style one."""
    shapes = lora_namings.b_lora_shapes(tiny_sdxl.model.diffusion_model.state_dict())
    files = {}
    for seed, name in enumerate(("glyph", "style")):
        layers = lora_namings.random_layers(shapes, rank=4, seed=seed + 10)
        save_file(lora_namings.write_naming(layers, "official"), str(loras_dir / f"{name}.safetensors"))
        files[name] = layers
    return files


def test_structure_block_from_one_file_style_block_from_the_other(host, tiny_sdxl, two_b_loras):
    before = tiny_models.unet_weights(tiny_sdxl)
    patched = host.run_node(FUSE, tiny_sdxl, "glyph.safetensors", "style.safetensors", 0.8, 1.2).result[0]
    weights = tiny_models.patched_unet_weights(patched)
    for key, w0 in before.items():
        path = key.removesuffix(".weight")
        if path.startswith("output_blocks.0.1.") and path in two_b_loras["glyph"]:
            expected = w0.double() + 0.8 * lora_namings.expected_delta(*two_b_loras["glyph"][path])
        elif path.startswith("output_blocks.1.1.") and path in two_b_loras["style"]:
            expected = w0.double() + 1.2 * lora_namings.expected_delta(*two_b_loras["style"][path])
        else:
            assert torch.equal(weights[key], w0), key
            continue
        torch.testing.assert_close(weights[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_glyph_edges_are_rechars_canny(host, tiny_sdxl, two_b_loras):
    import cv2

    generator = np.random.default_rng(0)
    glyph = np.zeros((300, 200, 3), dtype=np.uint8)
    glyph[60:240, 80:120] = 255
    glyph[100:140, 30:170] = generator.integers(100, 255, (40, 140, 3))
    image = torch.from_numpy(glyph.astype(np.float32) / 255.0)[None]
    _, edges_image, mask = host.run_node(FUSE, tiny_sdxl, "glyph.safetensors", "style.safetensors", 1.0, 1.0,
                                         glyph=image).result
    expected = cv2.Canny(np.array(Image.fromarray(glyph).resize((1024, 1024))), 100, 200).astype(np.float32) / 255.0
    assert edges_image.shape == (1, 1024, 1024, 3) and mask.shape == (1, 1024, 1024)
    assert mask.sum() > 100
    np.testing.assert_array_equal(mask[0].numpy(), expected)
    assert torch.equal(edges_image[0, ..., 1], mask[0])


def test_structure_window_acts_only_inside_it(host, tiny_sdxl, two_b_loras):
    """Sampled with the host's KSampler path, every model call inside the window equals the
    model with both blocks, every call outside equals the model with the style block only."""
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sample

    windowed = host.run_node(FUSE, tiny_sdxl, "glyph.safetensors", "style.safetensors", 1.0, 1.0,
                             structure_start=0.0, structure_end=0.5).result[0]
    both = host.run_node(FUSE, tiny_sdxl, "glyph.safetensors", "style.safetensors", 1.0, 1.0).result[0]
    style_only = host.run_node("BLoRALoadStyleLoRA", tiny_sdxl, "style.safetensors", 1.0).result[0]
    calls = []

    def record(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        output = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        calls.append((x.clone(), t.clone(), c_crossattn.clone(), {k: v.clone() for k, v in kwargs.items()
                                                                  if isinstance(v, torch.Tensor)}, output.clone()))
        return output

    windowed = windowed.clone()
    windowed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", record)
    latent, positive = tiny_models.image_and_prompt(4)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        comfy.sample.sample(windowed, noise, 6, 1.0, "euler", "normal", positive, positive, latent["samples"],
                            seed=1, disable_pbar=True)
    sampling = tiny_sdxl.get_model_object("model_sampling")
    high, low = float(sampling.percent_to_sigma(0.0)), float(sampling.percent_to_sigma(0.5))
    inside = [low <= float(t[0]) <= high for _, t, _, _, _ in calls]
    assert any(inside) and not all(inside), [float(c[1][0]) for c in calls]
    for reference, wanted in ((both, True), (style_only, False)):
        comfy.model_management.load_models_gpu([reference])
        with torch.inference_mode():
            for (x, t, context, extra, output), is_inside in zip(calls, inside):
                if is_inside == wanted:
                    expected = reference.model.apply_model(x, t, c_crossattn=context, **extra)
                    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
        comfy.model_management.unload_all_models()


def test_a_window_the_wrong_way_round_is_refused(host, tiny_sdxl, two_b_loras):
    with pytest.raises(ValueError, match="structure_start .* must be below structure_end"):
        host.run_node(FUSE, tiny_sdxl, "glyph.safetensors", "style.safetensors", 1.0, 1.0,
                      structure_start=0.7, structure_end=0.2)
