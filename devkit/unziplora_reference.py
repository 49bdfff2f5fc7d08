"""UnZipLoRA training written from the method's equations on diffusers' UNet: the reference
the fidelity test (tests/test_unzip_fidelity.py) and the CPU benchmark (bench/cpu_unzip_step.py)
compare the pack with.

Forward hooks add ``x_c ΔW_c^T + x_s ΔW_s^T`` to every attention projection (``ΔW = (B A) * (m ⊙ b)``
per output feature, content/style prompts on cross-attention k/v); the period schedule, the
column scores (fraction of input rows with |W ⊙ G| > threshold, G from the product rule), top-k
selection with style avoiding content columns, the block roles, the 0.5-weighted overlap term,
merger gradients limited to the overlap, clipping, AdamW with three groups and the clamp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANK, SEED, STEPS_PLANNED, SAMPLE_TIMES, RATIO, THRESHOLD = 64, 5, 6, 3, 0.25, 5e-8
LR_CONTENT, LR_STYLE, LR_MERGER, OVERLAP_WEIGHT = 1e-3, 2e-3, 5e-2, 0.5
LEARNING_RATE_OF = {"content_down": LR_CONTENT, "content_up": LR_CONTENT, "style_down": LR_STYLE,
                    "style_up": LR_STYLE, "merge_content": LR_MERGER, "merge_style": LR_MERGER}
CONTENT_FULL = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.2")
STYLE_FULL = ("up_blocks.0.attentions.1", "up_blocks.1.attentions.")


def reference_parameters(layer) -> dict:
    """The pack's UnZipLayer's parameters under this reference's names (``content_down``,
    ``content_up``, ..., ``merge_content``, ``merge_style``): live tensors, not copies."""
    named = {}
    for role in ("content", "style"):
        named[f"{role}_down"], named[f"{role}_up"] = layer.factors(role)
        named[f"merge_{role}"] = layer.merger(role)
    return named


def initial_parameters(layers: dict) -> dict:
    """Copies of every layer's parameters, by path, as :class:`Reference` starts from."""
    return {path: {k: v.detach().clone() for k, v in reference_parameters(layer).items()} for path, layer in layers.items()}


class Reference:
    """The method from its equations, on diffusers' UNet."""

    def __init__(self, unet, initial, to_diffusers, contexts, period=-(-STEPS_PLANNED // SAMPLE_TIMES)):
        self.unet, self.contexts, self.period = unet, contexts, period
        self.params = {}
        for path, values in initial.items():
            name = to_diffusers(path)
            leaf = {k: v.clone().requires_grad_(True) for k, v in values.items()}
            leaf["mask_content"] = torch.zeros(values["content_up"].shape[0], dtype=torch.bool)
            leaf["mask_style"] = torch.zeros_like(leaf["mask_content"])
            leaf["sparse_only"] = "style" if name.startswith(CONTENT_FULL) else "content" if name.startswith(STYLE_FULL) else None
            self.params[name] = leaf
            unet.get_submodule(name).register_forward_hook(self.hook(name))
        self.masked = False

    def delta(self, p, role):
        weight = p[f"merge_{role}"] * (p[f"mask_{role}"].float() if self.masked else 1.0)
        return (p[f"{role}_up"] @ p[f"{role}_down"]) * weight[:, None]

    def hook(self, name):
        separated = name.endswith(("attn2.to_k", "attn2.to_v"))

        def add_loras(module, inputs, output):
            p = self.params[name]
            x = inputs[0]
            x_c = self.contexts["content"] if separated else x
            x_s = self.contexts["style"] if separated else x
            return output + F.linear(x_c, self.delta(p, "content")) + F.linear(x_s, self.delta(p, "style"))

        return add_loras

    def overlap(self):
        terms = [((p["merge_content"] * p["mask_content"]) * (p["merge_style"] * p["mask_style"])).abs().mean()
                 for p in self.params.values()]
        return torch.stack(terms).mean()

    def select(self):
        for p in self.params.values():
            scores = {}
            for role in ("content", "style"):
                down, up, merge = p[f"{role}_down"], p[f"{role}_up"], p[f"merge_{role}"]
                w = down.detach().T @ up.detach().T
                g = (down.grad.T @ up.detach().T + down.detach().T @ up.grad.T) * merge.detach()
                scores[role] = ((w * g).abs() > THRESHOLD).float().mean(0)
            k = int(len(scores["content"]) * RATIO)

            def top(s):
                return s > torch.topk(s, k).values.min()

            if p["sparse_only"] is None:
                p["mask_content"] |= top(scores["content"])
                style = scores["style"].clone()
                style[p["mask_content"]] = float("-inf")
                p["mask_style"] |= top(style)
            else:
                sparse = p["sparse_only"]
                full = "content" if sparse == "style" else "style"
                p[f"mask_{sparse}"] |= top(scores[sparse])
                p[f"mask_{full}"][:] = True

    def train(self, x0, draws, y_inputs, combined, steps):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
        groups = [{"params": [p[k] for p in self.params.values() for k in ("content_down", "content_up")], "lr": LR_CONTENT},
                  {"params": [p[k] for p in self.params.values() for k in ("style_down", "style_up")], "lr": LR_STYLE},
                  {"params": [p[k] for p in self.params.values() for k in ("merge_content", "merge_style")], "lr": LR_MERGER}]
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        period = self.period
        losses = []
        for step in range(steps):
            self.masked = not (step == 0 or step % period == 1)
            for p in self.params.values():
                for role in ("content", "style"):
                    p[f"merge_{role}"].requires_grad_(self.masked)
            draw = draws[step]
            timesteps = torch.tensor([draw.timestep])
            noisy = scheduler.add_noise(x0, draw.noise, timesteps)
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=combined, added_cond_kwargs=y_inputs).sample
            loss = F.mse_loss(prediction.float(), draw.noise.float())
            if self.masked:
                loss = loss + OVERLAP_WEIGHT * self.overlap()
            loss.backward()
            if step % period == 1:
                with torch.no_grad():
                    self.select()
            elif self.masked:
                for p in self.params.values():
                    for role in ("content", "style"):
                        p[f"merge_{role}"].grad *= p["mask_content"] & p["mask_style"]
            torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p in self.params.values():
                    p["merge_content"].clamp_(0, 1)
                    p["merge_style"].clamp_(0, 1)
            losses.append(loss.item())
        return losses
