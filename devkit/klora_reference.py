"""K-LoRA written from the official code's equations on diffusers' UNet: the reference
tests/test_klora.py compares K-LoRA Fuse with.

It follows HVision-NKU/K-LoRA (893d0f9) line by line, with nothing of the pack:
``get_ratio_between_content_and_style`` (per layer, in the files' sorted key order, Σ|ΔW_c| /
Σ|ΔW_s| via ``.item()``, mean, ratios ≥ 3× the mean dropped, mean) and
``KLoRALinearLayer.forward`` / ``get_klora_weight``: every call of every attention projection
increments one counter, then recomputes both products, their top-k sums (k = rank_c · rank_s),
``scale = alpha * (t % T) / T + beta`` (``% alpha`` for ``s*``), divides and compares as tensors,
and adds ``F.linear(x, chosen)`` to the frozen layer's output (``LoRACompatibleLinear``).
The one addition the pack documents: each product carries its file's alpha/rank scale (1 in
the official files), and the chosen product is multiplied by its strength (1 in the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KLoRAReference:
    """Forward hooks on the diffusers UNet's attention projections.

    ``content`` / ``style``: ``{diffusers module name: (down, up, scale)}`` of the same layers.
    """

    def __init__(self, unet, content: dict, style: dict, alpha: float, beta: float, sum_timesteps: int,
                 pattern: str = "s*", strengths: tuple[float, float] = (1.0, 1.0)):
        assert content.keys() == style.keys()
        self.content, self.style = content, style
        self.alpha, self.beta, self.sum_timesteps, self.pattern = alpha, beta, sum_timesteps, pattern
        self.strengths = strengths
        self.glo_count = 0
        self.choices: list[bool] = []
        self.average_ratio = self.get_ratio_between_content_and_style()
        self.handles = [unet.get_submodule(name).register_forward_hook(self.hook(name)) for name in content]

    @staticmethod
    def product(down, up, scale):
        return scale * (up.float() @ down.float())

    def get_ratio_between_content_and_style(self) -> float:
        comparison_results = []
        for name in sorted(self.content):
            content_abs = torch.abs(self.product(*self.content[name])).sum().item()
            style_abs = torch.abs(self.product(*self.style[name])).sum().item()
            comparison_results.append(content_abs / style_abs)
        average_ratio = sum(comparison_results) / len(comparison_results)
        comparison_results = [result for result in comparison_results if result < 3 * average_ratio]
        return sum(comparison_results) / len(comparison_results) if comparison_results else float("inf")

    def get_klora_weight(self, name: str, timestep: int) -> torch.Tensor:
        down_1, up_1, scale_1 = self.content[name]
        down_2, up_2, scale_2 = self.style[name]
        k = up_1.shape[1] * up_2.shape[1]
        time_ratio = timestep % self.sum_timesteps
        matrix1 = self.product(down_1, up_1, scale_1)
        top_k_sum1 = torch.topk(torch.abs(matrix1).flatten(), k)[0].sum()
        matrix2 = self.product(down_2, up_2, scale_2)
        top_k_sum2 = torch.topk(torch.abs(matrix2).flatten(), k)[0].sum()
        scale = self.alpha * time_ratio / self.sum_timesteps + self.beta
        if self.pattern == "s*":
            scale = scale % self.alpha
        top_k_sum1 = top_k_sum1 / self.average_ratio
        top_k_sum2 = top_k_sum2 * scale
        temp_ratio = top_k_sum1 / top_k_sum2
        chose_content = bool(temp_ratio > 1)
        self.choices.append(chose_content)
        return self.strengths[0] * matrix1 if chose_content else self.strengths[1] * matrix2

    def hook(self, name: str):
        def add_klora(module, inputs, output):
            self.glo_count += 1
            weight = self.get_klora_weight(name, self.glo_count)
            return output + F.linear(inputs[0].float(), weight).to(output.dtype)

        return add_klora

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
