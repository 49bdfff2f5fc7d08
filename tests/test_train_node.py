"""Train B-LoRA on the real host: the file, the model left untouched, Cancel, resume, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from devkit import host as host_harness
from devkit import tiny_models

TRAIN = "BLoRATrain"


@pytest.fixture
def image_and_prompt():
    return tiny_models.image_and_prompt()


def train(host, model, image_and_prompt, steps=3, learning_rate=1e-3, rank=4, seed=0, name="b-lora/cat",
          precision="fp32", **optional):
    latents, positive = image_and_prompt
    return host.run_node(TRAIN, model, latents, positive, steps, learning_rate, rank, seed, name, precision, **optional)


def model_state(model_patcher):
    """Everything of the user's model that training could disturb."""
    unet = model_patcher.model.diffusion_model
    wrappers = sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", [])) for m in unet.modules())
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    return tiny_models.unet_weights(model_patcher), dict(model_patcher.patches), wrappers, requires_grad


def assert_unchanged(model_patcher, before):
    weights, patches, wrappers, requires_grad = model_state(model_patcher)
    assert wrappers == 0, "weight wrappers were left on the shared modules"
    assert patches == before[1]
    assert requires_grad == before[3]
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)


def fixed_draw_loss(host, model_patcher, image_and_prompt, draws=32):
    """Mean denoising loss over fixed draws, through the model as the host patches it."""
    import comfy.model_management

    diffusion = host.pack("training.diffusion")
    host_training = host.pack("host.training")
    latents, positive = image_and_prompt
    x0 = host_training.training_latents(model_patcher, latents)
    (conditioning,) = host_training.conditioning_per_image(model_patcher, positive, 1)
    schedule = host_training.noise_schedule(model_patcher)
    comfy.model_management.load_models_gpu([model_patcher])
    try:
        unet = model_patcher.model.diffusion_model
        with torch.no_grad():
            losses = [float(diffusion.denoising_loss(
                lambda noisy, t, i: unet(noisy, timesteps=t, context=conditioning.context, y=conditioning.y),
                x0, diffusion.draw_step(1234, step, 1, x0.shape), schedule)) for step in range(draws)]
    finally:
        comfy.model_management.unload_all_models()
    return sum(losses) / len(losses)


def test_trained_file_loads_everywhere(host, loaded_sdxl, loras_dir, image_and_prompt, caplog):
    import comfy.sd

    before = model_state(loaded_sdxl)
    output = train(host, loaded_sdxl, image_and_prompt, steps=3, prompt="A [v18]")
    patched, name, curve, losses = output.result
    assert name == "b-lora/cat.safetensors" and (loras_dir / name).is_file()
    assert curve.shape == (1, 256, 512, 3) and len(losses["loss"]) == 3
    assert sorted(p.name for p in loras_dir.rglob("*")) == ["b-lora", "cat.safetensors"], "no temp or checkpoint files"
    assert_unchanged(loaded_sdxl, before)

    with safe_open(str(loras_dir / name), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["blora.method"] == "B-LoRA" and metadata["blora.rank"] == "4" and metadata["blora.alpha"] == "4"
    assert json.loads(metadata["blora.blocks"]) == ["output_blocks.0.1", "output_blocks.1.1"]
    assert metadata["blora.steps"] == "3" and metadata["blora.prompt"] == "A [v18]"
    assert len(metadata["blora.base_model_sha256"]) == 64
    assert json.loads(metadata["blora.losses"]) == pytest.approx(losses["loss"], rel=1e-5)
    assert len(keys) == 32 * 3

    # ComfyUI's stock loader: every key maps, none "not loaded"
    import comfy.utils

    state_dict = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(loaded_sdxl, None, state_dict, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    stock_weights = tiny_models.patched_unet_weights(stock)
    node_weights = tiny_models.patched_unet_weights(patched)
    assert all(torch.equal(stock_weights[k], node_weights[k]) for k in stock_weights)

    # this pack's loaders: content block only, equal to the node's own output on that block
    content = host.run_node("BLoRALoadContentLoRA", loaded_sdxl, name, 1.0).result[0]
    content_weights = tiny_models.patched_unet_weights(content)
    for key, value in content_weights.items():
        expected = node_weights[key] if key.startswith("output_blocks.0.1.") else before[0][key]
        assert torch.equal(value, expected), key


def diffusers_warnings(caplog, action) -> str:
    """Warnings diffusers logs while ``action`` runs (its loggers do not propagate to the root)."""
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            action()
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    return " ".join(r.getMessage() for r in caplog.records).lower()


def test_the_warning_capture_sees_an_unexpected_key(host, loaded_sdxl, caplog):
    """The check below would be empty if diffusers' warnings did not reach it."""
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_models.diffusers_unet_from(loaded_sdxl)
    bogus = {"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(2, 128),
             "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(128, 2),
             "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nothing.lora.down.weight": torch.zeros(2, 128),
             "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nothing.lora.up.weight": torch.zeros(128, 2)}
    messages = diffusers_warnings(caplog, lambda: StableDiffusionXLPipeline.load_lora_into_unet(
        *StableDiffusionXLPipeline.lora_state_dict(bogus), unet))
    assert "unexpected" in messages or "not found" in messages


def test_diffusers_reads_the_file_with_no_unexpected_keys(host, loaded_sdxl, loras_dir, image_and_prompt, caplog):
    from diffusers import StableDiffusionXLPipeline

    train(host, loaded_sdxl, image_and_prompt, steps=2)
    unet = tiny_models.diffusers_unet_from(loaded_sdxl)
    path = str(loras_dir / "b-lora" / "cat.safetensors")
    messages = diffusers_warnings(caplog, lambda: StableDiffusionXLPipeline.load_lora_into_unet(
        *StableDiffusionXLPipeline.lora_state_dict(path), unet))
    assert "unexpected" not in messages and "not found" not in messages
    lora_modules = {name.rsplit(".lora_", 1)[0] for name, _ in unet.named_parameters() if ".lora_" in name}
    assert len(lora_modules) == 32


def test_export_in_the_official_diffusers_format(host, loaded_sdxl, loras_dir, image_and_prompt):
    lora_format = host.pack("core.lora_format")
    train(host, loaded_sdxl, image_and_prompt, steps=2, export_diffusers=True)
    official = loras_dir / "b-lora" / "cat_diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(str(official), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    assert len(keys) == 64 and all(k.startswith("unet.up_blocks.0.attentions.") for k in keys)
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    ours = lora_format.read_lora_file(loras_dir / "b-lora" / "cat.safetensors")
    exported = lora_format.read_lora_file(official)
    for path, layer in ours.layers.items():
        torch.testing.assert_close(exported.layers[path].delta(), layer.delta())


def test_two_hundred_steps_overfit_the_image(host, loaded_sdxl, loras_dir, image_and_prompt):
    before = fixed_draw_loss(host, loaded_sdxl, image_and_prompt)
    patched, _, _, losses = train(host, loaded_sdxl, image_and_prompt, steps=200, learning_rate=1e-2, rank=8).result
    after = fixed_draw_loss(host, patched, image_and_prompt)
    assert after < 0.85 * before, f"loss {before:.4f} -> {after:.4f}"
    assert sum(losses["loss"][-20:]) < 0.85 * sum(losses["loss"][:20])


def test_progress_bar_moves_every_step(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch):
    import comfy.utils

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)  # 0.33 sends <= 10/s
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, node_id)))
    try:
        train(host, loaded_sdxl, image_and_prompt, steps=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert seen == [(0, 4, "7"), (1, 4, "7"), (2, 4, "7"), (3, 4, "7"), (4, 4, "7")]


def test_cancel_saves_a_checkpoint_and_leaves_the_model_untouched(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch):
    import comfy.model_management

    before = model_state(loaded_sdxl)
    calls = host_harness.press_cancel_during_step(host, monkeypatch, 3)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(host, loaded_sdxl, image_and_prompt, steps=50)
    assert calls["n"] == 3, "Cancel must stop within a step"
    checkpoint = loras_dir / "b-lora" / "cat_checkpoint.safetensors"
    assert checkpoint.is_file() and checkpoint.with_suffix(".trainstate").is_file()
    assert not (loras_dir / "b-lora" / "cat.safetensors").exists()
    with safe_open(str(checkpoint), "pt") as handle:
        assert handle.metadata()["blora.checkpoint_step"] == str(calls["completed"]), "the checkpoint holds the last completed step"
    assert_unchanged(loaded_sdxl, before)
    host.run_node("BLoRALoadStyleLoRA", loaded_sdxl, "b-lora/cat_checkpoint.safetensors", 1.0)


@pytest.mark.parametrize("memory", ["fastest", "8 GB"])
def test_resume_after_cancel_equals_an_uninterrupted_run(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch,
                                                         memory):
    import comfy.model_management
    lora_format = host.pack("core.lora_format")

    train(host, loaded_sdxl, image_and_prompt, steps=6, name="straight", learning_rate=1e-2, memory=memory)
    with monkeypatch.context() as patch:
        host_harness.press_cancel_during_step(host, patch, 3)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(host, loaded_sdxl, image_and_prompt, steps=6, name="resumed", learning_rate=1e-2, memory=memory)
    output = train(host, loaded_sdxl, image_and_prompt, steps=6, name="resumed", learning_rate=1e-2, resume=True,
                   memory=memory)
    assert len(output.result[3]["loss"]) == 6
    straight = lora_format.read_lora_file(loras_dir / "straight.safetensors")
    resumed = lora_format.read_lora_file(loras_dir / "resumed.safetensors")
    for path, layer in straight.layers.items():
        assert torch.equal(resumed.layers[path].up, layer.up) and torch.equal(resumed.layers[path].down, layer.down)
    assert not (loras_dir / "resumed_checkpoint.safetensors").exists(), "checkpoint removed after success"


def test_resume_refuses_other_settings(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch):
    import comfy.model_management

    host_harness.press_cancel_during_step(host, monkeypatch, 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(host, loaded_sdxl, image_and_prompt, steps=6, rank=4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"different training setup \(rank: checkpoint 4, now 8; alpha: checkpoint 4\.0, now "
                                         r"8\.0\)\. Use the same settings"):  # alpha = rank, resolved
        train(host, loaded_sdxl, image_and_prompt, steps=6, rank=8, resume=True)
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        train(host, loaded_sdxl, image_and_prompt, steps=6, name="other", resume=True)


def test_an_error_mid_training_leaves_the_model_untouched(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch):
    host_training = host.pack("host.training")
    real = host_training.unet_predict

    def failing_predict(*args):
        predict = real(*args)
        calls = {"n": 0}

        def run(*inputs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return predict(*inputs)

        return run

    monkeypatch.setattr(host_training, "unet_predict", failing_predict)
    before = model_state(loaded_sdxl)
    with pytest.raises(RuntimeError, match="simulated"):
        train(host, loaded_sdxl, image_and_prompt, steps=10)
    assert_unchanged(loaded_sdxl, before)
    assert (loras_dir / "b-lora" / "cat_checkpoint.safetensors").is_file(), "the step done is kept"


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "C:/escape", "a/../../escape", "", "  "])
def test_names_outside_the_loras_folder_are_refused_before_any_work(host, loaded_sdxl, loras_dir, image_and_prompt,
                                                                   monkeypatch, name):
    host_training = host.pack("host.training")
    monkeypatch.setattr(host_training, "training_latents", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match="inside the loras folder"):
        train(host, loaded_sdxl, image_and_prompt, name=name)
    assert list(loras_dir.iterdir()) == []


def test_a_non_sdxl_model_is_refused(host, loras_dir, image_and_prompt):
    with pytest.raises(ValueError, match="Train B-LoRA needs an SDXL model"):
        train(host, tiny_models.build_tiny_sd15(), image_and_prompt)


@pytest.mark.parametrize("latents, message", [
    ({"samples": torch.zeros(0, 4, 8, 8)}, "encode at least one image"),
    ({}, "The latents input holds nothing"),
    ({"samples": torch.zeros(1, 16, 8, 8)}, "16 channels but this model works on 4"),
    ({"samples": torch.full((1, 4, 8, 8), float("nan"))}, "NaN/inf"),
])
def test_bad_latents_are_refused(host, loaded_sdxl, loras_dir, image_and_prompt, latents, message):
    _, positive = image_and_prompt
    with pytest.raises(ValueError, match=message):
        train(host, loaded_sdxl, (latents, positive))


def test_mismatched_conditioning_is_refused(host, loaded_sdxl, loras_dir, image_and_prompt):
    latents, positive = image_and_prompt
    two_images = {"samples": latents["samples"].repeat(2, 1, 1, 1)}
    three_prompts = positive * 3
    with pytest.raises(ValueError, match=r"2 latent image\(s\) but 3 conditionings"):
        train(host, loaded_sdxl, (two_images, three_prompts))
    sd15_prompt = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match="768 features per token but this model expects 64"):
        train(host, loaded_sdxl, (latents, sd15_prompt))
    with pytest.raises(ValueError, match="no pooled output"):
        train(host, loaded_sdxl, (latents, [[positive[0][0], {}]]))


def test_several_images_with_their_own_captions(host, loaded_sdxl, loras_dir, image_and_prompt, monkeypatch):
    latents, positive = image_and_prompt
    generator = torch.Generator().manual_seed(3)
    two_images = {"samples": torch.randn(2, 4, 8, 8, generator=generator)}
    captions = [positive[0], [torch.randn(1, 77, tiny_models.CONTEXT_DIM, generator=generator),
                              {"pooled_output": torch.randn(1, tiny_models.POOLED_DIM, generator=generator)}]]
    host_training = host.pack("host.training")
    real = host_training.unet_predict
    indices = []

    def spying(*args):
        predict = real(*args)
        return lambda noisy, t, index: (indices.append(index), predict(noisy, t, index))[1]

    monkeypatch.setattr(host_training, "unet_predict", spying)
    train(host, loaded_sdxl, (two_images, captions), steps=12)
    assert set(indices) == {0, 1}


def test_all_attention_recipe(host, loaded_sdxl, loras_dir, image_and_prompt):
    lora_format = host.pack("core.lora_format")
    train(host, loaded_sdxl, image_and_prompt, steps=2, rank=8, recipe="all attention layers (style LoRA)")
    weights = lora_format.read_lora_file(loras_dir / "b-lora" / "cat.safetensors")
    unet_keys = tiny_models.unet_weights(loaded_sdxl).keys()
    attention = [k for k in unet_keys if ".attn" in k and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))]
    assert len(weights.layers) == len(attention) > 32
    assert {layer.alpha for layer in weights.layers.values()} == {16.0}
    assert weights.metadata["blora.method"] == "LoRA"


def test_a_recipe_brings_all_its_published_settings(host, loaded_sdxl, loras_dir, monkeypatch):
    """Through the API with rank and learning rate left at 0 (the node's defaults): the style-LoRA
    recipe trains at rank 8, alpha 16, lr 1e-5, AdamW weight decay 0.01, no clipping, 2 images a step."""
    lora_format = host.pack("core.lora_format")
    training_run = host.pack("host.training_run")
    configs = []
    real_train = training_run.train
    monkeypatch.setattr(training_run, "train", lambda *args, **kwargs: configs.append(args[4]) or real_train(*args, **kwargs))
    (first, positive), (second, _) = tiny_models.image_and_prompt(0), tiny_models.image_and_prompt(1)
    latents = {"samples": torch.cat([first["samples"], second["samples"]])}
    host.run_node(TRAIN, loaded_sdxl, latents, positive, 2, 0.0, 0, 0, "style/two", "fp32",
                  recipe="all attention layers (style LoRA)")
    weights = lora_format.read_lora_file(loras_dir / "style" / "two.safetensors")
    assert {layer.down.shape[0] for layer in weights.layers.values()} == {8}
    assert {layer.alpha for layer in weights.layers.values()} == {16.0}
    assert weights.metadata["blora.learning_rate"] == "1e-05"
    (config,) = configs
    assert (config.learning_rate, config.weight_decay, config.max_grad_norm, config.batch_size) == (1e-5, 0.01, None, 2)
    host.run_node(TRAIN, loaded_sdxl, latents, positive, 1, 0.0, 0, 0, "b-lora/defaults", "fp32")
    assert (configs[-1].learning_rate, configs[-1].weight_decay, configs[-1].max_grad_norm, configs[-1].batch_size) == (
        5e-5, 1e-4, 1.0, 1)
    blora = lora_format.read_lora_file(loras_dir / "b-lora" / "defaults.safetensors")
    assert {layer.down.shape[0] for layer in blora.layers.values()} == {64}


@pytest.mark.parametrize("precision, recorded", [("bf16", "bf16"), ("fp16", "fp32")])
def test_precisions_on_the_cpu(host, loaded_sdxl, loras_dir, image_and_prompt, precision, recorded):
    lora_format = host.pack("core.lora_format")
    _, _, _, losses = train(host, loaded_sdxl, image_and_prompt, steps=2, precision=precision).result
    assert all(torch.isfinite(torch.tensor(losses["loss"])))
    assert lora_format.read_lora_file(loras_dir / "b-lora" / "cat.safetensors").metadata["blora.precision"] == recorded


def test_the_stock_loader_capture_sees_a_key_not_loaded(host, loaded_sdxl, caplog):
    """The 'zero keys not loaded' check above would be empty if ComfyUI's warning did not reach it."""
    import comfy.sd

    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(loaded_sdxl, None, {"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2)}, 1.0, 0.0)
    assert any("lora key not loaded" in r.getMessage() for r in caplog.records)


def test_preview_every_n_steps_reaches_the_progress_bar(host, loaded_sdxl, loras_dir, image_and_prompt):
    import comfy.utils

    previews = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: preview is not None and previews.append((value, preview)))
    try:
        train(host, loaded_sdxl, image_and_prompt, steps=5, preview_every=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [value for value, _ in previews] == [2, 4, 5]
    kind, image, size = previews[0][1]
    assert kind == "JPEG" and image.size == (8, 8) and size == 512
