"""The benchmark scripts keep working between the sessions that run them for real: each runs
here for a step or two, as a user runs it (a fresh process on the ComfyUI checkout the tests
found). The GPU benchmark runs its ``--size tiny`` smoke mode, on the CPU when there is no GPU.
Timings are not checked: speed is measured by these scripts, not by tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

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
])
def test_cpu_benchmarks_print_their_ratio(host, script, arguments):
    output = run_bench(script, *arguments)
    assert "ratio pack/reference:" in output and "machine:" in output


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


def test_gpu_benchmark_refuses_unknown_sides():
    from bench import gpu_train_step

    with pytest.raises(SystemExit):
        gpu_train_step.main(["--size", "tiny", "--only", "pack,nonsense"])


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


def test_memory_estimate_gives_every_trainer_and_setting_and_the_table_follows_it(host, tmp_path):
    """The full-size SDXL UNet on the meta device: one record per trainer and setting, the goals
    met, and ``training.memory.PEAK_GIB`` (what ``auto`` decides with) equal to the estimate."""
    memory = host.pack("training.memory")
    output = run_bench("memory_estimate.py", "--json", str(tmp_path / "memory.json"))
    assert "b-lora (160 layers)" in output and "MISSED" not in output
    records = json.loads((tmp_path / "memory.json").read_text())
    assert {(r["trainer"], r["memory"]) for r in records} == {(t, s) for t in memory.PEAK_GIB for s in memory.CHECKPOINTED}
    for record in records:
        assert record["resolution"] == 1024 and record["resident_weights_gib"] > 4.5
        assert record["peak_gib"] == pytest.approx(memory.PEAK_GIB[record["trainer"]][record["memory"]], abs=0.01)
        assert record["peak_gib"] > record["resident_weights_gib"] + record["saved_for_backward_gib"]


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


def test_meta_autocast_casts_like_fp16_autocast():
    from bench import memory_estimate

    with memory_estimate.MetaAutocast():
        product = torch.nn.functional.linear(torch.empty(2, 4, device="meta"), torch.empty(3, 4, device="meta"))
        normed = torch.nn.functional.layer_norm(product, (3,))
    assert product.dtype == torch.float16 and normed.dtype == torch.float32
