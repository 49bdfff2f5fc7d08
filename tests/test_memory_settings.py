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
    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    diffusion = host.pack("training.diffusion")
    adapters = host.pack("training.lora_adapters").LoraAdapterSet(
        host_training.target_shapes(model, sdxl.B_LORA.layers), 4, None)
    adapters.reset(0)
    with torch.no_grad():
        for adapter in adapters.layers:
            adapter.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(adapter.up.shape[0]))
    latents, positive = tiny_models.image_and_prompt()
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)
    with host_training.training_model(model, adapters, adapters.weight_wrappers(),
                                      recomputed_layers=None if checkpointed else 0) as (clone, device):
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
    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    unet = tiny_sdxl.model.diffusion_model
    for method, first in ((sdxl.B_LORA, unet.output_blocks[0][0]), (sdxl.UNZIPLORA, unet.input_blocks[4][0])):
        layers = gradient_checkpointing.backward_path_layers(unet, host_training.target_shapes(tiny_sdxl, method.layers))
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
    sdxl = host.pack("methods.sdxl")
    b_lora, unziplora = sdxl.B_LORA.memory_peak_gib, sdxl.UNZIPLORA.memory_peak_gib
    assert memory.resolve("auto", b_lora, None)[0] == "fastest"  # a CPU: memory is not the limit
    assert memory.resolve("auto", b_lora, 24.0)[0] == "fastest"
    assert memory.resolve("auto", b_lora, 8.0)[0] == "8 GB"
    assert memory.resolve("auto", unziplora, 16.0)[0] == "8 GB"
    setting, why = memory.resolve("auto", unziplora, 6.0)
    assert setting == "8 GB" and "only 6.0 GiB are free" in why
    assert memory.resolve("8 GB", b_lora, 80.0) == ("8 GB", "memory 8 GB (as chosen)")
    with pytest.raises(ValueError, match="memory must be one of"):
        memory.resolve("16 GB", b_lora, 8.0)


def recorded_notes(host, monkeypatch) -> list:
    """The ``note`` (memory setting) of every progress reporter training makes, in order."""
    progress = host.pack("host.progress")
    notes = []
    real = progress.TrainingProgress.__init__

    def recording(self, *args, **kwargs):
        notes.append(kwargs.get("note"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(progress.TrainingProgress, "__init__", recording)
    return notes


def test_the_setting_is_named_in_the_log_and_status(host, loaded_sdxl, loras_dir, caplog, monkeypatch):
    notes = recorded_notes(host, monkeypatch)
    with caplog.at_level(logging.INFO):
        train(host, loaded_sdxl, tiny_models.image_and_prompt(), steps=1)
    assert "memory auto: fastest" in caplog.text and notes == ["memory fastest"]


def out_of_memory(host, monkeypatch, running_out=("fastest",), after_calls: int = 0) -> None:
    """The GPU's out-of-memory error, which a CPU never raises, in every UNet call of a run with
    a setting in ``running_out`` once ``after_calls`` of them have gone through; and a GPU with
    40 GiB free, so that ``auto`` picks ``fastest``."""
    host_training = host.pack("host.training")
    real_predict = host_training.unet_predict
    calls = {"n": 0}

    def predict_running_out(clone, conditionings, device):
        predict = real_predict(clone, conditionings, device)
        setting = "8 GB" if replaced_forwards(clone) else "fastest"

        def run(*args):
            if setting in running_out:
                calls["n"] += 1
                if calls["n"] > after_calls:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return predict(*args)

        return run

    monkeypatch.setattr(host_training, "unet_predict", predict_running_out)
    monkeypatch.setattr(host_training, "free_vram_gib", lambda: 40.0)


def test_auto_goes_on_with_8_gb_when_fastest_runs_out_at_the_first_step(host, loaded_sdxl, loras_dir, monkeypatch,
                                                                        caplog):
    latents, positive = tiny_models.image_and_prompt()
    train(host, loaded_sdxl, (latents, positive), steps=3, learning_rate=1e-2, name="oom/direct", memory="8 GB")
    before = model_state(loaded_sdxl)
    notes = recorded_notes(host, monkeypatch)
    out_of_memory(host, monkeypatch)
    with caplog.at_level(logging.INFO):
        train(host, loaded_sdxl, (latents, positive), steps=3, learning_rate=1e-2, name="oom/auto")
    assert "memory auto: fastest" in caplog.text
    assert "out of GPU memory with memory 'fastest'; going on with '8 GB'" in caplog.text
    assert notes == ["memory fastest", "memory 8 GB (after running out with fastest)"]
    direct, fallen_back = (load_file(str(loras_dir / f"oom/{name}.safetensors")) for name in ("direct", "auto"))
    assert direct.keys() == fallen_back.keys()
    for key, value in direct.items():
        assert torch.equal(fallen_back[key], value), f"{key}: not trained from the same start"
    assert not list((loras_dir / "oom").glob("*checkpoint*"))
    assert_unchanged(loaded_sdxl, before)
    assert replaced_forwards(loaded_sdxl) == []


def test_auto_goes_on_from_the_checkpoint_when_fastest_runs_out_later(host, loaded_sdxl, loras_dir, monkeypatch,
                                                                      caplog):
    latents, positive = tiny_models.image_and_prompt()
    train(host, loaded_sdxl, (latents, positive), steps=5, learning_rate=1e-2, name="oom/fastest", memory="fastest")
    out_of_memory(host, monkeypatch, after_calls=2)
    with caplog.at_level(logging.INFO):
        train(host, loaded_sdxl, (latents, positive), steps=5, learning_rate=1e-2, name="oom/later")
    assert "going on with '8 GB' from the checkpoint at step 2" in caplog.text
    fastest, later = (load_file(str(loras_dir / f"oom/{name}.safetensors")) for name in ("fastest", "later"))
    for key, value in fastest.items():  # 2 steps fastest + 3 steps 8 GB = 5 steps of either, to float tolerance
        torch.testing.assert_close(later[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert not list((loras_dir / "oom").glob("*checkpoint*"))


@pytest.mark.parametrize("memory, running_out, advice", [
    ("fastest", ("fastest",), "with memory 'fastest' .*Set memory to '8 GB'"),
    ("auto", ("fastest", "8 GB"), "with memory '8 GB' .*This is the smallest setting"),
])
def test_running_out_for_good_says_what_to_do(host, loaded_sdxl, loras_dir, monkeypatch, memory, running_out, advice):
    """A setting chosen by hand is kept, with a clear error; under ``auto`` the error comes when
    the smallest setting runs out too."""
    before = model_state(loaded_sdxl)
    out_of_memory(host, monkeypatch, running_out)
    with pytest.raises(torch.OutOfMemoryError, match=advice) as raised:
        train(host, loaded_sdxl, tiny_models.image_and_prompt(), steps=3, name="oom/chosen", memory=memory)
    assert str(raised.value).startswith("Train B-LoRA: the GPU ran out of memory")
    assert "Tried to allocate 2.00 GiB" in str(raised.value)
    assert not (loras_dir / "oom" / "chosen.safetensors").exists()
    assert_unchanged(loaded_sdxl, before)


def test_unziplora_goes_on_with_8_gb_as_well(host, loaded_sdxl, loras_dir, monkeypatch):
    latents, positive = tiny_models.image_and_prompt()
    _, content = tiny_models.image_and_prompt(100)
    _, style = tiny_models.image_and_prompt(200)

    def unzip(name, memory="auto"):
        host.run_node("UnZipLoRATrain", loaded_sdxl, latents, positive, content, style, 3, 1e-3, 1e-3, 5e-2, 4, 1, 0.25,
                      0, name, "fp32", cone_threshold=5e-8, memory=memory)
        return {role: load_file(str(loras_dir / f"{name}_{role}.safetensors")) for role in ("content", "style")}

    direct = unzip("oom/unzip_direct", "8 GB")
    out_of_memory(host, monkeypatch)
    fallen_back = unzip("oom/unzip_auto")
    for role, tensors in direct.items():
        for key, value in tensors.items():
            assert torch.equal(fallen_back[role][key], value), f"{role} {key}"
