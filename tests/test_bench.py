"""The benchmark scripts keep working between the sessions that run them for real: each runs
here for a step or two, as a user runs it (a fresh process on the ComfyUI checkout the tests
found). The GPU benchmark runs its ``--size tiny`` smoke mode, on the CPU when there is no GPU.
Timings are not checked: speed is measured by these scripts, not by tests."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from devkit import host as host_harness
from devkit.host import COMFYUI_PATH



def run_bench(script: str, *arguments: str) -> str:
    environment = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH)}
    result = subprocess.run([sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *arguments], env=environment,
                            cwd=host_harness.PACK_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script, arguments", [
    ("cpu_train_step.py", ["--size", "8", "--steps", "1", "--rounds", "1"]),
    ("cpu_unzip_step.py", ["--size", "8", "--steps", "1", "--rounds", "1"]),
    ("cpu_splitflux_step.py", ["--size", "4", "--tokens", "4", "--steps", "1", "--rounds", "1"]),
])
def test_cpu_benchmarks_print_their_ratio(host, script, arguments, tmp_path):
    output = run_bench(script, *arguments, "--json", str(tmp_path / "result.json"))
    assert "ratio pack/reference:" in output and "machine:" in output
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ratio"] > 0 and result["ratio"] == pytest.approx(result["ms"]["pack"] / result["ms"]["reference"])
    if script == "cpu_unzip_step.py":
        assert "pack-8gb:" in output and "ratio pack-8gb/pack:" in output, "the 8 GB setting's side"
    if script == "cpu_splitflux_step.py":
        assert "narrow FLUX.1" in output
        assert same_computation(output) < 1e-4, "both sides train the same SplitFlux"


def same_computation(output: str) -> float:
    """The relative loss difference a SplitFlux benchmark prints (pack against reference, step by step)."""
    (line,) = [line for line in output.splitlines() if line.startswith("the same computation:")]
    return float(line.split("at most ")[1].split()[0])


def test_the_narrow_flux_is_flux1_with_every_block_narrower(host):
    """What the SplitFlux CPU benchmark runs: ComfyUI's FLUX.1-dev transformer module for module,
    every weight's widths divided by 16 (the rope's per-axis split aside, which has no weights)."""
    import comfy.model_base

    from devkit import tiny_flux

    def transformer(config):
        return comfy.model_base.Flux(tiny_flux.flux_model_config(config), device="meta").diffusion_model

    full, narrow = transformer(tiny_flux.FLUX1_DEV_CONFIG), transformer(tiny_flux.NARROW_FLUX_CONFIG)
    assert [(n, type(m)) for n, m in full.named_modules()] == [(n, type(m)) for n, m in narrow.named_modules()]
    full_shapes, narrow_shapes = full.state_dict(), narrow.state_dict()
    assert list(full_shapes) == list(narrow_shapes) and len(full.single_blocks) == 38 and len(full.double_blocks) == 19
    for name, weight in full_shapes.items():
        ratios = {a // b for a, b in zip(weight.shape, narrow_shapes[name].shape) if a != b}
        fixed = {"img_in", "final_layer.linear"}  # the latent's 64 channels in and out stay
        assert ratios <= {16, 8} if name.startswith(tuple(fixed)) else ratios <= {16}, (name, weight.shape)
    assert tiny_flux.NARROW_FLUX_CONFIG["num_heads"] == tiny_flux.FLUX1_DEV_CONFIG["num_heads"]


def test_gpu_benchmark_smoke_run_measures_every_side(host, tmp_path):
    from bench import gpu_train_step

    results_file = tmp_path / "results.json"
    output = run_bench("gpu_train_step.py", "--size", "tiny", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json", str(results_file))
    expected = [n for n in [*gpu_train_step.REFERENCE_VARIANTS, *gpu_train_step.PACK_VARIANTS] if n != "pack-compiled"]
    results = json.loads(results_file.read_text())["results"]
    assert list(results) == expected
    for name, result in results.items():
        assert math.isfinite(result["ms"]) and result["ms"] > 0, name
        assert f"| {name} |" in output


def test_gpu_benchmark_flux_smoke_run_measures_every_side(host, tmp_path):
    """``--model flux`` (SplitFlux, pack against the equations on diffusers' FLUX) on the tiny FLUX."""
    from bench import splitflux_sides

    results_file = tmp_path / "results.json"
    output = run_bench("gpu_train_step.py", "--model", "flux", "--size", "tiny", "--steps", "1", "--warmup", "1",
                       "--rounds", "1", "--json", str(results_file))
    recorded = json.loads(results_file.read_text())
    assert recorded["model"] == "flux" and list(recorded["results"]) == list(splitflux_sides.SIDES)
    for name, result in recorded["results"].items():
        assert math.isfinite(result["ms"]) and result["ms"] > 0, name
        assert f"| {name} |" in output
    assert same_computation(output) < 1e-4, "pack, pack-8gb and the reference train the same SplitFlux"


@pytest.mark.parametrize("arguments", [["--only", "pack,nonsense"], ["--model", "flux", "--only", "pack,pack-bf16"]])
def test_gpu_benchmark_refuses_unknown_sides(arguments):
    from bench import gpu_train_step

    with pytest.raises(SystemExit):
        gpu_train_step.main(["--size", "tiny", *arguments])


def test_gpu_benchmark_variants_restore_what_they_change(host):
    """An ablation must not leak into the sides measured after it."""
    import comfy.ldm.modules.attention as attention
    from bench import gpu_train_step

    trainer = host.pack("training.trainer")
    chosen_attention, make_optimizer = attention.optimized_attention, trainer.make_optimizer
    parameter = torch.nn.Parameter(torch.zeros(2))
    config = trainer.TrainConfig(steps=1, learning_rate=1e-3)
    with gpu_train_step.attention_function("basic"), gpu_train_step.adam_fused(trainer, False):
        assert attention.optimized_attention is attention.attention_basic
        optimizer = trainer.make_optimizer([{"params": [parameter]}], config, torch.device("cuda"))
        assert not optimizer.defaults["fused"]
    assert attention.optimized_attention is chosen_attention and trainer.make_optimizer is make_optimizer


def test_memory_estimate_gives_every_method_and_setting_and_the_registry_follows_it(host, tmp_path):
    """The full-size SDXL UNet on the meta device: one record per trained method and setting, the
    goals met, and each method's ``memory_peak_gib`` in the registry (what ``auto`` decides with)
    equal to the estimate for that method, not borrowed from another."""
    memory = host.pack("training.memory")
    methods = host.pack("methods")
    trained = {m.key: m for m in methods.METHODS if m.recipe is not None}
    output = run_bench("memory_estimate.py", "--json", str(tmp_path / "memory.json"))
    assert "b-lora (160 layers)" in output and "MISSED" not in output
    records = json.loads((tmp_path / "memory.json").read_text())
    assert {(r["method"], r["memory"]) for r in records} == {(k, s) for k in trained for s in memory.RESOLVED}
    for record in records:
        assert record["resolution"] == 1024 and record["resident_weights_gib"] > 4.5
        peak = trained[record["method"]].memory_peak_gib[record["memory"]]
        assert record["peak_gib"] == pytest.approx(peak, abs=0.01)
        assert record["peak_gib"] > record["resident_weights_gib"] + record["saved_for_backward_gib"]


def test_flux_fastest_recomputes_the_fewest_single_blocks_that_meet_its_goal(host):
    """SplitFlux's ``fastest`` on FLUX.1-dev at 1024 px on a card that cannot keep everything: with
    the registry's ``fastest_recomputes`` the peak meets the goal, with one fewer it does not (so no
    more is recomputed than needed); keeping all needs the registry's ``keep_all_peak_gib``."""
    from bench import memory_estimate

    import comfy.ldm.flux.math as flux_math

    method = host.pack("methods").by_key("splitflux")
    goal = memory_estimate.GOALS_GIB[("splitflux", "fastest")]
    attention = flux_math.optimized_attention
    peak = memory_estimate.estimate_flux(host, "splitflux", "fastest")
    fewer = memory_estimate.estimate_flux(host, "splitflux", None, recomputed_layers=method.fastest_recomputes - 1)
    keep_all = memory_estimate.estimate_flux(host, "splitflux", None, recomputed_layers=0)
    assert peak["recomputed_layers"] == method.fastest_recomputes > 0
    assert peak["peak_gib"] <= goal < fewer["peak_gib"]
    assert keep_all["peak_gib"] == pytest.approx(method.keep_all_peak_gib, abs=0.01)
    assert peak["peak_gib"] + host.pack("training.memory").MARGIN_GIB <= 23.0, "auto picks it on a 24 GB card"
    assert flux_math.optimized_attention is attention, "the count's stand-in for fused attention is taken off"


def test_saved_bytes_on_the_meta_device_equal_those_of_a_real_run():
    """The estimate counts on the meta device; a real run of the same module saves as much."""
    from bench import memory_estimate

    def block(device):
        torch.manual_seed(0)
        layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                     torch.nn.Linear(32, 8)).to(device)
        layers[0].requires_grad_(False)  # frozen first layer: nothing saved for its weight gradient
        x = torch.randn(4, 16, device=device)
        return lambda: layers(x).pow(2).mean()

    meta = memory_estimate.saved_for_backward(block("meta"))
    real = memory_estimate.saved_for_backward(block("cpu"))
    assert meta == real > 0


class CreatedStorages(TorchDispatchMode):
    """Every storage an op allocates while the mode is on (a real run's allocations, seen below
    autograd; a view or an in-place result shares an input's storage and is not one), so that
    afterwards ``live_bytes`` tells how many of those bytes are still held."""

    def __init__(self):
        super().__init__()
        self.created: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                storage = tensor.untyped_storage()
                self.created[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self) -> int:
        gc.collect()
        return sum(nbytes for ref, nbytes in self.created.values() if not ref.expired())


def storages_alive() -> set[int]:
    gc.collect()
    return {o.untyped_storage()._cdata for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


@pytest.mark.parametrize("trainer", ["b-lora", "unziplora"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["fastest", "8 GB"])
def test_the_count_of_what_a_forward_holds_equals_what_a_real_run_keeps_alive(host, trainer, checkpointed):
    """The estimate's count (saved tensors, the inputs checkpointed layers keep, weights not
    counted twice) on the tiny SDXL UNet on the CPU, against a real run of the same forward with
    the pack's real gradient checkpointing: the bytes its ops allocated that are still alive
    when backward is about to start. Then backward runs, so the graph was a real one."""
    from bench import memory_estimate
    from devkit import tiny_models

    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    model = tiny_models.build_tiny_sdxl()
    unet = model.model.diffusion_model.requires_grad_(False)
    trainable, trained = memory_estimate.build_trainer(host, trainer, unet, tiny_models.CONTEXT_DIM, torch.device("cpu"))
    latent, timestep, context, pooled = tiny_models.sample_inputs(size=16)
    y = model.model.encode_adm(pooled_output=pooled, width=128, height=128, crop_w=0, crop_h=0,
                               target_width=128, target_height=128)

    def forward():
        prediction = unet(latent, timesteps=timestep, context=context, y=y)
        return torch.nn.functional.mse_loss(prediction, latent)

    layers = gradient_checkpointing.backward_path_layers(unet, trained) if checkpointed else []
    assert_count_equals_real_run(host, forward, layers, memory_estimate.parameter_storages(unet, trainable),
                                 trainable)


@pytest.mark.parametrize("recomputed", [0, 26, None], ids=["none", "fastest", "8 GB"])
def test_the_flux_count_of_what_a_forward_holds_equals_what_a_real_run_keeps_alive(host, recomputed):
    """The same check for SplitFlux on the tiny FLUX (the paper's 19 + 38 blocks), with none, the
    first 26 (what ``fastest`` recomputes on FLUX.1) and all of the backward path recomputed."""
    from bench import memory_estimate
    from devkit import tiny_flux

    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    flux_training = host.pack("host.flux_training")
    model = tiny_flux.build_tiny_flux()
    transformer = model.model.diffusion_model.requires_grad_(False)
    trainable, trained = memory_estimate.build_splitflux(host, transformer, tiny_flux.HIDDEN_SIZE,
                                                         tiny_flux.TEXT_TOKENS, torch.device("cpu"))
    latent, sigma, context, pooled, guidance = tiny_flux.sample_inputs(size=16)

    def forward():
        prediction = transformer(latent, sigma, context=context, y=pooled, guidance=guidance)
        return torch.nn.functional.mse_loss(prediction, latent)

    layers = gradient_checkpointing.backward_path_layers(transformer, trained)[:recomputed]
    assert len(layers) == {0: 0, 26: 26, None: 39}[recomputed]
    with flux_training.in_training_flag():
        assert_count_equals_real_run(host, forward, layers, memory_estimate.parameter_storages(transformer, trainable),
                                     trainable)


def assert_count_equals_real_run(host, forward, layers, parameters: set[int], trainable):
    """The estimate's count of what ``forward`` leaves for backward, with ``layers`` checkpointed,
    equals the bytes a real run's ops allocated that are alive when backward is about to start;
    then backward runs (a real graph), and a real recomputation of each checkpointed layer holds
    at most what the count says of the largest."""
    from bench import memory_estimate

    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    pre_existing = storages_alive()  # weights, LoRA, inputs, prompt embeddings: none is the forward's
    assert parameters <= pre_existing
    counted = memory_estimate.held_for_backward(host, forward, layers, pre_existing)

    tracker = CreatedStorages()
    with gradient_checkpointing.checkpointed(layers):
        with tracker:
            loss = forward()
        kept = tracker.live_bytes() - loss.untyped_storage().nbytes()
        loss.backward()
    assert counted["held"] == kept > 0
    assert all(p.grad is not None for p in trainable.parameters())
    if layers:
        assert counted["largest_layer"] == max(recomputation_holds(host, layer_inputs(layers, forward))) > 0


def layer_inputs(layers, forward) -> list[tuple[torch.nn.Module, tuple, dict]]:
    """Each layer with the inputs a real (unchecked) forward gives it."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda layer, args, kwargs: calls.append((layer, args, kwargs)),
                                             with_kwargs=True) for layer in layers]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def recomputation_holds(host, calls) -> list[int]:
    """What each layer's ops keep for backward when it runs again with grad (its recomputation,
    as checkpointing runs it): the bytes it allocates that are still alive after it returns,
    less its output (when the layer allocated it: a layer that adds to its input returns it)."""
    checkpointed_function = host.pack("training.gradient_checkpointing").checkpointed_function
    held = []
    for layer, args, kwargs in calls:
        tracker = CreatedStorages()
        with tracker:
            out = checkpointed_function(layer, layer.forward)(*args, **kwargs)
        output = out.untyped_storage()._cdata
        held.append(tracker.live_bytes() - (out.untyped_storage().nbytes() if output in tracker.created else 0))
        del out
    return held


def test_meta_autocast_casts_like_fp16_autocast():
    from bench import memory_estimate

    with memory_estimate.MetaAutocast():
        product = torch.nn.functional.linear(torch.empty(2, 4, device="meta"), torch.empty(3, 4, device="meta"))
        normed = torch.nn.functional.layer_norm(product, (3,))
    assert product.dtype == torch.float16 and normed.dtype == torch.float32
