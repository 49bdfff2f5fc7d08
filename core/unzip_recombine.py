"""UnZipLoRA's recombination as the official inference runs it: prompt-separated.

The official pipeline (changLiu77/UnZipLoRA ``infer.py --with_unziplora``,
``StableDiffusionXLUnZipLoRAPipeline`` and its ``AttnProcessor2_0`` / ``LoRACompatibleLinear`` /
``UnZipLoRALinearLayerInfer`` "both" forward) keeps the training's prompt separation: in
cross-attention ``to_k`` / ``to_v`` the base weight sees the combined prompt, the content LoRA
the content prompt and the style LoRA the style prompt,

    W0 x + (x_c (B_c A_c)^T) ⊙ m_c + (x_s (B_s A_s)^T) ⊙ m_s      (m: per-output-feature mergers).

Under classifier-free guidance the content and style streams of the negative half are zeros
(the pipeline's ``force_zeros_for_empty_prompt`` with no ``negative_prompt_content`` /
``_style``), so there the LoRAs add nothing to the keys and values. Every other layer sees the
same input three times, so it is an ordinary weight merge. Only when the three prompts are
equal does a plain merge of both deltas into the weights give the official result.

This module holds the layers for ``to_k`` / ``to_v``: a :class:`PromptStreams` listener keeps,
for each model call, what each LoRA sees (its prompt on the batch's cond chunks, zeros on the
uncond chunks), and :class:`PromptSeparatedLoRA` is the layer's ``forward``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .step_lora import UNCOND, LowRankOutput, SamplingCall, StepListener


class PromptStreams(StepListener):
    """Per role ("content", "style"), the tokens its LoRA sees in cross-attention during the
    current model call; a role without a prompt sees the layer's own input (the combined prompt)."""

    def __init__(self, contexts: dict[str, torch.Tensor | None]):
        for role, context in contexts.items():
            if context is not None and (context.ndim != 3 or context.shape[0] != 1):
                raise ValueError(f"The {role} prompt must be one prompt's token embeddings (1, tokens, features); "
                                 f"got a tensor of shape {tuple(context.shape)}.")
        self.contexts = {role: c.detach() for role, c in contexts.items() if c is not None}
        self.chunks: tuple[int, ...] = ()
        self._built: dict = {}

    def begin_call(self, call: SamplingCall) -> None:
        self.chunks = call.chunks
        self._built = {}

    def end_run(self) -> None:
        self._built = {}

    def inputs_for(self, role: str, inputs: torch.Tensor) -> torch.Tensor:
        context = self.contexts.get(role)
        if context is None:
            return inputs
        key = (role, tuple(inputs.shape), inputs.device, inputs.dtype)
        if key not in self._built:
            self._built[key] = self._stream(role, context, inputs)
        return self._built[key]

    def _stream(self, role: str, context: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        batch, tokens, features = inputs.shape
        if context.shape[-1] != features:
            raise ValueError(f"The {role} prompt has {context.shape[-1]} features per token but the model's "
                             f"cross-attention takes {features}: encode it with the same SDXL checkpoint's CLIP.")
        if tokens % context.shape[1]:
            raise ValueError(
                f"The {role} prompt is {context.shape[1]} tokens long but the sampled prompt {tokens}: ComfyUI "
                "encodes prompts in chunks of 77 tokens, and the content and style prompts must not need more "
                "chunks than the combined prompt. Shorten the content / style prompt."
            )
        prompt = context.to(device=inputs.device, dtype=inputs.dtype).repeat(1, tokens // context.shape[1], 1)
        chunks = self.chunks if self.chunks and batch % len(self.chunks) == 0 else ()
        if not chunks:
            return prompt.expand(batch, tokens, features)
        per_chunk = batch // len(chunks)
        zeros = torch.zeros(per_chunk, tokens, features, device=inputs.device, dtype=inputs.dtype)
        return torch.cat([zeros if chunk == UNCOND else prompt.expand(per_chunk, tokens, features)
                          for chunk in chunks])


class PromptSeparatedLoRA:
    """The ``forward`` of a cross-attention ``to_k`` / ``to_v``: base output plus each LoRA's
    delta applied to what that LoRA sees."""

    def __init__(self, base: Callable, deltas: list[tuple[str, LowRankOutput]], streams: PromptStreams):
        self.base = base
        self.deltas = deltas
        self.streams = streams

    def __call__(self, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self.base(inputs, *args, **kwargs)
        for role, delta in self.deltas:
            output = output + delta(self.streams.inputs_for(role, inputs)).to(output.dtype)
        return output
