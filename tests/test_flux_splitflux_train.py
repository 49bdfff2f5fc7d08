"""Train SplitFlux on the real host with the tiny FLUX: the files (stock-loadable, every layer
taken by ComfyUI's FLUX key map), Cancel and an exact resume, the model untouched, and a clear
error for a model of another family."""

from __future__ import annotations

import pytest
import torch

TRAIN = "SplitFluxTrain"


def press_cancel_during_step(host, monkeypatch, step_number: int) -> None:
    """The host's Cancel, through its real interrupt flag, while the ``step_number``-th step
    (1-based) runs the transformer."""
    import comfy.model_management

    inputs_class = host.pack("host.flux_training").FluxTrainingInputs
    real = inputs_class.predictor
    calls = {"n": 0}

    def predictor(self, clone, device):
        predict = real(self, clone, device)

        def counting(*args):
            calls["n"] += 1
            if calls["n"] == step_number:
                comfy.model_management.interrupt_current_processing(True)
            return predict(*args)

        return counting

    monkeypatch.setattr(inputs_class, "predictor", predictor)


@pytest.fixture(scope="module")
def loaded_flux(host):
    from devkit import tiny_flux

    with torch.inference_mode():
        return tiny_flux.build_tiny_flux()


def train(host, model, name, steps=3, **optional):
    from devkit import tiny_flux

    latents = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))}
    content = tiny_flux.tiny_flux_conditioning("A <c> object")
    style = tiny_flux.tiny_flux_conditioning("A <s> style")
    optional.setdefault("checkpoint_every", 0)
    return host.run_node(TRAIN, model, latents, content, style, steps, 1e-3, 0, name, "fp32", **optional)


def test_train_cancel_and_resume_exactly(host, loaded_flux, loras_dir, monkeypatch):
    import comfy.model_management
    import safetensors.torch

    from devkit import tiny_flux

    before = tiny_flux.transformer_weights(loaded_flux)
    output = train(host, loaded_flux, "sf/straight")
    assert output.result[1:3] == ("sf/straight_content.safetensors", "sf/straight_style.safetensors")
    assert len(output.result[4]["loss"]) == 3
    straight = {role: safetensors.torch.load_file(loras_dir / "sf" / f"straight_{role}.safetensors")
                for role in ("content", "style")}
    assert len(straight["content"]) == 2 * 3 * 12 and len(straight["style"]) == 2 * 3 * 26
    assert straight["content"]["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 64
    patched = output.result[0]
    weights = tiny_flux.transformer_weights(loaded_flux)
    assert all(torch.equal(before[k], weights[k]) for k in before)  # the user's model is untouched
    # through the stock key map: the q, k and v row slices of every single block's linear1
    assert set(patched.patches) == {f"diffusion_model.single_blocks.{i}.linear1.weight" for i in range(38)}
    assert all(len(patches) == 3 for patches in patched.patches.values())

    with monkeypatch.context() as patch:
        press_cancel_during_step(host, patch, 2)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(host, loaded_flux, "sf/resumed")
    assert (loras_dir / "sf" / "resumed_checkpoint.trainstate").is_file()
    train(host, loaded_flux, "sf/resumed", resume=True)
    for role, tensors in straight.items():
        resumed = safetensors.torch.load_file(loras_dir / "sf" / f"resumed_{role}.safetensors")
        assert set(resumed) == set(tensors)
        assert all(torch.equal(resumed[k], tensors[k]) for k in tensors), role
    assert not (loras_dir / "sf" / "resumed_checkpoint.trainstate").exists()
    weights = tiny_flux.transformer_weights(loaded_flux)
    assert all(torch.equal(before[k], weights[k]) for k in before)


def test_a_model_of_another_family_is_refused_naming_the_supported_ones(host, loras_dir):
    from devkit import tiny_models

    with torch.inference_mode():
        sdxl = tiny_models.build_tiny_sdxl()
    with pytest.raises(ValueError, match=r"needs a FLUX\.1 model.*SDXL.*supports FLUX\.1"):
        train(host, sdxl, "sf/x")


def test_a_mask_replaces_the_gate_and_is_recorded(host, loaded_flux, loras_dir, monkeypatch):
    """A MASK at image size becomes one value per image token (2 x 2 latent pixels, row by row)
    and is what the content blocks' gate reads; the files record that a mask was used."""
    import json

    from safetensors import safe_open

    flux_training = host.pack("host.flux_training")
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # the right half of the image
    tokens = flux_training.token_mask(mask, torch.Size((1, 16, 8, 8)))
    assert torch.equal(tokens, torch.tensor([[0.0, 0.0, 1.0, 1.0] * 4]))
    seen = []
    splitflux_module = host.pack("training.splitflux")
    real_gate = splitflux_module.visual_gate
    monkeypatch.setattr(splitflux_module, "visual_gate",
                        lambda features, layout, settings: seen.append(layout.mask) or real_gate(features, layout, settings))
    train(host, loaded_flux, "sf/masked", steps=1, mask=mask)
    assert seen and all(torch.equal(m.cpu(), tokens) for m in seen)
    with safe_open(loras_dir / "sf" / "masked_content.safetensors", "pt") as opened:
        config = json.loads(opened.metadata()["blora.config"])
    assert config["method_settings"]["masked"] is True


def test_the_8_gb_setting_trains_the_same_lora(host, loaded_flux, loras_dir):
    """Gradient checkpointing of the single blocks (memory '8 GB') recomputes what 'fastest'
    keeps: the same files."""
    import safetensors.torch

    train(host, loaded_flux, "sf/fast", steps=2, memory="fastest")
    train(host, loaded_flux, "sf/small", steps=2, memory="8 GB")
    for role in ("content", "style"):
        fast = safetensors.torch.load_file(loras_dir / "sf" / f"fast_{role}.safetensors")
        small = safetensors.torch.load_file(loras_dir / "sf" / f"small_{role}.safetensors")
        for key, value in fast.items():
            torch.testing.assert_close(small[key], value, rtol=1e-5, atol=1e-7)
