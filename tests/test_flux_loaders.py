"""Load Content LoRA / Load Style LoRA on a FLUX.1 model: SplitFlux's files (content: main +
residual, or main only; style: the style blocks), applied through ComfyUI's own FLUX key map
onto the q/k/v rows of ``linear1``; the user's model unchanged."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from blora_pack.core import flux_blocks
from blora_pack.training import splitflux

CONTENT, STYLE = "BLoRALoadContentLoRA", "BLoRALoadStyleLoRA"
HIDDEN = 64


@pytest.fixture(scope="module")
def loaded_flux(host):
    from devkit import tiny_flux

    with torch.inference_mode():
        return tiny_flux.build_tiny_flux()


@pytest.fixture
def files(loras_dir):
    layers = splitflux.SplitFluxLayers(HIDDEN, splitflux.SplitFluxSettings())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    safetensors.torch.save_file(splitflux.role_state_dict(layers, "content"), loras_dir / "sf_content.safetensors",
                                {splitflux.MAIN_RANK_METADATA_KEY: "48"})
    safetensors.torch.save_file(splitflux.role_state_dict(layers, "style"), loras_dir / "sf_style.safetensors")
    return layers


def expected_rows(layers, block: int, adapters: dict[str, float]) -> torch.Tensor:
    """The change of ``single_blocks.{block}.linear1``'s q/k/v rows."""
    deltas = []
    for layer in layers.of_block(f"single_blocks.{block}"):
        deltas.append(sum(layer.delta(a).detach() for a in adapters if a in layer.lora_A))
    return torch.cat(deltas)


@pytest.mark.parametrize("branches", ["main + residual", "main only"])
def test_content_loader_applies_the_content_and_rca_blocks(host, loaded_flux, files, branches):
    from devkit import tiny_flux, tiny_models

    before = tiny_flux.transformer_weights(loaded_flux)
    patched = host.run_node(CONTENT, loaded_flux, "sf_content.safetensors", 1.0, "comfyui (linear)", branches).result[0]
    after = tiny_models.patched_unet_weights(patched)
    adapters = {"main": 1, "rca": 1} if branches == "main only" else {"main": 1, "residual": 1, "rca": 1}
    for block in range(flux_blocks.SINGLE_BLOCKS):
        key = f"single_blocks.{block}.linear1.weight"
        change = after[key] - before[key]
        if block in flux_blocks.CONTENT_SINGLE_BLOCKS + flux_blocks.RCA_SINGLE_BLOCKS:
            torch.testing.assert_close(change[:3 * HIDDEN], expected_rows(files, block, adapters), rtol=1e-4, atol=1e-6)
        else:
            assert not change.any(), key
        assert not change[3 * HIDDEN:].any()  # the MLP rows of linear1 are never touched
    assert all(torch.equal(before[k], v) for k, v in tiny_flux.transformer_weights(loaded_flux).items())


def test_style_loader_applies_the_style_blocks(host, loaded_flux, files):
    from devkit import tiny_flux, tiny_models

    before = tiny_flux.transformer_weights(loaded_flux)
    patched = host.run_node(STYLE, loaded_flux, "sf_style.safetensors", 0.5).result[0]
    after = tiny_models.patched_unet_weights(patched)
    for block in range(flux_blocks.SINGLE_BLOCKS):
        key = f"single_blocks.{block}.linear1.weight"
        change = after[key] - before[key]
        if block in flux_blocks.STYLE_SINGLE_BLOCKS:
            torch.testing.assert_close(change[:3 * HIDDEN], 0.5 * expected_rows(files, block, {"style": 1}),
                                       rtol=1e-4, atol=1e-6)
        else:
            assert not change.any(), key


def test_wrong_part_and_no_main_branch_are_clear_errors(host, loaded_flux, files, loras_dir):
    with pytest.raises(ValueError, match="no layers on the content blocks"):
        host.run_node(CONTENT, loaded_flux, "sf_style.safetensors", 1.0)
    safetensors.torch.save_file(safetensors.torch.load_file(loras_dir / "sf_content.safetensors"),
                                loras_dir / "plain.safetensors")
    with pytest.raises(ValueError, match="not a SplitFlux content file"):
        host.run_node(CONTENT, loaded_flux, "plain.safetensors", 1.0, "comfyui (linear)", "main only")


@pytest.mark.parametrize("node, arguments", [
    ("UnZipColumnMaskMerge", ("sf_content.safetensors", "sf_style.safetensors", 1.0, 1.0)),
    ("ReCharStructureFuse", ("sf_content.safetensors", "sf_style.safetensors", 1.0, 1.0)),
])
def test_an_sdxl_only_node_given_flux_names_sdxl_and_the_flux_nodes(host, loaded_flux, files, node, arguments):
    with pytest.raises(ValueError, match=r"needs an SDXL model; the MODEL input is Flux.*supports SDXL only; FLUX\.1 "
                                         r"models are supported by Train SplitFlux, Load Content LoRA, Load Style "
                                         r"LoRA and K-LoRA Fuse\.$"):
        host.run_node(node, loaded_flux, *arguments)


def test_a_model_of_neither_family_is_refused_naming_both(host, files):
    from devkit import tiny_models

    sd15 = tiny_models.build_tiny_sd15()
    for node in (CONTENT, STYLE):
        with pytest.raises(ValueError, match=r"needs an SDXL model.*also takes FLUX\.1 models"):
            host.run_node(node, sd15, "sf_content.safetensors", 1.0)
    with pytest.raises(ValueError, match=r"needs an SDXL model.*also fuses FLUX LoRAs on FLUX\.1"):
        host.run_node("KLoRAFuse", sd15, "sf_content.safetensors", "sf_style.safetensors")
