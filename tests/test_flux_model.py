"""The tiny FLUX.1 built with ComfyUI's classes, its diffusers twin, and the host facts a FLUX
trainer relies on: the two models agree (fp32) on the same inputs, the host's conditioning path
feeds the model what the twin gets, the single-block replacement hook sees the joint
txt-then-img sequence, and the full-size FLUX.1-dev runs on the meta device."""

from __future__ import annotations

import pytest
import torch

from blora_pack.core import flux_blocks

TOLERANCE = 1e-5  # relative, fp32


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_flux(host):
    from devkit import tiny_flux

    return tiny_flux.build_tiny_flux()


@pytest.fixture(scope="module")
def twin(tiny_flux):
    from devkit import tiny_flux as harness

    return harness.diffusers_flux_from(tiny_flux)


def test_tiny_flux_has_flux1_devs_topology(tiny_flux):
    import comfy.model_base
    import comfy.model_sampling

    model = tiny_flux.model
    assert isinstance(model, comfy.model_base.Flux)
    assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingFlux)
    transformer = model.diffusion_model
    assert len(transformer.double_blocks) == flux_blocks.DOUBLE_BLOCKS
    assert len(transformer.single_blocks) == flux_blocks.SINGLE_BLOCKS
    hidden = transformer.hidden_size
    assert transformer.single_blocks[0].linear1.weight.shape == (3 * hidden + 4 * hidden, hidden)
    assert transformer.params.guidance_embed and transformer.patch_size == 2
    weights = list(transformer.state_dict().values())
    assert 5_000_000 < sum(w.numel() for w in weights) < 6_000_000
    assert all(torch.isfinite(w).all() for w in weights)


def test_the_same_seed_gives_the_same_weights(host, tiny_flux):
    from devkit import tiny_flux as harness

    again, other = harness.build_tiny_flux(seed=0), harness.build_tiny_flux(seed=1)
    mine, theirs, others = (harness.transformer_weights(m) for m in (tiny_flux, again, other))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.equal(mine["single_blocks.0.linear1.weight"], others["single_blocks.0.linear1.weight"])
    norm_scales = [v for k, v in mine.items() if "_norm." in k]
    assert len(norm_scales) == 2 * 2 * flux_blocks.DOUBLE_BLOCKS + 2 * flux_blocks.SINGLE_BLOCKS
    assert all((v - 1).abs().max() < 0.5 for v in norm_scales)  # scales near 1 on both hosts' key names


def test_every_comfy_weight_reaches_the_twin(tiny_flux, twin):
    """Through the host's ``flux_to_diffusers`` map every ComfyUI weight lands in the twin whole:
    ``linear1``'s rows exactly once across to_q, to_k, to_v and proj_mlp."""
    import comfy.utils

    config = tiny_flux.model.model_config.unet_config
    comfy_weights = tiny_flux.model.diffusion_model.state_dict()
    covered = {k: torch.zeros(v.shape[0], dtype=torch.int) for k, v in comfy_weights.items()}
    wanted = set(twin.state_dict())
    for diffusers_key, source in comfy.utils.flux_to_diffusers(config).items():
        if diffusers_key not in wanted:
            continue
        if isinstance(source, str):
            covered[source] += 1
        elif source[1] is None:
            covered[source[0]] += 1
        else:
            dim, offset, size = source[1]
            assert dim == 0
            covered[source[0]][offset:offset + size] += 1
    assert {k for k, rows in covered.items() if not torch.all(rows == 1)} == set()


def test_comfy_model_and_diffusers_twin_agree(tiny_flux, twin):
    """Same weights, same inputs (two samples at different sigmas): the same velocity, fp32."""
    from devkit import tiny_flux as harness

    latent, sigma, context, pooled, guidance = harness.sample_inputs(batch=2, size=8)
    comfy_out = harness.comfy_flux_output(tiny_flux, latent, sigma, context, pooled, guidance)
    with torch.no_grad():
        twin_out = harness.diffusers_flux_output(twin, latent, sigma, context, pooled, guidance)
    assert comfy_out.shape == latent.shape
    assert comfy_out.abs().mean() > 0.1
    assert relative_difference(comfy_out, twin_out) < TOLERANCE
    assert relative_difference(comfy_out[0], comfy_out[1]) > 0.05  # the two samples differ


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_host_conditioning_path_gives_the_twins_denoised(tiny_flux, twin, guidance):
    """A sampler's view: CONDITIONING in FLUX's format (T5 tokens, "pooled_output", "guidance")
    through the host's ``encode_model_conds`` and ``apply_model`` gives x_t - sigma * v, v being
    the twin's velocity for the same text, pooled vector and guidance."""
    from devkit import tiny_flux as harness

    conditioning = harness.tiny_flux_conditioning("a photo of a cat", guidance=guidance)
    context, pooled = conditioning[0][0], conditioning[0][1]["pooled_output"]
    noisy, sigma = harness.sample_inputs(size=8)[:2]
    denoised = harness.comfy_denoised(tiny_flux, noisy, sigma, conditioning)
    with torch.no_grad():
        velocity = harness.diffusers_flux_output(twin, noisy, sigma, context, pooled, torch.tensor([guidance]))
    assert relative_difference(denoised, noisy - sigma * velocity) < TOLERANCE
    other = harness.comfy_denoised(tiny_flux, noisy, sigma, harness.tiny_flux_conditioning("a photo of a cat"))
    assert relative_difference(denoised, other) > 1e-3  # guidance reaches the model


def test_built_under_inference_mode_like_a_checkpoint_loader(host, tiny_flux):
    """Made under inference mode (as the host's loaders run), the weights are inference tensors;
    the model still runs there and gives the same output."""
    from devkit import tiny_flux as harness

    with torch.inference_mode():
        loaded = harness.build_tiny_flux()
    assert all(w.is_inference() for w in loaded.model.diffusion_model.state_dict().values())
    inputs = harness.sample_inputs(size=4, tokens=4)
    with torch.inference_mode():
        out = harness.comfy_flux_output(loaded, *inputs)
    assert torch.equal(out, harness.comfy_flux_output(tiny_flux, *inputs))


def test_single_block_replacement_sees_txt_then_img(tiny_flux):
    """``patches_replace["dit"][("single_block", i)]`` receives the joint sequence, text tokens
    first, and the block's own function; passing through changes nothing. The 0.33 host also says
    where the image tokens are (``img_slice``) and which block runs; 0.3.64 does not."""
    from devkit import tiny_flux as harness

    latent, sigma, context, pooled, guidance = harness.sample_inputs(size=8, tokens=5)
    image_tokens = (8 // 2) * (8 // 2)
    seen = []

    def pass_through(args, extra):
        options = args["transformer_options"]
        seen.append((args["img"].shape, set(args), options.get("img_slice"), options.get("block_index")))
        return extra["original_block"](args)

    patched = tiny_flux.clone()
    for index in flux_blocks.RCA_SINGLE_BLOCKS:
        patched.set_model_patch_replace(pass_through, "dit", "single_block", index)
    out = harness.comfy_flux_output(patched, latent, sigma, context, pooled, guidance)
    assert torch.equal(out, harness.comfy_flux_output(tiny_flux, latent, sigma, context, pooled, guidance))
    assert len(seen) == len(flux_blocks.RCA_SINGLE_BLOCKS)
    for (shape, keys, img_slice, block_index), index in zip(seen, flux_blocks.RCA_SINGLE_BLOCKS):
        assert shape == (1, 5 + image_tokens, harness.HIDDEN_SIZE)
        assert keys == {"img", "vec", "pe", "attn_mask", "transformer_options"}
        assert img_slice in (None, [5, 5 + image_tokens])
        assert block_index in (None, index)
    assert (seen[0][2] is None) == (seen[0][3] is None)  # both or neither, by host version


def test_backward_through_flux_needs_pre_norm_on_a_copy_and_the_training_flag(host, twin, monkeypatch):
    """What a FLUX trainer must do for gradients to flow through the host's model:

    - the single block adds its residual in place (``x += ...``) to the tensor its ``pre_norm``
      saved for backward, so a LoRA on any single block but the last fails in backward; feeding
      ``pre_norm`` a copy fixes it. The double blocks add in place too (``txt +=`` on both
      hosts, ``img +=`` on 0.33), so frozen weights must not ask for gradients: 0.3.64 leaves
      ``requires_grad`` on, 0.33 turns it off;
    - on 0.33 the rope goes through comfy_kitchen's op, which has no backward, unless
      ``comfy.model_management.in_training`` is set (as the host's own trainer does).

    With both, the gradients equal the twin's (rows q, k, v, mlp of ``linear1``)."""
    import comfy.model_management

    from devkit import tiny_flux as harness

    latent, sigma, context, pooled, guidance = harness.sample_inputs(size=4, tokens=4)
    target = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    transformer = harness.build_tiny_flux().model.diffusion_model
    transformer.requires_grad_(False)
    weight = transformer.single_blocks[0].linear1.weight
    weight.requires_grad_(True)
    has_training_flag = hasattr(comfy.model_management, "in_training")
    if has_training_flag:
        monkeypatch.setattr(comfy.model_management, "in_training", True)

    def loss():
        weight.grad = None
        out = transformer(latent, sigma, context=context, y=pooled, guidance=guidance)
        return (out.float() - target).square().mean()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss().backward()
    for block in transformer.single_blocks:
        monkeypatch.setattr(block.pre_norm, "forward", (lambda f: lambda x: f(x.clone()))(block.pre_norm.forward))
    if has_training_flag:
        monkeypatch.setattr(comfy.model_management, "in_training", False)
        with pytest.raises(RuntimeError, match="autograd"):
            loss().backward()
        monkeypatch.setattr(comfy.model_management, "in_training", True)
    loss().backward()
    comfy_grad = weight.grad.clone()

    block = twin.single_transformer_blocks[0]
    layers = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    for layer in layers:
        monkeypatch.setattr(layer.weight, "requires_grad", True)
    out = harness.diffusers_flux_output(twin, latent, sigma, context, pooled, guidance)
    (out - target).square().mean().backward()
    twin_grad = torch.cat([layer.weight.grad for layer in layers])
    for layer in layers:
        layer.weight.grad = None
    assert relative_difference(comfy_grad, twin_grad) < 1e-4


def test_full_size_flux1_dev_runs_on_the_meta_device(host):
    """FLUX.1-dev's full architecture builds on the meta device with the host's classes (no
    weights) and runs a 1024 x 1024 forward (4096 image + 512 text tokens): the basis for a
    memory estimate without the checkpoint."""
    import comfy.model_base

    from devkit import tiny_flux

    meta = torch.device("meta")
    model = comfy.model_base.Flux(tiny_flux.flux_model_config(tiny_flux.FLUX1_DEV_CONFIG, torch.bfloat16), device=meta)
    transformer = model.diffusion_model
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    assert {p.device for p in transformer.parameters()} == {meta}
    latent = torch.empty(1, 16, 128, 128, device=meta, dtype=torch.bfloat16)
    context = torch.empty(1, 512, 4096, device=meta, dtype=torch.bfloat16)
    pooled = torch.empty(1, 768, device=meta, dtype=torch.bfloat16)
    with torch.no_grad():
        out = transformer(latent, torch.empty(1, device=meta), context=context, y=pooled,
                          guidance=torch.empty(1, device=meta))
    assert out.shape == latent.shape and out.device == meta
