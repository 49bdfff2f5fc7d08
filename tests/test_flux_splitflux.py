"""SplitFlux's math (host-free) and its fidelity: the pack's loss and gradients on the host's tiny
FLUX equal a reference written from the paper's equations on the diffusers twin
(``devkit/splitflux_reference.py``), for one step, and the losses of a few AdamW steps."""

from __future__ import annotations

import math

import pytest
import torch

from blora_pack.core import flux_blocks
from blora_pack.core.lora_layer import LoraLayer
from blora_pack.methods import flux as flux_methods
from blora_pack.training import diffusion, splitflux

SETTINGS = splitflux.SplitFluxSettings()


def test_every_recipe_number_has_a_source():
    recipe = flux_methods.SPLITFLUX.recipe
    assert recipe.unsourced() == []
    assert flux_methods.SPLITFLUX.sources["block_roles"]


def test_the_recipe_gives_the_papers_parameter_count_at_full_size():
    """43,646,976 trainable parameters on FLUX.1-dev (hidden 3072): the paper's 43.65 M."""
    with torch.device("meta"):
        layers = splitflux.SplitFluxLayers(flux_blocks.FLUX1_HIDDEN_SIZE, SETTINGS)
    assert sum(p.numel() for p in layers.parameters()) == 43_646_976
    roles = flux_methods.SPLITFLUX.block_roles
    assert [b for b, r in roles.items() if r == "content"] == [f"single_blocks.{i}" for i in flux_blocks.CONTENT_SINGLE_BLOCKS]
    assert [b for b, r in roles.items() if r == "rca"] == [f"single_blocks.{i}" for i in flux_blocks.RCA_SINGLE_BLOCKS]
    assert [b for b, r in roles.items() if r == "style"] == [f"single_blocks.{i}" for i in flux_blocks.STYLE_SINGLE_BLOCKS]


def test_rca_scales_its_delta_by_alpha():
    layers = splitflux.SplitFluxLayers(8, SETTINGS)
    (rca, *_) = layers.of_block("single_blocks.10")
    assert rca.rank_of("rca") == 32 and rca.scaling("rca") == 2.0
    (content, *_) = layers.of_block("single_blocks.0")
    assert (content.rank_of("main"), content.rank_of("residual")) == (48, 16)
    assert content.scaling("main") == content.scaling("residual") == 1.0


def test_gate_follows_the_equation_and_a_mask_replaces_it():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3 + 10, 6, generator=generator)
    layout = splitflux.TokenLayout(text_tokens=3)
    gate = splitflux.visual_gate(features, layout, SETTINGS)[..., 0]
    norms = features[:, 3:].norm(dim=-1)
    mu, sigma = norms.mean(1, keepdim=True), ((norms - norms.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True).sqrt()
    assert torch.allclose(gate[:, 3:], torch.sigmoid((norms - mu) / sigma), atol=1e-6)
    assert torch.equal(gate[:, :3], torch.ones(2, 3))
    mask = torch.linspace(0, 1, 10)[None]
    masked = splitflux.visual_gate(features, splitflux.TokenLayout(3, mask), SETTINGS)[..., 0]
    assert torch.allclose(masked[:, 3:], mask.expand(2, -1))
    with pytest.raises(ValueError, match="image tokens"):
        splitflux.visual_gate(features, splitflux.TokenLayout(3, torch.ones(1, 9)), SETTINGS)


def test_complementary_loss_is_the_papers_sum():
    generator = torch.Generator().manual_seed(1)
    layers = []
    expected = 0.0
    for _ in range(2):
        layer = LoraLayer()
        a, b, c, d = (torch.randn(s, generator=generator) for s in ((4, 5), (6, 4), (2, 5), (6, 2)))
        layer.update_layer("main", a, b, trainable=True)
        layer.update_layer("residual", c, d, trainable=True)
        layers.append(layer)
        expected += (torch.linalg.matrix_norm(a @ c.T) ** 2 + torch.linalg.matrix_norm(b.T @ d) ** 2
                     + ((b @ a) * (d @ c)).abs().sum())
    assert torch.allclose(splitflux.complementary_loss(layers), expected)


def test_files_name_the_qkv_rows_of_linear1_and_stack_main_before_residual():
    layers = splitflux.SplitFluxLayers(8, SETTINGS)
    layers.reset(0)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(torch.randn_like(p))
    content = splitflux.role_state_dict(layers, "content")
    style = splitflux.role_state_dict(layers, "style")
    assert len(content) == 2 * 3 * 12 and len(style) == 2 * 3 * 26
    prefix = "transformer.single_transformer_blocks.0.attn.to_k"
    target = flux_blocks.lora_target(prefix, hidden_size=8)
    assert target == flux_blocks.LoraTarget("diffusion_model.single_blocks.0.linear1.weight", slice(8, 16))
    layer = layers.of_block("single_blocks.0")[1]
    assert torch.equal(content[f"{prefix}.lora_A.weight"][:48], layer.factors("main")[0].detach())
    assert torch.allclose(content[f"{prefix}.lora_B.weight"] @ content[f"{prefix}.lora_A.weight"],
                          layer.delta("main") + layer.delta("residual"), atol=1e-5)
    rca = layers.of_block("single_blocks.11")[2]
    rca_prefix = "transformer.single_transformer_blocks.11.attn.to_v"
    assert torch.allclose(content[f"{rca_prefix}.lora_B.weight"] @ content[f"{rca_prefix}.lora_A.weight"],
                          rca.delta("rca"), atol=1e-5)


def test_flow_sigmas_are_diffusers_training_table():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    assert torch.allclose(diffusion.flow_sigmas(), scheduler.timesteps / 1000)
    assert torch.allclose(diffusion.flow_sigmas(), scheduler.sigmas[:1000])


# --- fidelity against the equations on the diffusers twin -------------------------------------

def _perturbed(job, seed=5):
    """The job's layers with every factor nonzero (up starts at zero), the same on both sides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in job.trainable.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return {name: value.detach().clone() for name, value in job.trainable.state_dict().items()}


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    from devkit import tiny_flux

    flux_training = host.pack("host.flux_training")
    training_run = host.pack("host.training_run")
    job_module = host.pack("training.job")
    sf = host.pack("training.splitflux")
    trainer = host.pack("training.trainer")
    model = tiny_flux.build_tiny_flux()
    twin = tiny_flux.diffusers_flux_from(model)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    content = tiny_flux.tiny_flux_conditioning("A <c> object")
    style = tiny_flux.tiny_flux_conditioning("A <s> style")
    inputs = flux_training.FluxTrainingInputs.of_flux(model, {"samples": latent}, content, style, "test",
                                                      style_blocks=flux_blocks.STYLE_SINGLE_BLOCKS)
    settings = sf.SplitFluxSettings()

    def make_job(steps):
        config = trainer.TrainConfig(steps=steps, learning_rate=1e-3, seed=3, prediction="flow", method="splitflux")
        files = job_module.OutputFiles.inside(tmp_path_factory.mktemp("loras"), "sf.safetensors", sf.ROLES)
        return sf.splitflux_job(config, files, tiny_flux.HIDDEN_SIZE, settings, "", inputs.layout)

    return dict(model=model, twin=twin, latent=latent, content=content, style=style, inputs=inputs,
                make_job=make_job, host=host)


def _conditioning_args(conditioning):
    context, extras = conditioning[0]
    return context, extras["pooled_output"], torch.tensor([extras["guidance"]])


def test_one_step_loss_and_gradients_equal_the_equations(setup):
    from devkit import splitflux_reference

    host_training = setup["host"].pack("host.training")
    job = setup["make_job"](1)
    _perturbed(job)
    reference = splitflux_reference.Reference(setup["twin"], splitflux_reference.factors_of(job.trainable),
                                              setup["content"][0][0].shape[1])
    inputs = setup["inputs"]
    draw = diffusion.draw_step(3, 0, 1, setup["latent"].shape)
    with inputs.training_context(), host_training.training_model(
            inputs.model, job.trainable, {}, job.module_wrappers) as (clone, device):
        predict = inputs.predictor(clone, device)
        loss = diffusion.denoising_loss(predict, inputs.samples, draw, inputs.schedule(clone), "flow")
        loss = loss + job.training_method.extra_loss(0)
        loss.backward()
    try:
        expected = reference.loss(setup["latent"], draw.noise, draw.timestep, _conditioning_args(setup["content"]),
                                  _conditioning_args(setup["style"]))
        expected.backward()
    finally:
        reference.remove()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    worst = 0.0
    for (block, projection), layer in job.trainable.items():
        index = int(block.split(".")[1])
        for adapter, pair in reference.factors[(index, projection)].items():
            for mine, theirs in zip(layer.factors(adapter), pair):
                assert mine.grad is not None and theirs.grad is not None
                worst = max(worst, ((mine.grad - theirs.grad).abs().max() / theirs.grad.abs().max()).item())
    assert worst < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(setup["model"].model.diffusion_model.state_dict().values(),
                                                 setup["model"].model.diffusion_model.state_dict().values()))


def test_a_few_steps_give_the_equations_losses(setup):
    from devkit import splitflux_reference

    host_training = setup["host"].pack("host.training")
    trainer = setup["host"].pack("training.trainer")
    job = setup["make_job"](3)
    _perturbed(job)
    reference = splitflux_reference.Reference(setup["twin"], splitflux_reference.factors_of(job.trainable),
                                              setup["content"][0][0].shape[1])
    inputs = setup["inputs"]
    with inputs.training_context(), host_training.training_model(
            inputs.model, job.trainable, {}, job.module_wrappers) as (clone, device):
        state = trainer.train(job.trainable, inputs.predictor(clone, device), inputs.samples,
                              inputs.schedule(clone), job.config, method=job.training_method)
    params = reference.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    losses = []
    try:
        for step in range(3):
            draw = diffusion.draw_step(3, step, 1, setup["latent"].shape)
            loss = reference.loss(setup["latent"], draw.noise, draw.timestep, _conditioning_args(setup["content"]),
                                  _conditioning_args(setup["style"]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        reference.remove()
    assert state.losses == pytest.approx(losses, rel=1e-4)
    assert losses[0] != losses[-1]
