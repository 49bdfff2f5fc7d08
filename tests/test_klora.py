"""K-LoRA Fuse: the schedule's arithmetic (no host), and on the real host the host's KSampler
(CFG 5, cond and uncond batched) through the node compared call by call with K-LoRA written
from the official code's equations on the diffusers twin; plain patches where only one file
is involved; clear errors; the command line's ``stylize --fuse k-lora``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import lora_namings
from blora_pack.core import klora
from blora_pack.core.step_lora import SamplingCall
from devkit import host as host_harness
from devkit import sampling_calls, tiny_models
from devkit.klora_reference import KLoRAReference

FUSE = "KLoRAFuse"
CONTENT_RANK, CONTENT_ALPHA, STYLE_RANK = 4, 8.0, 2


# --- the schedule, host-free ------------------------------------------------------------------

def run_schedule(schedule: str, layers: int, steps: int, chunks_per_step=((0, 1),)):
    """The K-LoRA times (t, T) of a simulated run: ``layers`` layer calls per model call."""
    listener = klora.KLoRASchedule(klora.KLoRASettings(schedule=schedule), layers)
    listener.begin_run()
    times = []
    for step in range(steps):
        for chunks in chunks_per_step:
            listener.begin_call(SamplingCall(sigma=1.0, step=step, steps=steps, chunks=chunks))
            times += [listener.time() for _ in range(layers)]
    return times


def choices(times, constants=(1.0, 0.9)):
    settings = klora.KLoRASettings()
    return [klora.prefers_content(*constants, klora.scale_at(t, total, settings.alpha, settings.effective_beta, "s*"))
            for t, total in times]


def test_official_and_normalized_agree_at_50_batched_steps_on_sdxl():
    assert klora.OFFICIAL_SUM_TIMESTEPS == 560 * 50
    official, normalized = run_schedule("official", 560, 50), run_schedule("normalized", 560, 50)
    assert official == normalized and official[0] == (1, 28000) and official[-1] == (28000, 28000)
    assert 0 < sum(choices(official)) < len(official), "both are chosen over the run"


def test_normalized_spans_any_number_of_steps_and_unbatched_cfg():
    times = run_schedule("normalized", 136, 12, chunks_per_step=((0,), (1,)))
    cond, uncond = times[0::2 * 136], times[136::2 * 136]
    assert cond == uncond, "cond and uncond calls of a step see the same t"
    assert times[-1] == (12 * 136, 12 * 136)
    fractions = [(t % total) / total for t, total in times]
    assert min(fractions) == 0.0 and max(fractions) > 0.99
    official = run_schedule("official", 136, 12, chunks_per_step=((0,), (1,)))
    assert official[-1] == (2 * 12 * 136, 28000), "the official counter advances at every call"


def test_the_official_formulas():
    assert klora.default_beta("s*", 1.5) == pytest.approx(1.275) and klora.default_beta("s", 1.5) == 0.5
    assert klora.scale_at(14000, 28000, 1.5, 1.275, "s") == pytest.approx(2.025)
    assert klora.scale_at(14000, 28000, 1.5, 1.275, "s*") == pytest.approx(0.525)
    assert klora.balance([1.0, 1.2, 0.8, 10.0]) == pytest.approx(1.0), "ratios >= 3x the mean are dropped"
    assert klora.balance([1.0, 2.0]) == pytest.approx(1.5)
    assert klora.top_k_sum(torch.tensor([[1.0, -5.0], [3.0, 0.5]]), 2) == 8.0
    assert klora.top_k_sum(torch.ones(2, 2), 100) == 4.0, "k is capped at the number of entries"
    assert klora.prefers_content(2.0, 1.0, 1.5) and not klora.prefers_content(1.0, 1.0, 1.5)
    assert klora.prefers_content(1.0, 1.0, 0.0), "S = 0: content (x / 0 = inf)"
    with pytest.raises(ValueError, match="Unknown K-LoRA pattern"):
        klora.KLoRASettings(pattern="x")


# --- on the host ------------------------------------------------------------------------------

def spread_layers(shapes, rank, alpha, seed):
    """Random LoRA layers whose per-layer size varies (so the choice differs between layers)."""
    layers = lora_namings.random_layers(shapes, rank=rank, alpha=alpha, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    return {path: (down, up * math.exp(0.8 * float(torch.randn(1, generator=generator))), a)
            for path, (down, up, a) in layers.items()}


@pytest.fixture
def klora_files(tiny_sdxl, loras_dir):
    """A content LoRA (kohya naming, rank 4, alpha 8: scale 2) and a style LoRA (official diffusers
    naming, rank 2, no alpha) on every attention projection of the tiny UNet."""
    shapes = lora_namings.b_lora_shapes(tiny_sdxl.model.diffusion_model.state_dict(), blocks=None)
    content = spread_layers(shapes, CONTENT_RANK, CONTENT_ALPHA, seed=1)
    style = spread_layers(shapes, STYLE_RANK, None, seed=2)
    save_file(lora_namings.write_naming(content, "kohya_diffusers"), str(loras_dir / "content.safetensors"))
    save_file(lora_namings.write_naming(style, "official"), str(loras_dir / "style.safetensors"))
    return content, style


def reference_layers(layers):
    return {lora_namings.diffusers_name(path): (down, up, 1.0 if alpha is None else alpha / down.shape[0])
            for path, (down, up, alpha) in layers.items()}


def klora_layers_of(host, model):
    layer_class = host.pack("core.klora").KLoRALayer  # the host's copy of the pack, not blora_pack's
    return [p for p in model.object_patches.values() if isinstance(p, layer_class)]


@pytest.mark.parametrize("schedule", ["official", "normalized"])
def test_sampling_equals_the_official_equations_call_by_call(host, tiny_sdxl, klora_files, schedule):
    """50 steps of the host's KSampler at CFG 5: every UNet call equals the reference's, with
    identical layer choices. ``official``: t counts layer calls, T = 28000. ``normalized`` at 50
    steps is the same as the official counting with the official T for this UNet (its layers
    x 50 steps, as 28000 = 560 x 50 is for SDXL)."""
    content, style = klora_files
    host_klora = host.pack("core.klora")
    fused = host.run_node(FUSE, tiny_sdxl, "content.safetensors", "style.safetensors", schedule=schedule).result[0]
    layers = klora_layers_of(host, fused)
    assert len(layers) == len(content) == 136 and len({id(l.schedule) for l in layers}) == 1
    calls = sampling_calls.sample_and_record(host, fused, sampling_calls.conditioning(10),
                                             sampling_calls.conditioning(11), steps=50, cfg=5.0)
    assert len(calls) == 50 and all(sorted(c.chunks) == [0, 1] for c in calls), "cond and uncond batched"

    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    sum_timesteps = host_klora.OFFICIAL_SUM_TIMESTEPS if schedule == "official" else 50 * len(content)
    reference = KLoRAReference(unet, reference_layers(content), reference_layers(style), alpha=1.5,
                               beta=0.85 * 1.5, sum_timesteps=sum_timesteps, pattern="s*")
    worst = 0.0
    for call in calls:
        worst = max(worst, sampling_calls.relative_error(call.output, sampling_calls.diffusers_output(unet, call)))
    ours = layers[0].schedule.choices
    assert len(ours) == len(reference.choices) == 50 * 136
    assert ours == reference.choices, "identical layer choices"
    share = sum(ours) / len(ours)
    print(f"\n{schedule}: content chosen in {100 * share:.1f}% of {len(ours)} layer calls, style in "
          f"{100 * (1 - share):.1f}%; worst relative difference {worst:.1e}")
    assert 0.05 < share < 0.95, "both LoRAs are chosen"
    assert worst < 2e-4


def test_strengths_scale_the_chosen_delta_and_the_input_model_is_unchanged(host, tiny_sdxl, klora_files):
    content, style = klora_files
    before = tiny_models.unet_weights(tiny_sdxl)
    fused = host.run_node(FUSE, tiny_sdxl, "content.safetensors", "style.safetensors", pattern="s", alpha=2.0,
                          beta=0.3, content_strength=0.6, style_strength=1.4).result[0]
    calls = sampling_calls.sample_and_record(host, fused, sampling_calls.conditioning(12),
                                             sampling_calls.conditioning(13), steps=4, cfg=3.0, sampler="dpmpp_2m",
                                             scheduler="karras")
    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    reference = KLoRAReference(unet, reference_layers(content), reference_layers(style), alpha=2.0, beta=0.3,
                               sum_timesteps=4 * 136, pattern="s", strengths=(0.6, 1.4))
    for call in calls:
        assert sampling_calls.relative_error(call.output, sampling_calls.diffusers_output(unet, call)) < 2e-4
    assert klora_layers_of(host, fused)[0].schedule.choices == reference.choices
    assert all(torch.equal(v, before[k]) for k, v in tiny_models.unet_weights(tiny_sdxl).items())
    assert not tiny_sdxl.object_patches and not tiny_sdxl.patches


def test_layers_one_file_changes_get_that_files_delta(host, tiny_sdxl, loras_dir):
    """Content: every attention projection and one feed-forward layer; style: all but the middle
    block's, and the same feed-forward layer. The middle block gets the content delta, the
    feed-forward layer both (plain patches); the rest switches."""
    weights = tiny_sdxl.model.diffusion_model.state_dict()
    shapes = lora_namings.b_lora_shapes(weights, blocks=None)
    ff = "output_blocks.0.1.transformer_blocks.0.ff.net.2"
    content = lora_namings.random_layers({**shapes, ff: tuple(weights[ff + ".weight"].shape)}, rank=4, seed=3)
    style = lora_namings.random_layers({p: s for p, s in shapes.items() if not p.startswith("middle_block.")}
                                       | {ff: tuple(weights[ff + ".weight"].shape)}, rank=4, alpha=2.0, seed=4)
    save_file(lora_namings.write_naming(content, "comfyui"), str(loras_dir / "c.safetensors"))
    save_file(lora_namings.write_naming(style, "kohya_ldm"), str(loras_dir / "s.safetensors"))
    before = tiny_models.unet_weights(tiny_sdxl)
    fused = host.run_node(FUSE, tiny_sdxl, "c.safetensors", "s.safetensors", content_strength=0.5).result[0]
    switched = {name.removeprefix("diffusion_model.").removesuffix(".forward") for name in fused.object_patches}
    assert switched == {p for p in shapes if not p.startswith("middle_block.")}
    patched = tiny_models.patched_unet_weights(fused)
    for key, w0 in before.items():
        path = key.removesuffix(".weight")
        expected = w0.double()
        if path == ff:
            expected = expected + 0.5 * lora_namings.expected_delta(*content[ff]) + lora_namings.expected_delta(*style[ff])
        elif path.startswith("middle_block.") and path in content:
            expected = expected + 0.5 * lora_namings.expected_delta(*content[path])
        else:
            assert torch.equal(patched[key], w0), key
            continue
        torch.testing.assert_close(patched[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_lora_loaded_before_still_applies_and_rebuilding_while_loaded_changes_nothing(host, tiny_sdxl, klora_files,
                                                                                        loras_dir):
    """The K-LoRA layers replace only each layer's forward: a LoRA another node put on the same
    layers stays in the weights; a second K-LoRA Fuse made while the first is loaded wraps the
    layers' own forwards, not the first one's."""
    shapes = lora_namings.b_lora_shapes(tiny_sdxl.model.diffusion_model.state_dict())
    save_file(lora_namings.write_naming(lora_namings.random_layers(shapes, rank=4, seed=9), "official"),
              str(loras_dir / "b.safetensors"))
    with_b = host.run_node("BLoRALoadContentLoRA", tiny_sdxl, "b.safetensors", 1.0).result[0]
    expected = tiny_models.patched_unet_weights(with_b)
    fused = host.run_node(FUSE, with_b, "content.safetensors", "style.safetensors").result[0]
    patched = tiny_models.patched_unet_weights(fused)
    assert all(torch.equal(patched[k], v) for k, v in expected.items()), "the earlier LoRA's patches apply"

    import comfy.model_management

    positive, negative = sampling_calls.conditioning(14), sampling_calls.conditioning(15)
    first = host.run_node(FUSE, tiny_sdxl, "content.safetensors", "style.safetensors").result[0]
    comfy.model_management.load_models_gpu([first])  # stays loaded while the next one is made
    second = host.run_node(FUSE, tiny_sdxl, "content.safetensors", "style.safetensors").result[0]
    outputs = [[c.output for c in sampling_calls.sample_and_record(host, m, positive, negative, steps=3)]
               for m in (first, second)]
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(not isinstance(p.base, host.pack("core.klora").KLoRALayer) for p in klora_layers_of(host, second))


def test_clear_errors(host, tiny_sdxl, loras_dir, klora_files):
    shapes = lora_namings.b_lora_shapes(tiny_sdxl.model.diffusion_model.state_dict())
    content_block = {p: s for p, s in shapes.items() if p.startswith("output_blocks.0.1.")}
    style_block = {p: s for p, s in shapes.items() if p.startswith("output_blocks.1.1.")}
    save_file(lora_namings.write_naming(lora_namings.random_layers(content_block), "official"),
              str(loras_dir / "only_content_block.safetensors"))
    save_file(lora_namings.write_naming(lora_namings.random_layers(style_block), "official"),
              str(loras_dir / "only_style_block.safetensors"))
    with pytest.raises(ValueError, match="change no attention projection in common"):
        host.run_node(FUSE, tiny_sdxl, "only_content_block.safetensors", "only_style_block.safetensors")

    sd15_shapes = {p: (s[0] * 2, s[1]) for p, s in shapes.items()}
    save_file(lora_namings.write_naming(lora_namings.random_layers(sd15_shapes), "official"),
              str(loras_dir / "other_model.safetensors"))
    with pytest.raises(ValueError, match="trained for a different model"):
        host.run_node(FUSE, tiny_sdxl, "content.safetensors", "other_model.safetensors")

    untrained = {p: (d, torch.zeros_like(u), a) for p, (d, u, a) in klora_files[1].items()}
    save_file(lora_namings.write_naming(untrained, "official"), str(loras_dir / "untrained.safetensors"))
    with pytest.raises(ValueError, match="style LoRA's change at .* is zero"):
        host.run_node(FUSE, tiny_sdxl, "content.safetensors", "untrained.safetensors")

    with pytest.raises(ValueError, match="needs an SDXL model"):
        host.run_node(FUSE, tiny_models.build_tiny_sd15(), "content.safetensors", "style.safetensors")
    with pytest.raises(FileNotFoundError, match="'nope.safetensors' is not in the loras folder"):
        host.node(FUSE).validate_inputs("content.safetensors", "nope.safetensors")


def test_sampling_is_no_slower_than_twice_a_plain_lora(host, tiny_sdxl, klora_files):
    """On the tiny UNet (where per-layer overhead weighs most), best of three runs."""
    plain = host.run_node("UnZipColumnMaskMerge", tiny_sdxl, "content.safetensors", "style.safetensors", 1.0, 1.0,
                          "none", "none").result[0]
    fused = host.run_node(FUSE, tiny_sdxl, "content.safetensors", "style.safetensors").result[0]
    positive, negative = sampling_calls.conditioning(16), sampling_calls.conditioning(17)
    best = {}
    for name, model in (("plain", plain), ("fused", fused)) * 3:
        start = time.perf_counter()
        sampling_calls.sample_and_record(host, model, positive, negative, steps=8)
        best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    print(f"\n8 steps: plain LoRA pair {best['plain']:.3f} s, K-LoRA {best['fused']:.3f} s")
    assert best["fused"] < 2 * best["plain"]


def test_command_line_stylize_fuse_k_lora(host, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    shapes = lora_namings.b_lora_shapes(tiny_models.build_tiny_sdxl().model.diffusion_model.state_dict(), blocks=None)
    for seed, name in enumerate(("cat", "sketch")):
        save_file(lora_namings.write_naming(lora_namings.random_layers(shapes, seed=seed), "official"),
                  str(loras / f"{name}.safetensors"))
    environment = {**os.environ, "COMFYUI_PATH": str(host_harness.COMFYUI_PATH), "BLORA_OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(host_harness.PACK_ROOT / "cli.py"), "stylize", "--tiny", "--fuse",
                             "k-lora", "--content", "cat", "--style", "sketch", "--prompt", "A [c] in [s] style"],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "k-lora" / "stylize_00001_.png").is_file(), result.stdout
    result = subprocess.run([sys.executable, str(host_harness.PACK_ROOT / "cli.py"), "stylize", "--tiny", "--fuse",
                             "k-lora", "--content", "cat", "--text", "A [c] made of gold"],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "--fuse k-lora needs --style" in result.stderr
