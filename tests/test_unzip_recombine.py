"""UnZipLoRA recombination as the official inference runs it (``infer.py --with_unziplora``):
with three different prompts (combined, content, style), every UNet call of the host's KSampler
(CFG 5) through UnZip Column Mask Merge equals the official processor ported onto the diffusers
twin, for a LoRA pair of one image and across images; Train UnZipLoRA's MODEL output is the
same recombination with its training prompts; without separate prompts the plain merge stays."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_namings
from devkit import sampling_calls, tiny_models
from devkit.unziplora_inference_reference import UnZipInferenceReference, streams

MERGE = "UnZipColumnMaskMerge"
PROMPTS = {"combined": 20, "content": 21, "style": 22, "negative": 23}


def official_run(folder, name, unet_weights, seed):
    """What the official train_unziplora.py writes for one image (masks baked into B, mergers in
    [0, 1] in their own .pth files). Returns ``{role: (layers, mergers)}`` by ldm path."""
    shapes = lora_namings.b_lora_shapes(unet_weights, blocks=None)
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for index, role in enumerate(("content", "style")):
        layers = lora_namings.random_layers(shapes, rank=4, seed=seed + index)
        masked = {}
        for path, (down, up, alpha) in layers.items():
            mask = (torch.rand(up.shape[0], generator=generator) < 0.5).float()
            masked[path] = (down, up * mask[:, None], alpha)
        (folder / f"{name}_{role}").mkdir()
        save_file(lora_namings.write_naming(masked, "official_double_unet"),
                  str(folder / f"{name}_{role}" / "pytorch_lora_weights.safetensors"))
        mergers = {p: torch.rand(up.shape[0], generator=generator) for p, (_, up, _) in masked.items()}
        torch.save({f"unet.{lora_namings.diffusers_name(p)}.lora.merge_{role}": m for p, m in mergers.items()},
                   str(folder / f"{name}_merger_{role}.pth"))
        written[role] = (masked, mergers)
    return written


@pytest.fixture
def two_runs(tiny_sdxl, loras_dir):
    weights = tiny_models.unet_weights(tiny_sdxl)
    return {"a": official_run(loras_dir, "a", weights, seed=1), "b": official_run(loras_dir, "b", weights, seed=5)}


def merge(host, model, content_run: str, style_run: str, separated: bool = True, **overrides):
    prompts = {"content_positive": sampling_calls.conditioning(PROMPTS["content"]),
               "style_positive": sampling_calls.conditioning(PROMPTS["style"])} if separated else {}
    prompts.update(overrides)
    return host.run_node(MERGE, model, f"{content_run}_content/pytorch_lora_weights.safetensors",
                         f"{style_run}_style/pytorch_lora_weights.safetensors", 1.0, 1.0,
                         f"{content_run}_merger_content.pth", f"{style_run}_merger_style.pth", **prompts).result[0]


def sample(host, model, steps=3, negative=None):
    return sampling_calls.sample_and_record(host, model, sampling_calls.conditioning(PROMPTS["combined"]),
                                            negative or sampling_calls.conditioning(PROMPTS["negative"]),
                                            steps=steps, cfg=5.0)


def reference_for(tiny_sdxl, content, style):
    """The official processor on the diffusers twin, for ``content`` / ``style`` = (layers, mergers)."""
    def by_name(pair):
        layers, mergers = pair
        return ({lora_namings.diffusers_name(p): (d, u) for p, (d, u, _) in layers.items()},
                {lora_namings.diffusers_name(p): m for p, m in mergers.items()})

    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    (content_layers, content_mergers), (style_layers, style_mergers) = by_name(content), by_name(style)
    UnZipInferenceReference(unet, content_layers, style_layers, content_mergers, style_mergers)
    return unet


def official_output(unet, call):
    prompt = {role: sampling_calls.conditioning(PROMPTS[role])[0][0] for role in ("content", "style")}
    batch = call.x.shape[0]
    return sampling_calls.diffusers_output(unet, call, cross_attention_kwargs={
        "encoder_hidden_states_content": streams(call.chunks, prompt["content"], batch),
        "encoder_hidden_states_style": streams(call.chunks, prompt["style"], batch)})


@pytest.mark.parametrize("pair", [("a", "a"), ("a", "b")], ids=["own image", "cross-image"])
def test_separated_prompts_equal_the_official_processor(host, tiny_sdxl, two_runs, pair):
    content_run, style_run = pair
    before = tiny_models.unet_weights(tiny_sdxl)
    recombined = merge(host, tiny_sdxl, content_run, style_run)
    calls = sample(host, recombined)
    assert len(calls) == 3 and all(sorted(c.chunks) == [0, 1] for c in calls), "cond and uncond batched"
    unet = reference_for(tiny_sdxl, two_runs[content_run]["content"], two_runs[style_run]["style"])
    plain_calls = sample(host, merge(host, tiny_sdxl, content_run, style_run, separated=False))
    for call, plain in zip(calls, plain_calls):
        official = official_output(unet, call)
        error = sampling_calls.relative_error(call.output, official)
        assert error < 2e-4, error
        gap = sampling_calls.relative_error(plain.output, official)
        assert gap > 100 * error, f"the plain merge is off by {gap:.1e} (the separated one by {error:.1e})"
    print(f"\n{pair}: separated vs official {error:.1e}; plain weight merge vs official {gap:.1e}")
    assert all(torch.equal(v, before[k]) for k, v in tiny_models.unet_weights(tiny_sdxl).items())
    assert not tiny_sdxl.object_patches and not tiny_sdxl.patches


def test_with_three_equal_prompts_and_a_zero_negative_the_plain_merge_is_the_same(host, tiny_sdxl, two_runs):
    combined = sampling_calls.conditioning(PROMPTS["combined"])
    zero = [[torch.zeros_like(combined[0][0]), {**combined[0][1], "pooled_output": torch.zeros(1, 1280)}]]
    separated = merge(host, tiny_sdxl, "a", "b", content_positive=combined, style_positive=combined)
    plain = merge(host, tiny_sdxl, "a", "b", separated=False)
    for ours, theirs in zip(sample(host, separated, negative=zero), sample(host, plain, negative=zero)):
        assert sampling_calls.relative_error(ours.output, theirs.output) < 1e-5


def test_only_cross_attention_keys_and_values_are_separated(host, tiny_sdxl, two_runs):
    recombined = merge(host, tiny_sdxl, "a", "b")
    separated = {n.removeprefix("diffusion_model.").removesuffix(".forward") for n in recombined.object_patches}
    shapes = lora_namings.b_lora_shapes(tiny_models.unet_weights(tiny_sdxl), blocks=None)
    assert separated == {p for p in shapes if p.endswith(("attn2.to_k", "attn2.to_v"))}
    weights = tiny_models.patched_unet_weights(recombined)
    before = tiny_models.unet_weights(tiny_sdxl)
    for path in shapes:
        expected = before[path + ".weight"].double()
        if path not in separated:
            for role, run in (("content", "a"), ("style", "b")):
                layers, mergers = two_runs[run][role]
                expected = expected + mergers[path].double()[:, None] * lora_namings.expected_delta(*layers[path])
        torch.testing.assert_close(weights[path + ".weight"].double(), expected, rtol=1e-5, atol=1e-6)


def test_a_prompt_longer_than_the_sampled_one_is_refused(host, tiny_sdxl, two_runs):
    recombined = merge(host, tiny_sdxl, "a", "b", content_positive=sampling_calls.conditioning(30, tokens=154))
    with pytest.raises(ValueError, match="content prompt is 154 tokens long but the sampled prompt 77"):
        sample(host, recombined, steps=1)
    with pytest.raises(ValueError, match="content_positive conditioning must be one prompt"):
        merge(host, tiny_sdxl, "a", "b", content_positive=sampling_calls.conditioning(31) * 2)


def test_the_train_nodes_model_is_the_separated_recombination_of_its_files(host, loaded_sdxl, loras_dir):
    latents, positive = tiny_models.image_and_prompt(0)
    content_prompt, style_prompt = (sampling_calls.conditioning(PROMPTS[r]) for r in ("content", "style"))
    output = host.run_node("UnZipLoRATrain", loaded_sdxl, latents, positive, content_prompt, style_prompt, 4, 1e-3,
                           1e-3, 5e-3, 4, 2, 0.25, 0, "uz/cat", "fp32", cone_threshold=1e-3)
    trained, content_name, style_name = output.result[:3]
    from_files = host.run_node(MERGE, loaded_sdxl, content_name, style_name, 1.0, 1.0, "none", "none",
                               content_positive=content_prompt, style_positive=style_prompt).result[0]
    plain = host.run_node(MERGE, loaded_sdxl, content_name, style_name, 1.0, 1.0, "none", "none").result[0]
    assert trained.object_patches.keys() == from_files.object_patches.keys() and trained.object_patches
    for ours, files, flat in zip(sample(host, trained), sample(host, from_files), sample(host, plain)):
        assert sampling_calls.relative_error(ours.output, files.output) < 1e-5
        assert sampling_calls.relative_error(flat.output, files.output) > 1e-4
