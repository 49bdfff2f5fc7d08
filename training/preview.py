"""A quick look at what the LoRA being trained produces: a few deterministic steps from noise
with the training prompt, the same ``predict`` the training step uses (no guidance): DDIM for
SDXL's epsilon / v prediction, Euler along the flow for FLUX."""

from __future__ import annotations

import torch

from .diffusion import FLOW, NUM_TRAIN_TIMESTEPS


@torch.no_grad()
def ddim_sample(predict, shape: torch.Size, alphas_cumprod: torch.Tensor, steps: int, seed: int,
                prediction: str = "epsilon", index: int = 0, device=None) -> torch.Tensor:
    """A latent from pure noise in ``steps`` DDIM steps (eta 0)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(shape, generator=generator).to(device)
    timesteps = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps).round().long().tolist()
    for position, timestep in enumerate(timesteps):
        alpha_bar = alphas_cumprod[timestep].float().to(latent.device)
        output = predict(latent, torch.full((shape[0],), float(timestep), device=latent.device), index).float()
        if prediction == "v_prediction":
            x0 = alpha_bar.sqrt() * latent - (1 - alpha_bar).sqrt() * output
            noise = alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * latent
        else:
            x0 = (latent - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
            noise = output
        if position + 1 == len(timesteps):
            return x0
        next_alpha_bar = alphas_cumprod[timesteps[position + 1]].float().to(latent.device)
        latent = next_alpha_bar.sqrt() * x0 + (1 - next_alpha_bar).sqrt() * noise
    return latent


@torch.no_grad()
def flow_euler_sample(predict, shape: torch.Size, steps: int, seed: int, index: int = 0, device=None) -> torch.Tensor:
    """A latent from pure noise in ``steps`` Euler steps of the flow (sigma 1 to 0, evenly spaced,
    unshifted), the model fed sigma and giving the velocity ``noise - x0`` (what training fits)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(shape, generator=generator).to(device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for sigma, next_sigma in zip(sigmas, sigmas[1:]):
        velocity = predict(latent, torch.full((shape[0],), sigma, device=latent.device), index).float()
        latent = latent + (next_sigma - sigma) * velocity
    return latent


def sample(predict, shape: torch.Size, schedule: torch.Tensor, steps: int, seed: int, prediction: str,
           device=None) -> torch.Tensor:
    """The preview's sampler for the model's ``prediction`` (``schedule``: its training table)."""
    if prediction == FLOW:
        return flow_euler_sample(predict, shape, steps, seed, device=device)
    return ddim_sample(predict, shape, schedule, steps, seed, prediction, device=device)
