"""UnZipLoRA's merged inference written from the official processor on diffusers' UNet: the
reference tests/test_unzip_recombine.py compares the pack's recombination with.

It ports changLiu77/UnZipLoRA (0dc1800) ``unziplora_unet/attention_processor.py``
``AttnProcessor2_0.__call__`` (the parts SDXL's transformer attention uses: no spatial or group
norm, no mask, no residual), ``unziplora_unet/lora.py`` ``LoRACompatibleLinear.forward``
(``super().forward(x) + scale * lora_layer(x_1, x_2)``) and ``unziplora_linear_layer.py``
``UnZipLoRALinearLayerInfer.forward`` with ``forward_type="both"``
(``x_c @ (A_c^T B_c^T * m_c) + x_s @ (A_s^T B_s^T * m_s)``, the binary mask already in B). The
content and style embeddings travel as ``cross_attention_kwargs``, as the official UNet threads
them to every attention; in self-attention both are the hidden states. The one addition: each
LoRA's output times its strength (1 in the official code, whose only knob is a global scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class UnZipInferenceReference:
    """``content`` / ``style``: ``{diffusers module name: (down, up)}`` (mask baked into up);
    ``merger_content`` / ``merger_style``: ``{diffusers module name: merger}`` (missing: 1)."""

    def __init__(self, unet, content: dict, style: dict, merger_content: dict, merger_style: dict,
                 strengths: tuple[float, float] = (1.0, 1.0)):
        self.unet = unet
        self.loras = {"content": (content, merger_content), "style": (style, merger_style)}
        self.strengths = dict(zip(("content", "style"), strengths))
        unet.set_attn_processor({name: OfficialAttnProcessor(self, name.removesuffix(".processor"))
                                 for name in unet.attn_processors})

    def lora_layer(self, name: str, x_content: torch.Tensor, x_style: torch.Tensor) -> torch.Tensor:
        """``UnZipLoRALinearLayerInfer.forward`` ("both") for the linear ``name``."""
        added = 0
        for role, hidden in (("content", x_content), ("style", x_style)):
            factors, mergers = self.loras[role]
            if name not in factors:
                continue
            down, up = factors[name]
            merged_weight = down.float().T @ up.float().T
            merger = mergers.get(name, torch.ones(up.shape[0]))
            added = added + self.strengths[role] * (hidden @ (merged_weight * merger.float()))
        return added

    def linear(self, module, name: str, hidden, hidden_1, hidden_2):
        """``LoRACompatibleLinear.forward`` at scale 1."""
        return F.linear(hidden, module.weight, module.bias) + self.lora_layer(name, hidden_1, hidden_2)


class OfficialAttnProcessor:
    def __init__(self, reference: UnZipInferenceReference, attention_name: str):
        self.reference, self.name = reference, attention_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 encoder_hidden_states_content=None, encoder_hidden_states_style=None):
        linear, name = self.reference.linear, self.name
        batch_size = hidden_states.shape[0]
        query = linear(attn.to_q, f"{name}.to_q", hidden_states, hidden_states, hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
            encoder_hidden_states_content = hidden_states
            encoder_hidden_states_style = hidden_states
        key = linear(attn.to_k, f"{name}.to_k", encoder_hidden_states, encoder_hidden_states_content,
                     encoder_hidden_states_style)
        value = linear(attn.to_v, f"{name}.to_v", encoder_hidden_states, encoder_hidden_states_content,
                       encoder_hidden_states_style)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = linear(attn.to_out[0], f"{name}.to_out.0", hidden_states, hidden_states, hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor


def streams(call_chunks: tuple[int, ...], prompt: torch.Tensor, batch: int) -> torch.Tensor:
    """The pipeline's ``prompt_embeds_content`` / ``_style`` for one batched call: the prompt on
    cond chunks, zeros on uncond chunks (``force_zeros_for_empty_prompt``, no negative given)."""
    per_chunk = batch // len(call_chunks)
    return torch.cat([prompt.expand(per_chunk, -1, -1) if chunk == 0 else torch.zeros_like(prompt).expand(per_chunk, -1, -1)
                      for chunk in call_chunks])
