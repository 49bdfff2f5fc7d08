"""The training loop on a toy model: resume is exact, NaN and Cancel stop cleanly with a
checkpoint, settings are validated. (The real UNet is exercised in test_train_node.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blora_pack.training import diffusion, trainer
from blora_pack.training.lora_adapters import LoraAdapterSet, WeightDelta

ALPHAS_CUMPROD = torch.linspace(0.9991, 0.0047, diffusion.NUM_TRAIN_TIMESTEPS, dtype=torch.float64)


class ToyModel:
    """A frozen linear map on flattened latents, with one LoRA'd weight."""

    def __init__(self, adapters, poison_after: int | None = None):
        generator = torch.Generator().manual_seed(5)
        self.weight = torch.randn(16, 16, generator=generator) / 4
        self.adapters = adapters
        self.calls = 0
        self.poison_after = poison_after

    def __call__(self, noisy, timesteps, index):
        self.calls += 1
        (_, adapter), = self.adapters.items()
        out = F.linear(noisy.flatten(1), WeightDelta(adapter)(self.weight)).view_as(noisy)
        if self.poison_after is not None and self.calls > self.poison_after:
            out = out * math.nan
        return out


def make_run(seed=3):
    adapters = LoraAdapterSet({"layer": (16, 16)}, rank=4, alpha=None)
    adapters.reset(seed)
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    return adapters, latents


def params_of(adapters):
    return [p.detach().clone() for p in adapters.parameters()]


def test_training_lowers_the_loss():
    adapters, latents = make_run()
    state = trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD,
                          trainer.TrainConfig(steps=300, learning_rate=1e-2, seed=1))
    assert len(state.losses) == 300 and state.step == 300
    first, last = sum(state.losses[:30]) / 30, sum(state.losses[-30:]) / 30
    assert last < 0.8 * first


def test_resumed_run_equals_uninterrupted_run():
    config = trainer.TrainConfig(steps=10, learning_rate=1e-2, seed=1)
    adapters, latents = make_run()
    full = trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD, config)
    expected = params_of(adapters)

    adapters, latents = make_run()
    saved = []
    half = trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD,
                         trainer.TrainConfig(steps=5, learning_rate=1e-2, seed=1))
    saved_params = params_of(adapters)
    adapters, latents = make_run(seed=99)  # a fresh run, then restored from the "checkpoint"
    with torch.no_grad():
        for param, value in zip(adapters.parameters(), saved_params):
            param.copy_(value)
    resumed = trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD, config,
                            trainer.TrainingHooks(save_checkpoint=saved.append), resume=half)
    assert resumed.losses == full.losses
    for got, want in zip(params_of(adapters), expected):
        assert torch.equal(got, want)
    assert saved == []


def test_draws_are_a_pure_function_of_seed_and_step():
    a = diffusion.draw_step(7, 12, 3, torch.Size([1, 4, 8, 8]))
    b = diffusion.draw_step(7, 12, 3, torch.Size([1, 4, 8, 8]))
    c = diffusion.draw_step(7, 13, 3, torch.Size([1, 4, 8, 8]))
    assert (a.index, a.timestep) == (b.index, b.timestep) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, c.noise)
    assert 0 <= a.timestep < diffusion.NUM_TRAIN_TIMESTEPS


def test_persistent_nan_stops_with_a_checkpoint_of_the_last_good_lora():
    adapters, latents = make_run()
    saved = []
    model = ToyModel(adapters, poison_after=4)
    config = trainer.TrainConfig(steps=100, learning_rate=1e-2, seed=1, max_bad_steps=3)
    with pytest.raises(trainer.NonFiniteLossError, match="NaN/inf for 4 steps in a row"):
        trainer.train(adapters, model, latents, ALPHAS_CUMPROD, config,
                      trainer.TrainingHooks(save_checkpoint=lambda s: saved.append((s, params_of(adapters)))))
    (state, params), = saved
    assert state.step == 7 and all(math.isfinite(v) for v in state.losses[:4])
    assert all(math.isnan(v) for v in state.losses[4:])
    assert all(torch.isfinite(p).all() for p in params)

    adapters_good, latents = make_run()
    trainer.train(adapters_good, ToyModel(adapters_good), latents, ALPHAS_CUMPROD,
                  trainer.TrainConfig(steps=4, learning_rate=1e-2, seed=1))
    for got, want in zip(params, params_of(adapters_good)):
        assert torch.equal(got, want), "skipped NaN steps must not change the LoRA"


def test_a_single_nan_step_is_skipped_and_training_goes_on():
    adapters, latents = make_run()
    calls = {"n": 0}
    toy = ToyModel(adapters)

    def predict(noisy, timesteps, index):
        calls["n"] += 1
        out = toy(noisy, timesteps, index)
        return out * math.nan if calls["n"] == 3 else out

    state = trainer.train(adapters, predict, latents, ALPHAS_CUMPROD,
                          trainer.TrainConfig(steps=6, learning_rate=1e-2, seed=1))
    assert math.isnan(state.losses[2]) and sum(math.isnan(v) for v in state.losses) == 1


class Cancelled(Exception):
    pass


def test_cancel_saves_a_checkpoint_then_raises():
    adapters, latents = make_run()
    saved = []
    steps_seen = []

    def check_interrupt():
        if len(steps_seen) == 3:
            raise Cancelled()

    hooks = trainer.TrainingHooks(on_step=lambda step, total, loss, seconds: steps_seen.append(step),
                                  check_interrupt=check_interrupt, save_checkpoint=saved.append)
    with pytest.raises(Cancelled):
        trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD,
                      trainer.TrainConfig(steps=50, learning_rate=1e-2, seed=1), hooks)
    assert [s.step for s in saved] == [3]
    assert saved[0].optimizer and len(saved[0].losses) == 3


def test_cancel_after_the_last_step_keeps_it_and_a_resume_finishes_without_training():
    """The host's Cancel can land in ``on_step`` after the last update (its progress hook
    raises there): the checkpoint then holds every step, and resuming it trains nothing more."""
    config = trainer.TrainConfig(steps=3, learning_rate=1e-2, seed=1, checkpoint_every=0)
    adapters, latents = make_run()
    saved = []

    def on_step(step, total, loss, seconds):
        if step == total:
            raise Cancelled()

    with pytest.raises(Cancelled):
        trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD, config,
                      trainer.TrainingHooks(on_step=on_step, save_checkpoint=saved.append))
    assert [(s.step, len(s.losses)) for s in saved] == [(3, 3)], "the work of every completed step is kept"
    trained = params_of(adapters)

    model = ToyModel(adapters)
    finished = trainer.train(adapters, model, latents, ALPHAS_CUMPROD, config,
                             trainer.TrainingHooks(save_checkpoint=saved.append), resume=saved[0])
    assert model.calls == 0 and len(saved) == 1, "no step trained, no checkpoint written again"
    assert finished.step == 3 and finished.losses == saved[0].losses
    assert all(torch.equal(a, b) for a, b in zip(params_of(adapters), trained))


def test_a_checkpoint_that_cannot_be_saved_when_training_stops_does_not_hide_why_it_stopped(caplog):
    adapters, latents = make_run()

    def check_interrupt():
        if model.calls == 2:
            raise Cancelled()

    def save_checkpoint(state):
        raise OSError(28, "No space left on device")

    model = ToyModel(adapters)
    with pytest.raises(Cancelled):
        trainer.train(adapters, model, latents, ALPHAS_CUMPROD, trainer.TrainConfig(steps=5, learning_rate=1e-2),
                      trainer.TrainingHooks(check_interrupt=check_interrupt, save_checkpoint=save_checkpoint))
    assert "the checkpoint at step 2 could not be saved ([Errno 28] No space left on device)" in caplog.text


def test_periodic_checkpoints():
    adapters, latents = make_run()
    saved = []
    trainer.train(adapters, ToyModel(adapters), latents, ALPHAS_CUMPROD,
                  trainer.TrainConfig(steps=10, learning_rate=1e-2, seed=1, checkpoint_every=4),
                  trainer.TrainingHooks(save_checkpoint=saved.append))
    assert [s.step for s in saved] == [4, 8]


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be at least 1"),
    ("learning_rate", 0.0, "learning_rate must be positive"),
    ("precision", "fp8", "precision must be one of"),
    ("checkpoint_every", -1, "checkpoint_every must be 0 or more"),
])
def test_config_is_validated(field, value, message):
    settings = {"steps": 10, "learning_rate": 1e-4, field: value}
    with pytest.raises(ValueError, match=message):
        trainer.TrainConfig(**settings)


def test_adapter_starts_as_a_no_op_with_the_official_init():
    adapters = LoraAdapterSet({"a": (32, 16)}, rank=8, alpha=None)
    adapters.reset(0)
    (_, adapter), = adapters.items()
    assert torch.count_nonzero(adapter.up) == 0
    assert 0.08 < adapter.down.std().item() < 0.17  # normal(std = 1/rank = 0.125)
    weight = torch.randn(32, 16)
    assert torch.equal(WeightDelta(adapter)(weight), weight)


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8.0, 1.0), (16.0, 2.0), (4.0, 0.5)])
def test_adapter_adds_the_scaled_product_to_the_weight(alpha, scale):
    adapters = LoraAdapterSet({"a": (32, 16)}, rank=8, alpha=alpha)
    (_, adapter), = adapters.items()
    with torch.no_grad():
        adapter.up.normal_()
        adapter.down.normal_()
    weight = torch.randn(32, 16)
    torch.testing.assert_close(WeightDelta(adapter)(weight), weight + scale * adapter.up.detach() @ adapter.down.detach())


def test_v_prediction_target():
    latent, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    target = diffusion.target(latent, noise, 500, ALPHAS_CUMPROD, "v_prediction")
    alpha_bar = ALPHAS_CUMPROD[500].float()
    torch.testing.assert_close(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latent)


def test_a_batch_of_two_equals_one_batched_step_with_a_mean_loss():
    """Two images a step (the style-LoRA recipe), one UNet call each with gradients accumulated,
    and no clipping: the update equals a hand-written batched step of diffusers' form (one
    forward of both noisy latents, MSE over the batch, AdamW with weight decay 0.01)."""
    adapters, latents = make_run()
    reference = [p.detach().clone().requires_grad_(True) for p in adapters.parameters()]
    model = ToyModel(adapters)
    config = trainer.TrainConfig(steps=1, learning_rate=1e-2, seed=4, batch_size=2, max_grad_norm=None,
                                 weight_decay=0.01)
    state = trainer.train(adapters, model, latents, ALPHAS_CUMPROD, config)
    assert model.calls == 2
    draws = diffusion.draw_batch(4, 0, 2, latents[:1].shape, 2)
    assert sorted(d.index for d in draws) == [0, 1] and draws[0].timestep != draws[1].timestep
    down, up = reference
    noisy = torch.cat([diffusion.add_noise(latents[d.index:d.index + 1], d.noise, d.timestep, ALPHAS_CUMPROD) for d in draws])
    noise = torch.cat([d.noise for d in draws])
    prediction = F.linear(noisy.flatten(1), model.weight + up @ down).view_as(noisy)
    loss = F.mse_loss(prediction, noise)
    loss.backward()
    optimizer = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimizer.step()
    assert state.losses[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    for trained, expected in zip(adapters.parameters(), reference):
        torch.testing.assert_close(trained.detach(), expected.detach(), rtol=1e-6, atol=1e-7)


def test_a_batch_of_one_draws_what_draw_step_draws():
    single = diffusion.draw_step(7, 3, 5, torch.Size([1, 4, 8, 8]))
    (batched,) = diffusion.draw_batch(7, 3, 5, torch.Size([1, 4, 8, 8]), 1)
    assert (single.index, single.timestep) == (batched.index, batched.timestep) and torch.equal(single.noise, batched.noise)
