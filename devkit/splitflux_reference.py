"""SplitFlux written from the paper's equations on the diffusers FLUX twin (``tiny_flux``), with
peft's LoRA layers, independently of the pack's code: the reference ``tests/test_flux_splitflux.py``
holds the pack to, and the one the SplitFlux benchmarks time it against (``bench/splitflux_sides.py``).

- q/k/v of ``single_transformer_blocks.i.attn`` (diffusers' separate projections), one peft
  adapter per branch (``inject_adapter_in_model``, all active at once):
  content (i in 0-9): ``y_n += g_n B A x_n + (1 - g_n) D C x_n``, g_n = sigmoid((||x_n|| - mu) / sigma)
  over the image tokens (population sigma), text tokens gate 1 (the pack's documented choice):
  peft's ``result + lora_B(lora_A(x)) * scaling`` with the two branches' ``scaling`` set to
  g and 1 - g (per token) before each call;
  RCA (10-11): ``y += alpha B A x`` with alpha = 2 (peft: rank 32, lora_alpha 64); style
  (12-37): ``y += B A x`` (lora_alpha = rank).
- prompt replacement: a no-grad pass with the style prompt records the text stream
  (``encoder_hidden_states``) entering each style block; the training pass replaces its own there.
- loss (diffusers ``train_dreambooth_lora_flux.py``): x0 = (z - shift) * scale, sigma from
  ``FlowMatchEulerDiscreteScheduler``'s training table, x_t = (1 - sigma) x0 + sigma noise,
  MSE against noise - x0, plus lambda (||A C^T||^2 + ||B^T D||^2 + sum |BA ⊙ DC|) summed over
  the content layers.
"""

from __future__ import annotations

import torch

from . import tiny_flux

FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611
RCA_ALPHA = 2.0
LAMBDA = 0.1


def group(index: int) -> str:
    return "content" if index < 10 else "rca" if index < 12 else "style"


def factors_of(trained) -> dict:
    """The factors :class:`Reference` starts from: copies of the pack's trained layers' (``items()``:
    ``((single_blocks.i, projection), layer)``), every adapter of each as a (down, up) leaf pair."""
    factors = {}
    for (block, projection), layer in trained.items():
        factors[(int(block.split(".")[1]), projection)] = {
            adapter: tuple(f.detach().clone().requires_grad_(True) for f in layer.factors(adapter))
            for adapter in layer.lora_A}
    return factors


def training_sigmas() -> torch.Tensor:
    """``FlowMatchEulerDiscreteScheduler``'s training table (timesteps / 1000) as FLUX.1-dev
    configures it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return scheduler.timesteps / 1000


class Reference:
    """``factors[(i, projection)]``: dict adapter -> (down, up), peft's ``lora_A`` / ``lora_B``
    weights on the twin (leaf parameters), started from the given factors."""

    def __init__(self, twin, factors: dict, text_tokens: int, prompt_replacement: bool = True):
        self.twin = twin
        self.text_tokens = text_tokens
        self.prompt_replacement = prompt_replacement
        self.capturing = False
        self.style_text: dict[int, torch.Tensor] = {}
        self.handles = []
        self.sigmas = training_sigmas()
        self.factors = self._peft_layers(factors)
        for index, block in enumerate(twin.single_transformer_blocks):
            if group(index) == "content":
                for projection in ("to_q", "to_k", "to_v"):
                    module = getattr(block.attn, projection)
                    self.handles.append(module.register_forward_pre_hook(self._gate))
            if group(index) == "style" and prompt_replacement:
                self.handles.append(block.register_forward_pre_hook(self._replace(index), with_kwargs=True))

    def _peft_layers(self, factors: dict) -> dict:
        """One peft adapter per (adapter name, rank, scale) on the modules that have it, all active;
        each layer's factors copied in."""
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        targets: dict[tuple[str, int, float], list[str]] = {}
        for (index, projection), pairs in factors.items():
            for adapter, (down, _) in pairs.items():
                rank = down.shape[0]
                scale = RCA_ALPHA if group(index) == "rca" else 1.0
                targets.setdefault((adapter, rank, scale), []).append(
                    f"single_transformer_blocks.{index}.attn.{projection}")
        for (adapter, rank, scale), modules in targets.items():
            config = LoraConfig(r=rank, lora_alpha=rank * scale, target_modules=modules, lora_dropout=0.0)
            inject_adapter_in_model(config, self.twin, adapter_name=adapter)
        for module in self.twin.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(list(module.lora_A))
        peft_factors = {}
        with torch.no_grad():
            for (index, projection), pairs in factors.items():
                module = getattr(self.twin.single_transformer_blocks[index].attn, projection)
                peft_factors[(index, projection)] = {}
                for adapter, (down, up) in pairs.items():
                    module.lora_A[adapter].to(down.device, down.dtype)  # the factors' dtype (peft takes the base's)
                    module.lora_B[adapter].to(up.device, up.dtype)
                    module.lora_A[adapter].weight.copy_(down)
                    module.lora_B[adapter].weight.copy_(up)
                    peft_factors[(index, projection)][adapter] = (module.lora_A[adapter].weight,
                                                                  module.lora_B[adapter].weight)
        return peft_factors

    def _gate(self, module, inputs):
        """The content branches' per-token scaling for this call: g for main, 1 - g for residual."""
        x = inputs[0]
        norms = x[:, self.text_tokens:].detach().norm(dim=-1)
        gate = torch.sigmoid((norms - norms.mean(1, keepdim=True)) / norms.std(1, keepdim=True, correction=0))
        gate = torch.cat([torch.ones(x.shape[0], self.text_tokens).to(gate), gate], 1)[..., None]
        module.scaling["main"], module.scaling["residual"] = gate, 1 - gate

    def _replace(self, index):
        def hook(module, args, kwargs):
            if self.capturing:
                self.style_text[index] = kwargs["encoder_hidden_states"].detach()
                return None
            return args, {**kwargs, "encoder_hidden_states": self.style_text[index]}
        return hook

    def complementary(self) -> torch.Tensor:
        total = 0
        for (index, _), f in self.factors.items():
            if group(index) != "content":
                continue
            (a, b), (c, d) = f["main"], f["residual"]
            total = total + (a @ c.t()).square().sum() + (b.t() @ d).square().sum() + ((b @ a) * (d @ c)).abs().sum()
        return total

    def loss(self, latent, noise, index, content, style) -> torch.Tensor:
        """``content``/``style``: (context, pooled, guidance); ``index``: the draw's table index."""
        sigma = self.sigmas[index].reshape(1).float().to(latent.device)
        x0 = (latent - FLUX_SHIFT) * FLUX_SCALE
        noisy = (1 - sigma) * x0 + sigma * noise
        if self.prompt_replacement:
            self.capturing = True
            with torch.no_grad():
                tiny_flux.diffusers_flux_output(self.twin, noisy, sigma, *style)
            self.capturing = False
        prediction = tiny_flux.diffusers_flux_output(self.twin, noisy, sigma, *content)
        return torch.nn.functional.mse_loss(prediction, noise - x0) + LAMBDA * self.complementary()

    def parameters(self):
        return [t for f in self.factors.values() for pair in f.values() for t in pair]

    def remove(self):
        """The hooks and peft's layers taken off: the twin as it was."""
        from peft.tuners.lora import LoraLayer

        for handle in self.handles:
            handle.remove()
        for name, module in list(self.twin.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(self.twin.get_submodule(parent), child, module.get_base_layer())
        vars(self.twin).pop("peft_config", None)
