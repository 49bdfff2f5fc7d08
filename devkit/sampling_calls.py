"""Every UNet call of a real sampling run (the host's own KSampler node), recorded, and the same
call replayed on the diffusers twin: how the fidelity tests of K-LoRA Fuse and of UnZipLoRA's
prompt-separated recombination compare the pack in the host with a reference in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blora_pack.command_line.tiny import CONTEXT_DIM, POOLED_DIM

SIZE_PX = 1024
SIZE_CONDITIONING = {"width": SIZE_PX, "height": SIZE_PX, "crop_w": 0, "crop_h": 0,
                     "target_width": SIZE_PX, "target_height": SIZE_PX}
"""Given explicitly, so the diffusers side knows its ``time_ids``."""


@dataclass
class UNetCall:
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor
    chunks: tuple[int, ...]
    """The host's ``cond_or_uncond`` for this call's batch chunks (0 cond, 1 uncond)."""
    output: torch.Tensor


def conditioning(seed: int, tokens: int = 77):
    """A CONDITIONING with a random context and pooled output, and SDXL's size conditioning."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, CONTEXT_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return [[context, {"pooled_output": pooled, **SIZE_CONDITIONING}]]


def sample_and_record(host, model, positive, negative, steps: int, cfg: float = 5.0, sampler: str = "euler",
                      scheduler: str = "normal", seed: int = 3, latent_size: int = 8) -> list[UNetCall]:
    """Run the host's KSampler node on ``model`` and return every UNet call it made."""
    import comfy.model_management
    import comfy.patcher_extension

    calls: list[UNetCall] = []

    def record(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        output = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        calls.append(UNetCall(x.clone(), timesteps.clone(), context.clone(), y.clone(),
                              tuple(transformer_options.get("cond_or_uncond", ())), output.clone().float()))
        return output

    recording = model.clone()
    recording.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_record", record)
    latent = {"samples": torch.zeros(1, 4, latent_size, latent_size)}
    with torch.inference_mode():
        host.node("KSampler")().sample(recording, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    comfy.model_management.unload_all_models()
    return calls


def diffusers_output(unet, call: UNetCall, **unet_kwargs) -> torch.Tensor:
    """The diffusers twin's output for the inputs of one recorded call."""
    batch = call.x.shape[0]
    time_ids = torch.tensor([[SIZE_PX, SIZE_PX, 0, 0, SIZE_PX, SIZE_PX]], dtype=torch.float32).repeat(batch, 1)
    with torch.no_grad():
        return unet(call.x.float(), call.timesteps.float(), encoder_hidden_states=call.context.float(),
                    added_cond_kwargs={"text_embeds": call.y[:, :POOLED_DIM].float(), "time_ids": time_ids},
                    **unet_kwargs).sample.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
