"""The denoising objective of the official recipe: DDPM noising, epsilon (or v) MSE; or, for
FLUX (``prediction="flow"``), diffusers' flow matching: ``x_t = (1 - sigma) x0 + sigma noise``,
target ``noise - x0`` (``train_dreambooth_lora_flux.py``; the schedule is then ``flow_sigmas()``).

The schedule comes from the model itself (ComfyUI keeps ``sigmas``; ``alphas_cumprod`` is
``1 / (1 + sigma^2)``), which for SDXL is the scaled-linear schedule the official script reads
from the base model's scheduler config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


FLOW = "flow"


def flow_sigmas() -> torch.Tensor:
    """diffusers' FLUX training table: ``FlowMatchEulerDiscreteScheduler``'s timesteps
    ``linspace(1, 1000, 1000)`` descending, over 1000, unshifted (FLUX.1-dev's scheduler uses dynamic
    shifting, applied only at inference); a uniform index i gives sigma = 1 - i / 1000."""
    return torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS).flip(0) / NUM_TRAIN_TIMESTEPS


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + sigmas.double() ** 2)


@dataclass(frozen=True)
class StepDraw:
    """What one training step draws at random: which image, which timestep, which noise."""

    index: int
    timestep: int
    noise: torch.Tensor


def draw_step(seed: int, step: int, num_images: int, latent_shape: torch.Size) -> StepDraw:
    """Each step draws from its own generator, so a resumed run draws exactly what an
    uninterrupted run would have drawn at that step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = int(torch.randint(num_images, (1,), generator=generator))
    timestep = int(torch.randint(NUM_TRAIN_TIMESTEPS, (1,), generator=generator))
    noise = torch.randn(latent_shape, generator=generator)
    return StepDraw(index, timestep, noise)


def draw_batch(seed: int, step: int, num_images: int, latent_shape: torch.Size, batch_size: int) -> list[StepDraw]:
    """The draws of one step of ``batch_size`` distinct images (each with its own timestep and
    noise, as a batched diffusers step draws them); a batch of one is ``draw_step``'s draw."""
    if batch_size == 1:
        return [draw_step(seed, step, num_images, latent_shape)]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    indices = torch.randperm(num_images, generator=generator)[:batch_size].tolist()
    timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, (len(indices),), generator=generator).tolist()
    return [StepDraw(index, timestep, torch.randn(latent_shape, generator=generator))
            for index, timestep in zip(indices, timesteps)]


def add_noise(latent: torch.Tensor, noise: torch.Tensor, timestep: int, alphas_cumprod: torch.Tensor,
              prediction: str = "epsilon") -> torch.Tensor:
    if prediction == FLOW:
        sigma = alphas_cumprod[timestep].to(torch.float32)
        return (1 - sigma) * latent + sigma * noise
    alpha_bar = alphas_cumprod[timestep].to(torch.float32)
    return alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise


def target(latent: torch.Tensor, noise: torch.Tensor, timestep: int, alphas_cumprod: torch.Tensor,
           prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == FLOW:
        return noise - latent
    if prediction == "v_prediction":
        alpha_bar = alphas_cumprod[timestep].to(torch.float32)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latent
    raise ValueError(f"Unknown prediction type {prediction!r}; expected 'epsilon', 'v_prediction' or 'flow'.")


def denoising_loss(predict, latent: torch.Tensor, draw: StepDraw, alphas_cumprod: torch.Tensor,
                   prediction: str = "epsilon") -> torch.Tensor:
    """MSE between the model's prediction on the noised latent and the true noise (or v, or the
    flow's velocity). ``alphas_cumprod`` is the schedule: for flow matching, ``flow_sigmas()``.

    ``predict(noisy_latent, timesteps, index)`` runs the UNet for image ``index``.
    """
    noise = draw.noise.to(latent.device, latent.dtype)
    noisy = add_noise(latent, noise, draw.timestep, alphas_cumprod, prediction)
    value = float(alphas_cumprod[draw.timestep]) if prediction == FLOW else draw.timestep  # flow: the model takes sigma
    timesteps = torch.full((latent.shape[0],), value, device=latent.device, dtype=torch.float32)
    prediction_out = predict(noisy, timesteps, draw.index)
    return F.mse_loss(prediction_out.float(), target(latent, noise, draw.timestep, alphas_cumprod, prediction).float())
