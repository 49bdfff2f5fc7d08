"""SplitFlux: content and style from one image on FLUX.1's single-stream blocks (host-free math).

Written from the paper's equations (``../shared/reference/splitflux.md`` §1; every number is
in the registry record ``methods.flux.SPLITFLUX``). On each trained single block, LoRAs on the
attention q, k, v projections (rows [0:h], [h:2h], [2h:3h] of ComfyUI's fused ``linear1``):

- **content** blocks (single 0-9): a Visual-Gated LoRA, a main branch (rank 48, A/B) and a
  residual one (rank 16, C/D); per token n of the image, gate
  ``g_n = sigmoid((||e_n||_2 - mu) / sigma)`` over the image tokens' features e (the layer's
  input, mu and sigma over the image's tokens), and ``h_n = W x_n + g_n B A x_n + (1 - g_n) D C x_n``.
  An optional mask (the subject) replaces the gate. Complementary loss, weight lambda:
  ``||A C^T||_F^2 + ||B^T D||_F^2 + sum |BA ⊙ DC|``, summed over the content layers.
- **RCA** blocks (single 10-11): rank 64 / alpha = 32 with the delta scaled by alpha = 2
  (a LoraLayer with alpha 64: scaling 2).
- **style** blocks (single 12-37): rank 64; they see the style prompt's text tokens
  (``StylePromptStreams``: prompt replacement).

Choices the paper leaves open are marked in the registry's sources ("this pack").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from ..core import flux_blocks
from ..core.flux_lora import MAIN_RANK_METADATA_KEY
from ..core.lora_layer import LoraLayer
from ..methods.flux import SPLITFLUX
from .job import LoraFile, OutputFiles, TrainingJob, file_metadata
from .lora_adapters import reset_official
from .trainer import TrainConfig, TrainingMethod

_PUBLISHED = SPLITFLUX.recipe.settings
ROLES = ("content", "style")
"""The files a run writes: ``<name>_content`` (content + residual + RCA blocks) and ``<name>_style``."""
GROUP_ADAPTERS = {"content": ("main", "residual"), "rca": ("rca",), "style": ("style",)}
PROJECTIONS = tuple(p.split(".")[-1] for p in SPLITFLUX.layers.projections)
"""``to_q``, ``to_k``, ``to_v``: their order is ``linear1``'s row order."""


@dataclass(frozen=True)
class SplitFluxSettings:
    """SplitFlux's own numbers; the defaults are the paper's (``methods.flux.SPLITFLUX``)."""

    content_rank: int = _PUBLISHED["content_rank"]
    residual_rank: int = _PUBLISHED["residual_rank"]
    rca_rank: int = _PUBLISHED["rca_rank"]
    rca_scale: float = _PUBLISHED["rca_scale"]
    style_rank: int = _PUBLISHED["style_rank"]
    complementary_weight: float = _PUBLISHED["complementary_weight"]
    text_token_gate: float = _PUBLISHED["text_token_gate"]
    gate_std_correction: int = _PUBLISHED["gate_std_correction"]
    prompt_replacement: bool = _PUBLISHED["prompt_replacement"]

    def __post_init__(self):
        for name in ("content_rank", "residual_rank", "rca_rank", "style_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.text_token_gate <= 1:
            raise ValueError(f"text_token_gate must be in [0, 1], got {self.text_token_gate}.")

    def adapters(self, group: str) -> dict[str, tuple[int, float | None]]:
        """adapter -> (rank, alpha) of a group's layers (alpha None: scale 1)."""
        return {"content": {"main": (self.content_rank, None), "residual": (self.residual_rank, None)},
                "rca": {"rca": (self.rca_rank, self.rca_scale * self.rca_rank)},
                "style": {"style": (self.style_rank, None)}}[group]


def group_of(block: str) -> str:
    """``content``, ``rca`` or ``style`` of ``single_blocks.i`` (the registry's block roles)."""
    return SPLITFLUX.block_roles[block]


@dataclass
class TokenLayout:
    """What the layers need to know of the sequence they run on, set by the caller before each
    forward: how many text tokens lead the joint sequence (ComfyUI: txt first), and an optional
    mask per image token (B or 1, N) replacing the computed gate."""

    text_tokens: int = 0
    mask: torch.Tensor | None = None


def visual_gate(features: torch.Tensor, layout: TokenLayout, settings: SplitFluxSettings) -> torch.Tensor:
    """(B, L, 1) gate per token of the joint sequence: ``text_token_gate`` on the text tokens,
    on image token n ``sigmoid((||e_n|| - mu) / sigma)`` (mu, sigma over the image's tokens) or
    the mask. A saliency weight, not trained through (computed on detached features)."""
    text = layout.text_tokens
    image = features[:, text:].detach().float()
    if layout.mask is not None:
        gate = layout.mask.to(image).expand(image.shape[0], -1)
        if gate.shape[1] != image.shape[1]:
            raise ValueError(f"The mask covers {gate.shape[1]} image tokens but the image has {image.shape[1]}.")
    else:
        norms = image.norm(dim=-1)
        mu = norms.mean(dim=1, keepdim=True)
        sigma = norms.std(dim=1, keepdim=True, correction=settings.gate_std_correction)
        gate = torch.sigmoid((norms - mu) / sigma)
    text_gate = torch.full((image.shape[0], text), settings.text_token_gate, dtype=gate.dtype, device=gate.device)
    return torch.cat([text_gate, gate], dim=1)[..., None].to(features.dtype)


def layer_output(layer: LoraLayer, group: str, inputs: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """One projection's LoRA output for every token (the gated mix on content layers)."""
    if group == "content":
        return gate * layer.trained_output(inputs, "main") + (1 - gate) * layer.trained_output(inputs, "residual")
    (adapter,) = GROUP_ADAPTERS[group]
    return layer.trained_output(inputs, adapter)


class SplitFluxLinear1(nn.Module):
    """ComfyUI's fused ``linear1`` of one single block plus SplitFlux's q/k/v LoRAs: the base
    output, with the LoRA outputs added (out of place) to its first 3h rows."""

    def __init__(self, base: nn.Module, layers: list[LoraLayer], group: str, layout: TokenLayout,
                 settings: SplitFluxSettings):
        super().__init__()
        self.base = base
        self.layers = layers  # not registered: owned (and moved, saved) by the job's trainable module
        self.group = group
        self.layout = layout
        self.settings = settings

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.base(inputs)
        gate = visual_gate(inputs, self.layout, self.settings) if self.group == "content" else None
        delta = torch.cat([layer_output(layer, self.group, inputs, gate) for layer in self.layers], dim=-1)
        qkv = delta.shape[-1]
        return torch.cat([output[..., :qkv] + delta.to(output.dtype), output[..., qkv:]], dim=-1)


class InputCopy(nn.Module):
    """A module run on a copy of its input: a single block's ``pre_norm``, whose input the block
    then changes in place (``x += ...``), which would break the backward of anything before it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(inputs.clone())


class SplitFluxLayers(nn.Module):
    """Every trained layer: one LoraLayer per (single block, projection), in block order."""

    def __init__(self, hidden_size: int, settings: SplitFluxSettings):
        super().__init__()
        self.blocks = [b for b in SPLITFLUX.layers.blocks]
        self.targets = [(block, projection) for block in self.blocks for projection in PROJECTIONS]
        self.layers = nn.ModuleList(LoraLayer() for _ in self.targets)
        for (block, _), layer in zip(self.targets, self.layers):
            for adapter, (rank, alpha) in settings.adapters(group_of(block)).items():
                layer.add_trainable(adapter, hidden_size, hidden_size, rank, alpha)

    def of_block(self, block: str) -> list[LoraLayer]:
        return [layer for (b, _), layer in zip(self.targets, self.layers) if b == block]

    def items(self):
        return zip(self.targets, self.layers)

    def reset(self, seed: int) -> None:
        """diffusers' peft "gaussian" init, every adapter: down ~ normal(std 1/rank), up = 0."""
        generator = torch.Generator().manual_seed(seed)
        for (block, _), layer in self.items():
            for adapter in GROUP_ADAPTERS[group_of(block)]:
                reset_official(layer, generator, adapter)


def complementary_loss(layers: list[LoraLayer]) -> torch.Tensor:
    """``sum over layers of ||A C^T||_F^2 + ||B^T D||_F^2 + sum |BA ⊙ DC|`` (A, B: the main
    branch's down and up; C, D: the residual's), in float32."""
    total = []
    for layer in layers:
        a, b = (f.float() for f in layer.factors("main"))
        c, d = (f.float() for f in layer.factors("residual"))
        overlap = (layer.delta("main") * layer.delta("residual")).abs().sum()
        total.append((a @ c.t()).square().sum() + (b.t() @ d).square().sum() + overlap)
    return torch.stack(total).sum()


class SplitFluxMethod(TrainingMethod):
    """The reconstruction loss plus lambda times the complementary loss of the content layers."""

    def __init__(self, trained: SplitFluxLayers, learning_rate: float, settings: SplitFluxSettings):
        super().__init__(trained, learning_rate)
        self.content_layers = [layer for (block, _), layer in trained.items() if group_of(block) == "content"]
        self.weight = settings.complementary_weight

    def extra_loss(self, step: int) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        return self.weight * complementary_loss(self.content_layers)


class StylePromptStreams:
    """Prompt replacement: each style block runs on the text tokens the style prompt has at that
    block. A pass of the style prompt (``capturing``, no gradients) records them; the training
    pass puts them in place of its own text tokens before each style block. Used as the host's
    per-block replacement (``patch(index)`` returns ``fn(args, extra)`` of FLUX's
    ``("single_block", i)`` hook: ``args["img"]`` is the joint sequence, text first)."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.capturing = False
        self.text: dict[int, torch.Tensor] = {}

    def patch(self, index: int):
        def replace(args: dict, extra: dict) -> dict:
            joint = args["img"]
            text = self.layout.text_tokens
            if self.capturing:
                self.text[index] = joint[:, :text].detach().clone()  # the block adds to its input in place
                return extra["original_block"](args)
            style = self.text[index]
            if style.shape[1] != text:
                raise ValueError(f"The style prompt has {style.shape[1]} text tokens but the content prompt {text}; "
                                 "prompt replacement needs prompts of the same token length.")
            return extra["original_block"]({**args, "img": torch.cat([style.to(joint.dtype), joint[:, text:]], 1)})

        return replace


def module_wrappers(trained: SplitFluxLayers, layout: TokenLayout, settings: SplitFluxSettings) -> dict:
    """``path -> (base module -> wrapped)``: every trained block's ``linear1`` with its LoRAs,
    every single block's ``pre_norm`` on a copy of its input."""
    wrappers = {}
    for block in trained.blocks:
        wrappers[f"{block}.linear1"] = (lambda b: lambda base: SplitFluxLinear1(
            base, trained.of_block(b), group_of(b), layout, settings))(block)
    for index in range(flux_blocks.SINGLE_BLOCKS):
        wrappers[f"single_blocks.{index}.pre_norm"] = InputCopy
    return wrappers


def diffusers_prefix(block: str, projection: str) -> str:
    """``transformer.single_transformer_blocks.i.attn.to_q``: diffusers' FLUX LoRA naming, which
    ComfyUI maps onto the rows of ``linear1`` (``core.flux_blocks.lora_target``)."""
    index = int(block.split(".")[1])
    return "transformer." + flux_blocks.diffusers_single_qkv_name(index, projection)


def role_state_dict(trained: SplitFluxLayers, role: str) -> dict[str, torch.Tensor]:
    """The file of ``role`` in diffusers' FLUX LoRA naming, every layer at scale 1 (no alpha keys,
    so ComfyUI's loader and diffusers' agree): content = the main and residual branches stacked
    along the rank (main first) on the content blocks, and the RCA blocks with their scale folded
    into ``up``; style = the style blocks."""
    state = {}
    for (block, projection), layer in trained.items():
        group = group_of(block)
        if (group == "style") != (role == "style"):
            continue
        factors = [(layer.factors(a), layer.scaling(a)) for a in GROUP_ADAPTERS[group]]
        down = torch.cat([d.detach().float().cpu() for (d, _), _ in factors])
        up = torch.cat([u.detach().float().cpu() * scale for (_, u), scale in factors], dim=1)
        prefix = diffusers_prefix(block, projection)
        state[f"{prefix}.lora_A.weight"] = down.contiguous()
        state[f"{prefix}.lora_B.weight"] = up.contiguous()
    return state


def splitflux_job(config: TrainConfig, files: OutputFiles, hidden_size: int, settings: SplitFluxSettings,
                  prompt: str, layout: TokenLayout) -> TrainingJob:
    """The job of one run: the layers (initialised from the seed), the method's loss, the
    module wrappers, and the two files."""
    trained = SplitFluxLayers(hidden_size, settings)
    trained.reset(config.seed)
    method = SplitFluxMethod(trained, config.learning_rate, settings)

    def build(config: TrainConfig, role: str) -> LoraFile:
        blocks = [b for b in trained.blocks if (group_of(b) == "style") == (role == "style")]
        metadata = {**file_metadata(SPLITFLUX, config, blocks, prompt), "ss_base_model_version": "flux1",
                    "splitflux.role": role, "splitflux.settings": json.dumps(settings.__dict__, sort_keys=True)}
        if role == "content":
            metadata[MAIN_RANK_METADATA_KEY] = str(settings.content_rank)
        return role_state_dict(trained, role), metadata

    return TrainingJob(SPLITFLUX, config, files, trained, build, training_method=method,
                       module_wrappers=module_wrappers(trained, layout, settings))
