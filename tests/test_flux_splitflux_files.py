"""SplitFlux's files load with ComfyUI's stock LoraLoader and with diffusers' FLUX LoRA loader
(peft, every key taken), and both give the same model: the twin with the adapters equals the
host's model with the stock loader's patches."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from blora_pack.training import splitflux


def test_files_load_in_comfyui_and_diffusers_alike(host, loras_dir):
    from devkit import tiny_flux

    layers = splitflux.SplitFluxLayers(tiny_flux.HIDDEN_SIZE, splitflux.SplitFluxSettings())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    files = {role: splitflux.role_state_dict(layers, role) for role in splitflux.ROLES}
    for role, state in files.items():
        save_file(state, str(loras_dir / f"sf_{role}.safetensors"))

    model = tiny_flux.build_tiny_flux()
    twin = tiny_flux.diffusers_flux_from(model)
    loader = host.node("LoraLoaderModelOnly")()
    patched = model
    for role in splitflux.ROLES:
        patched = loader.load_lora_model_only(patched, f"sf_{role}.safetensors", 1.0)[0]
        twin.load_lora_adapter(dict(files[role]), prefix="transformer", adapter_name=role)
    twin.set_adapters(list(splitflux.ROLES), [1.0, 1.0])
    adapted = {name for name, module in twin.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    expected = {key.split(".", 1)[1].rsplit(".lora_", 1)[0] for state in files.values() for key in state}
    assert adapted == expected, "diffusers takes every module of both files, and nothing else"

    inputs = tiny_flux.sample_inputs(size=8)
    ours = tiny_flux.comfy_flux_output(patched, *inputs)
    plain = tiny_flux.comfy_flux_output(model, *inputs)
    with torch.no_grad():
        theirs = tiny_flux.diffusers_flux_output(twin, *inputs)
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert ((ours - plain).abs().max() / plain.abs().max()) > 1e-3  # the LoRAs change the output
