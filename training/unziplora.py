"""UnZipLoRA: a content LoRA and a style LoRA trained jointly, kept apart three ways.

Written from the official code (changLiu77/UnZipLoRA, ``unziplora_linear_layer.py`` and the
loop in ``train_unziplora.py``); ``../shared/reference/unziplora.md`` has every detail.

- **Prompts**: in cross-attention ``to_k``/``to_v`` the base weight sees the combined prompt,
  the content LoRA the content prompt, the style LoRA the style prompt.
- **Columns** (output features, rows of ``up``): each period, the columns whose importance
  ("cone": fraction of input rows with ``|W * G| > threshold``) is in the top ``column_ratio``
  are added to a binary mask; the style LoRA avoids the content LoRA's columns. Learnable
  mergers (one weight per column, clamped to [0, 1]) train only where the masks overlap, and
  a 0.5-weighted overlap term pushes them apart.
- **Blocks**: in style-sensitive blocks the style LoRA uses every column (only content is
  sparse), in content-sensitive blocks the other way round; elsewhere both are sparse.

Column choice and precision: the official script scores columns on fp16 gradients still
multiplied by the gradient scaler's loss scale (2^16 at the start), against 1e-5. This pack
scores unscaled gradients against ``1e-5 / 2^16``, so fp16, bf16 and fp32 runs pick the
columns the official run picks while its scale is at the initial 2^16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core import column_masks, lora_format, sdxl_unet
from ..core.lora_format import LoraWeights
from ..core.lora_layer import LoraLayer
from ..methods.sdxl import UNZIPLORA
from .job import LoraFile, OutputFiles, TrainingJob, blocks_of, file_metadata
from .trainer import TrainConfig, TrainingMethod

_PUBLISHED = UNZIPLORA.recipe.settings
OFFICIAL_INITIAL_LOSS_SCALE = 2.0 ** 16
UNSCALED_CONE_THRESHOLD = _PUBLISHED["cone_threshold"] / OFFICIAL_INITIAL_LOSS_SCALE
ROLES = ("content", "style")
SPARSE_ONLY = UNZIPLORA.block_roles
"""Block separation: the LoRA that gets a sparse mask in each block (the registry's record says
which); blocks not listed (down path, middle) are shared: both sparse."""


@dataclass(frozen=True)
class UnZipConfig:
    """UnZipLoRA's own settings; the defaults are the official ones (``methods.sdxl.UNZIPLORA``)."""

    sample_times: int = _PUBLISHED["sample_times"]
    column_ratio: float = _PUBLISHED["column_ratio"]
    merger_learning_rate: float = _PUBLISHED["merger_learning_rate"]
    style_learning_rate: float = _PUBLISHED["style_learning_rate"]
    overlap_weight: float = _PUBLISHED["overlap_weight"]
    prompt_separation: bool = True
    column_separation: bool = True
    block_separation: bool = True
    avoid_content_columns: bool = True
    cone_threshold: float = UNSCALED_CONE_THRESHOLD
    """On unscaled gradients; see the module docstring."""

    def __post_init__(self):
        if self.sample_times < 1:
            raise ValueError(f"sample_times must be at least 1, got {self.sample_times}.")
        if not 0 < self.column_ratio <= 1:
            raise ValueError(f"column_ratio must be in (0, 1], got {self.column_ratio}.")


class UnZipLayer(LoraLayer):
    """The two LoRAs of one linear layer (adapters ``content`` and ``style``, scale 1), their
    mergers and column masks."""

    def __init__(self, out_features: int, in_features: int, rank: int, sparse_only: str | None = None):
        super().__init__()
        for role in ROLES:
            self.add_trainable(role, out_features, in_features, rank)
            setattr(self, f"merge_{role}", nn.Parameter(torch.ones(out_features)))
            self.register_buffer(f"mask_{role}", torch.zeros(out_features, dtype=torch.bool))
        self.sparse_only = sparse_only
        self.masked = False

    def reset(self, generator: torch.Generator) -> None:
        """Official init: both factors of both LoRAs ~ normal(std 1/rank), mergers 1."""
        with torch.no_grad():
            for role in ROLES:
                for param in self.factors(role):
                    param.copy_(torch.randn(param.shape, generator=generator) / self.rank_of(role))

    def merger(self, role: str) -> nn.Parameter:
        """One weight per output feature (column), trained where the masks overlap."""
        return getattr(self, f"merge_{role}")

    def mask(self, role: str) -> torch.Tensor:
        """The binary column mask (a buffer: it moves with the layer and is not trained)."""
        return getattr(self, f"mask_{role}")

    def column_weights(self, role: str) -> torch.Tensor:
        """Per output feature: merger, times the binary mask while masking is on."""
        return self.merger(role) * self.mask(role) if self.masked else self.merger(role)

    def column_weighted_delta(self, role: str) -> torch.Tensor:
        """(out, in) weight change of one LoRA, columns weighted (under the ambient autocast, as
        the official layer)."""
        return self.delta(role, float32=False) * self.column_weights(role)[:, None]

    def column_weighted_output(self, inputs: torch.Tensor, role: str) -> torch.Tensor:
        return inputs @ self.column_weighted_delta(role).to(inputs.dtype).t()

    def merger_overlap(self) -> torch.Tensor:
        """Mean |m_c b_c * m_s b_s| (without the masks before masking starts)."""
        return (self.column_weights("content") * self.column_weights("style")).abs().mean()

    def column_scores(self, role: str, threshold: float) -> torch.Tensor:
        """Per output feature, the fraction of input rows where |W * G| > threshold, with W the
        LoRA's product and G its gradient (product rule over both factors, times the merger)."""
        down, up = self.factors(role)
        merger = self.merger(role)
        weight = down.detach().t() @ up.detach().t()
        gradient = torch.zeros_like(weight)
        if down.grad is not None:
            gradient += down.grad.t() @ up.detach().t()
        if up.grad is not None:
            gradient += down.detach().t() @ up.grad.t()
        gradient = gradient * merger.detach()
        if merger.grad is not None:
            gradient += weight * merger.grad
        return ((weight * gradient).abs() > threshold).float().mean(dim=0)

    def select_columns(self, column_ratio: float, threshold: float, avoid: bool) -> None:
        """Grow the masks with this step's most important columns (strictly above the k-th
        score, as the official code; masks only grow)."""
        count = int(self.mask_content.shape[0] * column_ratio)

        def top(scores: torch.Tensor) -> torch.Tensor:
            if count == 0:
                return torch.zeros_like(scores, dtype=torch.bool)
            return scores > torch.topk(scores, count).values.min()

        scores = {role: self.column_scores(role, threshold) for role in ROLES}
        if self.sparse_only is None:
            self.mask_content |= top(scores["content"])
            style_scores = scores["style"].clone()
            if avoid:
                style_scores[self.mask_content] = float("-inf")
            self.mask_style |= top(style_scores)
        else:
            sparse = self.sparse_only
            full = "content" if sparse == "style" else "style"
            self.mask(sparse).logical_or_(top(scores[sparse]))
            self.mask(full).fill_(True)
        self.masked = True

    def keep_merger_gradients_on_overlap(self) -> None:
        overlap = self.mask_content & self.mask_style
        for role in ROLES:
            merger = self.merger(role)
            if merger.grad is not None:
                merger.grad *= overlap

    def clamp_mergers(self) -> None:
        with torch.no_grad():
            for role in ROLES:
                self.merger(role).clamp_(0, 1)

    def saved_factors(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as saved: the binary mask baked into up's rows while masking is on (as the
        official files), the merger kept apart."""
        down, up = (p.detach().float().cpu() for p in self.factors(role))
        if self.masked:
            up = up * self.mask(role).float().cpu()[:, None]
        return down.clone(), up.clone()


class UnZipLinear(nn.Module):
    """A frozen linear layer plus its two LoRAs: ``W0 x + ΔW_c x_c + ΔW_s x_s``.

    ``content_input`` / ``style_input`` (the content and style prompts' token embeddings) replace
    the layer's input for that LoRA: prompt separation, used on cross-attention ``to_k``/``to_v``.
    """

    def __init__(self, base: nn.Module, layer: UnZipLayer, content_input: torch.Tensor | None = None,
                 style_input: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.layer = layer
        self.content_input = content_input
        self.style_input = style_input

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        content_in = inputs if self.content_input is None else self.content_input.to(inputs).expand_as(inputs)
        style_in = inputs if self.style_input is None else self.style_input.to(inputs).expand_as(inputs)
        output = self.base(inputs)
        return output + (self.layer.column_weighted_output(content_in, "content")
                         + self.layer.column_weighted_output(style_in, "style")).to(output.dtype)


PROMPT_SEPARATED = ("attn2.to_k", "attn2.to_v")


def make_layers(shapes: dict[str, tuple[int, int]], rank: int, config: UnZipConfig, seed: int) -> dict[str, UnZipLayer]:
    """One UnZipLayer per target layer (sorted by path), with the official init from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path in sorted(shapes):
        layers[path] = UnZipLayer(*shapes[path], rank, sparse_only_for(path, config))
        layers[path].reset(generator)
    return layers


def module_wrappers(layers: dict[str, UnZipLayer], contexts: dict[str, torch.Tensor], config: UnZipConfig) -> dict:
    """``path -> (base module -> UnZipLinear)``; cross-attention k/v see the role prompts."""

    def wrap(path):
        separated = config.prompt_separation and path.endswith(PROMPT_SEPARATED)
        content, style = (contexts["content"], contexts["style"]) if separated else (None, None)
        return lambda base: UnZipLinear(base, layers[path], content, style)

    return {path: wrap(path) for path in layers}


def sparse_only_for(path: str, config: UnZipConfig) -> str | None:
    return SPARSE_ONLY.get(sdxl_unet.block_of(path)) if config.block_separation else None


def period_length(steps: int, config: UnZipConfig) -> int:
    return math.ceil(steps / config.sample_times)


def masked_at(step: int, steps: int, config: UnZipConfig) -> bool:
    """Whether the forward of ``step`` (0-based) uses masks and trains mergers: not at step 0,
    nor right after a period starts (masks are dropped, then re-chosen from that step's grads)."""
    if not config.column_separation:
        return False
    period = period_length(steps, config)
    return not (step == 0 or step % period == 1)


class UnZipMethod(TrainingMethod):
    """The UnZipLoRA parts of a training step."""

    def __init__(self, layers: dict[str, UnZipLayer], steps: int, learning_rate: float, config: UnZipConfig):
        self.layers = layers
        self.steps = steps
        self.learning_rate = learning_rate
        self.config = config
        self.modules = nn.ModuleList(layers[p] for p in sorted(layers))

    def parameter_groups(self) -> list[dict]:
        layers = list(self.modules)
        return [
            {"params": [p for l in layers for p in l.factors("content")], "lr": self.learning_rate},
            {"params": [p for l in layers for p in l.factors("style")], "lr": self.config.style_learning_rate},
            {"params": [l.merger(r) for l in layers for r in ROLES], "lr": self.config.merger_learning_rate},
        ]

    def before_step(self, step: int) -> None:
        masked = masked_at(step, self.steps, self.config)
        for layer in self.modules:
            layer.masked = masked
            for role in ROLES:
                layer.merger(role).requires_grad_(masked)

    def extra_loss(self, step: int) -> torch.Tensor | None:
        if not masked_at(step, self.steps, self.config) or self.config.overlap_weight == 0:
            return None
        return self.config.overlap_weight * torch.stack([l.merger_overlap() for l in self.modules]).mean()

    def after_backward(self, step: int) -> None:
        """On unscaled gradients, before clipping: choose columns or limit merger gradients."""
        if not self.config.column_separation:
            return
        period = period_length(self.steps, self.config)
        if step % period == 1:
            with torch.no_grad():
                for layer in self.modules:
                    layer.select_columns(self.config.column_ratio, self.config.cone_threshold,
                                         self.config.avoid_content_columns)
        elif masked_at(step, self.steps, self.config):
            for layer in self.modules:
                layer.keep_merger_gradients_on_overlap()

    def after_update(self, step: int) -> None:
        for layer in self.modules:
            layer.clamp_mergers()

    def finish(self) -> None:
        """The saved state is the masked one, as the official script saves it."""
        for layer in self.modules:
            layer.masked = self.config.column_separation


def role_weights(layers: dict[str, UnZipLayer], role: str) -> LoraWeights:
    """One LoRA as saved: masks baked into ``up`` (as the official files), scale 1."""
    trained = {}
    for path, layer in layers.items():
        down, up = layer.saved_factors(role)
        trained[path] = LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
    return LoraWeights(trained)


def mergers(layers: dict[str, UnZipLayer], role: str) -> dict[str, torch.Tensor]:
    return {path: layer.merger(role).detach().float().cpu() for path, layer in layers.items()}


def unziplora_job(config: TrainConfig, files: OutputFiles, shapes: dict[str, tuple[int, int]],
                  contexts: dict[str, torch.Tensor], settings: UnZipConfig, prompt: str) -> TrainingJob:
    """Two LoRAs trained jointly (``files.roles`` = ``ROLES``); each file carries its mergers in
    its metadata, so that its tensors stay a plain LoRA every loader reads."""
    layers = make_layers(shapes, config.rank, settings, config.seed)
    method = UnZipMethod(layers, config.steps, config.learning_rate, settings)
    blocks = blocks_of(shapes)

    def build(config: TrainConfig, role: str) -> LoraFile:
        metadata = {**file_metadata(UNZIPLORA, config, blocks, prompt), "unziplora.role": role,
                    column_masks.MERGERS_METADATA_KEY: column_masks.mergers_to_metadata(mergers(layers, role))}
        return lora_format.to_kohya_state_dict(role_weights(layers, role)), metadata

    return TrainingJob(UNZIPLORA, config, files, method.modules, build, training_method=method,
                       module_wrappers=module_wrappers(layers, contexts, settings))
