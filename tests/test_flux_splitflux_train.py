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


@pytest.mark.parametrize("free_gib, recomputes", [(None, 0), (23.0, 26), (48.0, 0)],
                         ids=["cpu", "24 GB card", "48 GB card"])
def test_fastest_on_flux_recomputes_only_where_the_gpu_cannot_keep_everything(host, free_gib, recomputes):
    method = host.pack("methods").by_key("splitflux")
    memory = host.pack("training.memory")
    assert memory.recomputed_layers("fastest", method, free_gib) == recomputes
    assert memory.recomputed_layers("8 GB", method, free_gib) is None
    assert memory.recomputed_layers("fastest", host.pack("methods").by_key("b-lora"), 6.0) == 0
    assert memory.recomputed_layers("fastest", method, 48.0, pixels=2048 * 2048) == 26, "a larger image needs more"


def test_each_memory_setting_trains_the_same_lora(host, loaded_flux, loras_dir, monkeypatch):
    """'fastest' on FLUX.1 keeps everything where it fits (here: the CPU) and on a 24 GB card
    recomputes the first 26 single blocks, '8 GB' every single block and the final layer; all
    train the same files."""
    import safetensors.torch

    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    host_training = host.pack("host.training")
    transformer = loaded_flux.model.diffusion_model
    recomputed = {}
    real_checkpointed = gradient_checkpointing.checkpointed

    def recording(name):
        def checkpointed(layers):
            recomputed[name] = list(layers)
            return real_checkpointed(layers)
        return checkpointed

    for name, setting in (("none", "fastest"), ("fast", "fastest"), ("small", "8 GB")):
        with monkeypatch.context() as patch:
            patch.setattr(gradient_checkpointing, "checkpointed", recording(name))
            if name == "fast":  # what a 24 GB card has free (the CPU has no limit)
                patch.setattr(host_training, "free_vram_gib", lambda: 23.0)
            train(host, loaded_flux, f"sf/{name}", steps=2, memory=setting)
    assert recomputed["none"] == []
    assert recomputed["fast"] == list(transformer.single_blocks[:26])
    assert recomputed["small"] == [*transformer.single_blocks, transformer.final_layer]
    for role in ("content", "style"):
        kept = safetensors.torch.load_file(loras_dir / "sf" / f"none_{role}.safetensors")
        for name in ("fast", "small"):
            trained = safetensors.torch.load_file(loras_dir / "sf" / f"{name}_{role}.safetensors")
            for key, value in kept.items():
                torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def test_previews_every_n_steps_reach_the_progress_bar_and_change_nothing(host, loaded_flux, loras_dir):
    """``preview_every`` on FLUX: a few Euler steps along the flow, shown through the host's
    latent previewer at steps 2 and 3 of 3; the trained files are those of a run without them."""
    import comfy.utils
    import safetensors.torch

    previews = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: preview is not None and previews.append((value, preview)))
    try:
        train(host, loaded_flux, "sf/previewed", preview_every=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [value for value, _ in previews] == [2, 3]
    kind, image, size = previews[0][1]
    assert kind == "JPEG" and image.size == (8, 8) and size == 512
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))
    train(host, loaded_flux, "sf/plain")
    for role in ("content", "style"):
        previewed = safetensors.torch.load_file(loras_dir / "sf" / f"previewed_{role}.safetensors")
        plain = safetensors.torch.load_file(loras_dir / "sf" / f"plain_{role}.safetensors")
        assert all(torch.equal(previewed[k], plain[k]) for k in plain), role


def test_the_flow_preview_sampler_lands_on_the_image_of_a_straight_flow(host):
    """A model that knows the image x0 predicts the velocity (x - x0) / sigma (noise - x0 on the
    straight path); Euler steps along a straight path are exact, so the sample is x0."""
    preview = host.pack("training.preview")
    x0 = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    sigmas_seen = []

    def predict(latent, sigma, index):
        sigmas_seen.append(float(sigma[0]))
        return (latent - x0) / sigma[0]

    sample = preview.sample(predict, x0.shape, torch.empty(0), 4, 0, "flow")
    torch.testing.assert_close(sample, x0, rtol=1e-5, atol=1e-5)
    assert sigmas_seen == [1.0, 0.75, 0.5, 0.25]


def test_fp8_weights_train_what_their_values_train_and_stay_fp8(host, loaded_flux, loras_dir):
    """FLUX.1 as Load Diffusion Model loads it with weight_dtype fp8_e4m3fn: fp8 weights computed
    in a wider dtype (the host's manual-cast layers). Training reads them through the host's
    casts: the files equal those trained on an fp32 model holding the same (fp8-rounded) values,
    and the fp8 model is left as it was."""
    import safetensors.torch

    from devkit import tiny_flux

    with torch.inference_mode():
        fp8 = tiny_flux.build_tiny_flux(dtype=torch.float8_e4m3fn, manual_cast_dtype=torch.float32)
        rounded = tiny_flux.build_tiny_flux()
        rounded.model.diffusion_model.load_state_dict(
            {k: v.float() for k, v in fp8.model.diffusion_model.state_dict().items()})
    linear1 = fp8.model.diffusion_model.single_blocks[0].linear1
    assert linear1.weight.dtype == torch.float8_e4m3fn and fp8.model.manual_cast_dtype == torch.float32
    before = tiny_flux.transformer_weights(fp8)
    train(host, fp8, "sf/fp8", steps=2)
    train(host, rounded, "sf/rounded", steps=2)
    after = tiny_flux.transformer_weights(fp8)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k].float(), before[k].float()) for k in before)
    for role in ("content", "style"):
        trained = safetensors.torch.load_file(loras_dir / "sf" / f"fp8_{role}.safetensors")
        reference = safetensors.torch.load_file(loras_dir / "sf" / f"rounded_{role}.safetensors")
        assert trained.keys() == reference.keys()
        assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "lora_up" in k)
        for key, value in reference.items():
            torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-7, msg=key)
