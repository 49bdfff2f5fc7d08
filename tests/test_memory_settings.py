"""The trainers' ``memory`` input: gradient checkpointing of the backward path trains exactly what
``fastest`` trains (float tolerance), the layers are left as they were, and ``auto`` picks the
fastest setting that fits, saying which."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from devkit import host as host_harness
from devkit import tiny_models
from test_train_node import assert_unchanged, model_state, train


def replaced_forwards(model_patcher) -> list[str]:
    return [name for name, module in model_patcher.model.diffusion_model.named_modules() if "forward" in vars(module)]


def one_step_gradients(host, model, checkpointed: bool):
    """Loss and LoRA gradients of one B-LoRA step through the host's training clone."""
    recipes = host.pack("training.recipes")
    host_training = host.pack("host.training")
    diffusion = host.pack("training.diffusion")
    adapters = host.pack("training.lora_adapters").LoraAdapterSet(
        host_training.target_shapes(model, recipes.B_LORA), 4, None)
    adapters.reset(0)
    with torch.no_grad():
        for adapter in adapters.adapters:
            adapter.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(adapter.up.shape[0]))
    latents, positive = tiny_models.image_and_prompt()
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)
    with host_training.training_model(model, adapters, dict(adapters.items()),
                                      checkpoint_backward_path=checkpointed) as (clone, device):
        predict = host_training.unet_predict(clone, conditionings, device)
        draw = diffusion.draw_step(3, 0, 1, x0.shape)
        loss = diffusion.denoising_loss(predict, x0, draw, host_training.noise_schedule(clone))
        loss.backward()
        layers = replaced_forwards(clone)
    gradients = {name: p.grad.clone() for name, p in adapters.named_parameters()}
    return loss.detach(), gradients, layers


def test_checkpointing_gives_the_same_loss_and_gradients(host, loaded_sdxl):
    fastest_loss, fastest_gradients, fastest_layers = one_step_gradients(host, loaded_sdxl, False)
    loss, gradients, layers = one_step_gradients(host, loaded_sdxl, True)
    assert fastest_layers == [] and len(layers) > 10, "8 GB checkpoints the backward path while training"
    assert all(name.startswith(("output_blocks.", "out")) for name in layers), "B-LoRA's backward starts at output_blocks.0"
    torch.testing.assert_close(loss, fastest_loss, rtol=1e-6, atol=1e-7)
    assert fastest_gradients.keys() == gradients.keys()
    assert any(g.abs().sum() > 0 for g in gradients.values())
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, fastest_gradients[name], rtol=1e-5, atol=1e-8, msg=name)
    assert replaced_forwards(loaded_sdxl) == [], "every layer's own forward is back"


def test_backward_path_of_each_trainer(host, tiny_sdxl):
    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    recipes = host.pack("training.recipes")
    host_training = host.pack("host.training")
    unet = tiny_sdxl.model.diffusion_model
    for recipe, first in ((recipes.B_LORA, unet.output_blocks[0][0]), (recipes.UNZIPLORA, unet.input_blocks[4][0])):
        layers = gradient_checkpointing.backward_path_layers(unet, host_training.target_shapes(tiny_sdxl, recipe))
        assert layers[0] is first and layers[-1] is unet.out
    assert gradient_checkpointing.backward_path_layers(unet, []) == []


@pytest.mark.parametrize("node_id", ["BLoRATrain", "UnZipLoRATrain"])
def test_eight_gb_trains_what_fastest_trains(host, loaded_sdxl, loras_dir, node_id):
    latents, positive = tiny_models.image_and_prompt()
    before = model_state(loaded_sdxl)
    files = {}
    for memory in ("fastest", "8 GB"):
        name = f"run/{memory.replace(' ', '')}"
        if node_id == "BLoRATrain":
            train(host, loaded_sdxl, (latents, positive), steps=3, learning_rate=1e-2, name=name, memory=memory)
            files[memory] = load_file(str(loras_dir / f"{name}.safetensors"))
        else:
            _, content = tiny_models.image_and_prompt(100)
            _, style = tiny_models.image_and_prompt(200)
            host.run_node(node_id, loaded_sdxl, latents, positive, content, style, 3, 1e-3, 1e-3, 5e-2, 4, 1, 0.25,
                          0, name, "fp32", cone_threshold=5e-8, memory=memory)
            files[memory] = load_file(str(loras_dir / f"{name}_style.safetensors"))
    assert_unchanged(loaded_sdxl, before)
    assert replaced_forwards(loaded_sdxl) == []
    for key, value in files["fastest"].items():
        torch.testing.assert_close(files["8 GB"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_cancel_with_checkpointing_restores_every_layer(host, loaded_sdxl, loras_dir, monkeypatch):
    import comfy.model_management

    before = model_state(loaded_sdxl)
    host_harness.press_cancel_during_step(host, monkeypatch, 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(host, loaded_sdxl, tiny_models.image_and_prompt(), steps=20, memory="8 GB")
    assert_unchanged(loaded_sdxl, before)
    assert replaced_forwards(loaded_sdxl) == []


def test_auto_picks_the_fastest_setting_that_fits(host):
    memory = host.pack("training.memory")
    assert memory.resolve("auto", "b-lora", None)[0] == "fastest"  # a CPU: memory is not the limit
    assert memory.resolve("auto", "b-lora", 24.0)[0] == "fastest"
    assert memory.resolve("auto", "b-lora", 8.0)[0] == "8 GB"
    assert memory.resolve("auto", "unziplora", 16.0)[0] == "8 GB"
    setting, why = memory.resolve("auto", "unziplora", 6.0)
    assert setting == "8 GB" and "only 6.0 GiB are free" in why
    assert memory.resolve("8 GB", "b-lora", 80.0) == ("8 GB", "memory 8 GB (as chosen)")
    with pytest.raises(ValueError, match="memory must be one of"):
        memory.resolve("16 GB", "b-lora", 8.0)


def test_the_setting_is_named_in_the_log_and_status(host, loaded_sdxl, loras_dir, caplog, monkeypatch):
    progress = host.pack("host.progress")
    notes = []
    real = progress.TrainingProgress.__init__

    def recording(self, *args, **kwargs):
        notes.append(kwargs.get("note"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(progress.TrainingProgress, "__init__", recording)
    with caplog.at_level(logging.INFO):
        train(host, loaded_sdxl, tiny_models.image_and_prompt(), steps=1)
    assert "memory auto: fastest" in caplog.text and notes == ["memory fastest"]
