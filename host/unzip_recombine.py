"""UnZipLoRA recombination on a model clone, for UnZip Column Mask Merge and Train UnZipLoRA's
MODEL output (``core/unzip_recombine.py`` has the official inference it follows).

Without separate prompts: ``W0 + s_c diag(m_c) B_c A_c + s_s diag(m_s) B_s A_s`` as plain weight
patches (every layer sees one prompt). With them: the same plain patches everywhere except
cross-attention ``to_k`` / ``to_v``, whose ``forward`` (an object patch, the module patch kind the
trainer's ``module_wrappers`` use) adds each LoRA's delta to what it sees: its own prompt on the
cond half of the batch, zeros on the uncond half, as the official pipeline.
"""

from __future__ import annotations

import functools

import torch

from ..core.lora_format import LoraWeights
from ..core.unzip_recombine import PromptSeparatedLoRA, PromptStreams
from ..training.unziplora import PROMPT_SEPARATED
from . import model as host_model, step_patches

WRAPPER_KEY = "blora_unziplora_prompt_separation"


def prompt_context(model, conditioning, what: str) -> torch.Tensor | None:
    """The token embeddings of a one-prompt CONDITIONING (None for None), checked against the model."""
    if conditioning is None:
        return None
    if not conditioning or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        found = "nothing" if not conditioning else f"{len(conditioning)} conditioning(s) of batch {conditioning[0][0].shape[0]}"
        raise ValueError(f"The {what} conditioning must be one prompt (e.g. 'A monadikos cat' for content); it holds "
                         f"{found}. Connect one text encoder's output, not a combined conditioning.")
    context = conditioning[0][0]
    features = model.model.model_config.unet_config["context_dim"]
    if context.shape[-1] != features:
        raise ValueError(f"The {what} conditioning has {context.shape[-1]} features per token but this model expects "
                         f"{features}: it was encoded by another model's text encoder.")
    return context


def recombined(model, weights: dict[str, LoraWeights], strengths: dict[str, float] | None = None,
               contexts: dict[str, torch.Tensor | None] | None = None):
    """A clone of ``model`` with each role's LoRA (``weights``: role -> layers, mergers already
    in ``up``) added at its strength; roles with a context in ``contexts`` see it in
    cross-attention keys and values."""
    strengths = strengths or {}
    contexts = {role: c for role, c in (contexts or {}).items() if c is not None}
    separated = {role: {p: l for p, l in w.layers.items() if role in contexts and p.endswith(PROMPT_SEPARATED)}
                 for role, w in weights.items()}
    patched = model
    for role, role_weights in weights.items():
        host_model.check_shapes(model, role_weights)
        plain = LoraWeights({p: l for p, l in role_weights.layers.items() if p not in separated[role]},
                            dict(role_weights.metadata))
        if plain.layers:
            patched = host_model.patched_clone(patched, plain, strengths.get(role, 1.0))
    paths = sorted(set().union(*(layers.keys() for layers in separated.values())))
    if not paths:
        return patched if patched is not model else model.clone()
    streams = PromptStreams(contexts)
    layers = {}
    for path in paths:
        deltas = [(role, functools.partial(separated[role][path].lora_output, strength=strengths.get(role, 1.0)))
                  for role in weights if path in separated[role]]
        layers[path] = functools.partial(PromptSeparatedLoRA, deltas=deltas, streams=streams)
    return step_patches.clone_with_step_layers(patched, layers, streams, WRAPPER_KEY)
