"""Dynamic VRAM (ComfyUI 0.15+, the default on NVIDIA GPUs): what the CPU can prove.

On a GPU, 0.33 loads models through ``ModelPatcherDynamic``; on the CPU it falls back to the
plain patcher, so these tests give a real tiny model the two things that make a patcher
dynamic for the code under test: ``is_dynamic()`` answering True, and the host's own
``ModelPatcherDynamic.get_non_dynamic_delegate`` with a ``cached_patcher_init`` factory, as a
checkpoint loader registers it. Training must then run on the host's non-dynamic delegate,
which lives only while training runs (no second instance of the weights left behind), leave
the user's model untouched and train exactly what a plain model trains. The streaming of weights itself needs a GPU (see README, "Dynamic VRAM").

The loaders, ReChar and the merge node only add plain patches; a dynamic (or lowvram) load
computes each patched weight per layer with ``LowVramPatch`` instead of patching the weight in
place: both must give identical weights.
"""

from __future__ import annotations

import types
import weakref

import pytest
import torch

import lora_namings
from devkit import tiny_models
from test_train_node import assert_unchanged, model_state, train


def dynamic_looking(host, seed: int = 0):
    """A tiny SDXL (loaded under inference mode, as a checkpoint loader does) whose patcher answers
    as a dynamic one, and a record of the host's rebuilds of its non-dynamic delegate: how many,
    weak references to them, and whether the model or a clone of it was loaded at the time."""
    import comfy.model_management
    import comfy.model_patcher

    built = {"n": 0, "models": [], "model_was_loaded": []}

    def load_again(disable_dynamic=False):
        assert disable_dynamic, "the delegate must be built non-dynamic"
        built["n"] += 1
        built["model_was_loaded"].append(any(loaded.model.clone_base_uuid == model.clone_base_uuid
                                             for loaded in comfy.model_management.current_loaded_models))
        with torch.inference_mode():
            delegate = tiny_models.build_tiny_sdxl(seed)
        built["models"].append(weakref.ref(delegate.model))
        return delegate

    with torch.inference_mode():
        model = tiny_models.build_tiny_sdxl(seed)
    model.cached_patcher_init = (load_again, ())
    model.non_dynamic_delegate_model = None
    model.is_dynamic = lambda: True
    model.get_non_dynamic_delegate = types.MethodType(comfy.model_patcher.ModelPatcherDynamic.get_non_dynamic_delegate,
                                                      model)
    return model, built


@pytest.fixture
def compat(host):
    return host.pack("host.compat")


def test_a_plain_patcher_trains_on_itself(compat, loaded_sdxl):
    with compat.trainable_patcher(loaded_sdxl) as (patcher, disposable):
        assert patcher is loaded_sdxl and not disposable
    assert not compat.is_dynamic(loaded_sdxl)


def test_dynamic_vram_exists_only_on_hosts_that_have_it(host, compat):
    import comfy.model_patcher

    assert compat.HAS_DYNAMIC_VRAM == hasattr(comfy.model_patcher, "ModelPatcherDynamic")
    if compat.HAS_DYNAMIC_VRAM:  # on the CPU the host gives the plain patcher, so CPU tests never stream
        import comfy.model_management

        cpu = comfy.model_management.get_torch_device()
        rerouted = comfy.model_patcher.ModelPatcherDynamic(tiny_models.build_tiny_sdxl().model, cpu, cpu)
        assert type(rerouted) is comfy.model_patcher.ModelPatcher


@pytest.mark.dynamic_vram
def test_training_a_dynamic_model_runs_on_a_delegate_that_lives_only_while_training(host, compat, loras_dir):
    import comfy.model_management
    import comfy.model_patcher
    from safetensors.torch import load_file

    model, built = dynamic_looking(host)
    comfy.model_management.load_models_gpu([model.clone()])  # as sampling with it, or with a LoRA on it, leaves it
    with compat.trainable_patcher(model) as (delegate, disposable):
        assert type(delegate) is comfy.model_patcher.ModelPatcher and delegate.model is not model.model
        assert model.non_dynamic_delegate_model is not None and built["n"] == 1 and disposable
    del delegate
    assert model.non_dynamic_delegate_model is None, "the host's cache is left as it was"
    assert built["model_was_loaded"] == [False], "the model and its clones are unloaded before the host loads it again"

    before = model_state(model)
    image_and_prompt = tiny_models.image_and_prompt()
    train(host, model, image_and_prompt, steps=3, name="b-lora/dynamic")
    train(host, model, image_and_prompt, steps=3, name="b-lora/dynamic_again")
    assert built["n"] == 3, "each run builds its own delegate"
    assert model.non_dynamic_delegate_model is None
    assert not [ref for ref in built["models"] if ref() is not None], "a delegate outlived its training run"
    assert_unchanged(model, before)

    with torch.inference_mode():
        plain = tiny_models.build_tiny_sdxl(0)
    train(host, plain, image_and_prompt, steps=3, name="b-lora/plain")
    trained = {name: load_file(str(loras_dir / "b-lora" / f"{name}.safetensors"))
               for name in ("dynamic", "dynamic_again", "plain")}
    assert trained["plain"].keys() == trained["dynamic"].keys()
    for key, value in trained["plain"].items():
        assert torch.equal(trained["dynamic"][key], value), key
        assert torch.equal(trained["dynamic_again"][key], value), key


@pytest.mark.dynamic_vram
def test_a_delegate_is_let_go_of_where_it_is_not_copied_back_to_ram(host, loras_dir):
    """Unloading a model copies its weights to the offload device (RAM on a GPU machine) and
    restores them; a delegate thrown away right after needs neither. On the CPU load and offload
    device are the same, so the test makes the offload device ``meta``, where such a copy shows."""
    import comfy.model_management

    model, built = dynamic_looking(host)
    comfy.model_management.unload_model_and_clones(model)
    model.offload_device = torch.device("meta")
    load_again, delegates = model.cached_patcher_init[0], []

    def load_again_and_keep(disable_dynamic=False):
        delegates.append(load_again(disable_dynamic))
        return delegates[-1]

    model.cached_patcher_init = (load_again_and_keep, ())
    train(host, model, tiny_models.image_and_prompt(), steps=2, name="b-lora/let_go")
    assert built["n"] == 1
    assert {p.device.type for p in delegates[0].model.diffusion_model.parameters()} == {"cpu"}


@pytest.mark.dynamic_vram
def test_a_delegate_the_host_already_built_is_used_and_kept(host, compat):
    """The host builds the delegate itself for hooked conditioning (``samplers.py``) and caches
    it; training then reuses that one and leaves it in the cache."""
    model, built = dynamic_looking(host)
    model.get_non_dynamic_delegate()
    cached = model.non_dynamic_delegate_model
    train(host, model, tiny_models.image_and_prompt(), steps=2, name="b-lora/host_cached")
    assert built["n"] == 1 and model.non_dynamic_delegate_model is cached


@pytest.mark.dynamic_vram
def test_a_dynamic_model_the_host_cannot_load_again_gets_a_clear_error(host, loras_dir):
    """A custom loader that registers no ``cached_patcher_init`` leaves the host no way to build
    the delegate."""
    model, built = dynamic_looking(host)
    model.cached_patcher_init = None
    before = model_state(model)
    with pytest.raises(ValueError, match="loaded without dynamic VRAM.*--disable-dynamic-vram"):
        train(host, model, tiny_models.image_and_prompt(), steps=2, name="b-lora/no_loader")
    assert built["n"] == 0 and model.non_dynamic_delegate_model is None
    assert not (loras_dir / "b-lora" / "no_loader.safetensors").exists()
    assert_unchanged(model, before)


def weights_both_ways(model_patcher) -> tuple[dict, dict]:
    """The patched weights as a plain load makes them (patched in place) and as a dynamic or
    lowvram load makes them (``LowVramPatch`` per layer, on the unpatched weight)."""
    import comfy.model_patcher
    import comfy.utils

    unet = model_patcher.model
    per_layer = {key: comfy.model_patcher.LowVramPatch(key, model_patcher.patches)(
        comfy.utils.get_attr(unet, key).detach().clone()) for key in model_patcher.patches}
    model_patcher.patch_model()
    try:
        in_place = {key: comfy.utils.get_attr(unet, key).detach().clone() for key in model_patcher.patches}
    finally:
        model_patcher.unpatch_model()
    return in_place, per_layer


def lora_file(loras_dir, name: str, model, seed: int) -> str:
    from safetensors.torch import save_file

    shapes = lora_namings.b_lora_shapes(model.model.diffusion_model.state_dict())
    layers = lora_namings.random_layers(shapes, rank=4, seed=seed)
    save_file(lora_namings.write_naming(layers, "kohya_diffusers"), str(loras_dir / name))
    return name


@pytest.mark.parametrize("node_id, arguments", [
    ("BLoRALoadContentLoRA", lambda a, b: (a, 0.8)),
    ("BLoRALoadStyleLoRA", lambda a, b: (b, 1.1)),
    ("UnZipColumnMaskMerge", lambda a, b: (a, b, 0.9, 1.2, "none", "none")),
    ("ReCharStructureFuse", lambda a, b: (a, b, 1.0, 1.1)),
])
def test_plain_patches_give_identical_weights_with_either_patcher_type(host, tiny_sdxl, loras_dir, node_id, arguments):
    first = lora_file(loras_dir, "first.safetensors", tiny_sdxl, 1)
    second = lora_file(loras_dir, "second.safetensors", tiny_sdxl, 2)
    patched = host.run_node(node_id, tiny_sdxl, *arguments(first, second)).result[0]
    in_place, per_layer = weights_both_ways(patched)
    assert len(in_place) >= 16
    for key in in_place:
        torch.testing.assert_close(per_layer[key], in_place[key], rtol=0, atol=0, msg=key)
