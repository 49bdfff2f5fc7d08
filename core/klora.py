"""K-LoRA: training-free fusion of a content (subject) LoRA and a style LoRA (Ouyang, Li, Hou;
CVPR 2025).

Written from the official code, newest version (HVision-NKU/K-LoRA 893d0f9): ``klora.py``
(``KLoRALinearLayer.get_klora_weight``), ``utils.py`` (``get_ratio_between_content_and_style``,
``insert_sd_klora_to_unet``) and the defaults of ``inference_sd.py``.

- Every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and ``attn2``)
  that both files change gets a K-LoRA layer. At each call it adds either the content delta
  or the style delta, whole: a hard switch per layer and call, never a blend.
- The balance γ, once per pair of files: per layer Σ|ΔW_c| / Σ|ΔW_s|, the mean of those
  ratios, the ratios at or above 3× that mean dropped, the mean of the rest.
- k = rank_c · rank_s; K_c, K_s = the sums of the k largest |ΔW| entries of each delta.
- S(t) = α (t mod T) / T + β, then S mod α for the pattern ``s*``. The layer uses the content
  delta when (K_c / γ) / (K_s · S) > 1, else the style delta, compared in float32 as the
  official code does. K_c, K_s and γ never change, so they are computed once, not per call.
- t and T (:data:`SCHEDULES`): ``official`` counts every K-LoRA layer call of the sampling run,
  T = 28000 (SDXL's 560 layers × 50 steps, cond and uncond in one batched call); ``normalized``
  takes t = step index × L + the layer's order within its model call (1-based) and T = steps
  × L, with L the K-LoRA layers, so S makes one cycle over any number of steps, whether cond
  and uncond are batched or not. At 50 batched steps with 560 layers the two are the same.

Where this differs from the official code, and why:

- ΔW includes the file's alpha/rank scale (the official code applies none; its files, like
  B-LoRA files, have no alpha, i.e. scale 1). ``content_strength`` / ``style_strength`` scale
  the chosen delta (ComfyUI's linear convention; the official code has no strength) and do not
  change the choice.
- The official code needs both files to hold every attention projection. Here a layer only one
  file changes gets that file's delta as a plain patch, and layers both change that are no
  attention projection (a kohya LoRA's feed-forward layers) get both deltas as plain patches;
  γ is taken over the layers that switch. Its layer order (for γ's float sums) is the official
  one: the files' sorted diffusers names.
- The official counter is a module-level global never reset between images (at its 50 steps a
  multiple of T, so each image starts the cycle again); here it starts at 0 with every sampling
  run, so an image never depends on what was sampled before.
- k is capped at the number of entries of the delta (the official code would fail); K_c, K_s
  are computed in float32 (the official code uses the file's dtype), and the chosen delta is
  applied as two thin products in the sampling dtype (the official code: the full matrix in the
  file's dtype).
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from ..methods.sdxl import K_LORA
from . import layer_sets, sdxl_unet
from .lora_format import LoraFormatError, LoraWeights
from .step_lora import LowRankOutput, SamplingCall, StepListener

PATTERNS = ("s*", "s")
SCHEDULES = ("normalized", "official")
DEFAULT_ALPHA = K_LORA.defaults["alpha"]
OFFICIAL_SUM_TIMESTEPS = K_LORA.defaults["sum_timesteps"]
"""``inference_sd.py``'s ``sum_timesteps``: 560 SDXL attention projections × 50 steps."""
OUTLIER_FACTOR = K_LORA.defaults["outlier_factor"]

_FLOAT32 = struct.Struct("f")


def default_beta(pattern: str, alpha: float) -> float:
    """``inference_sd.py`` (newest): β = 0.85 α for ``s*``, 0.5 for ``s``."""
    return K_LORA.defaults["beta_s*"] * alpha if pattern == "s*" else K_LORA.defaults["beta_s"]


@dataclass(frozen=True)
class KLoRASettings:
    pattern: str = K_LORA.defaults["pattern"]
    alpha: float = DEFAULT_ALPHA
    beta: float = 0.0
    """0: the pattern's default (:func:`default_beta`)."""
    schedule: str = SCHEDULES[0]

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"Unknown K-LoRA pattern {self.pattern!r}; expected one of {PATTERNS}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown K-LoRA schedule {self.schedule!r}; expected one of {SCHEDULES}.")
        if not self.alpha > 0:
            raise ValueError(f"K-LoRA alpha must be above 0 (the official default is {DEFAULT_ALPHA}); got {self.alpha}.")

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta != 0 else default_beta(self.pattern, self.alpha)


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def scale_at(t: int, sum_timesteps: int, alpha: float, beta: float, pattern: str) -> float:
    """The official ``scale``: α (t mod T) / T + β, mod α for ``s*`` (same operations, same order)."""
    time_ratio = t % sum_timesteps
    scale = alpha * time_ratio / sum_timesteps + beta
    if pattern == "s*":
        scale = scale % alpha
    return scale


def prefers_content(content_over_balance: float, style_top_k: float, scale: float) -> bool:
    """``(K_c / γ) / (K_s · S) > 1`` in float32 (``K_c / γ`` given already rounded, as
    the official tensor is). Float32 results of one operation on float32 operands equal the
    rounded double results, so this is exactly the official comparison."""
    denominator = float32(style_top_k * float32(scale))
    if denominator == 0:
        return content_over_balance > 0  # x / 0 = inf > 1; 0 / 0 = nan, not > 1
    return float32(content_over_balance / denominator) > 1


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest |entries| (k capped at the number of entries), in float32."""
    flat = delta.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def balance(ratios: list[float]) -> float:
    """γ from the per-layer ratios Σ|ΔW_c| / Σ|ΔW_s|: mean, outliers (≥ 3× mean) dropped, mean."""
    mean = sum(ratios) / len(ratios)
    kept = [ratio for ratio in ratios if ratio < OUTLIER_FACTOR * mean]
    return sum(kept) / len(kept) if kept else math.inf


@dataclass
class Fusion:
    """What K-LoRA does with a pair of files, computed once."""

    switched: list[str]
    """Attention projections both files change, in the official order (sorted diffusers names)."""
    balance: float
    constants: dict[str, tuple[float, float]]
    """Per switched layer: (float32(K_c / γ), K_s)."""
    plain_content: LoraWeights
    """Content layers patched as they are: those only the content file changes, and layers both
    change that are no attention projection."""
    plain_style: LoraWeights


def plan_fusion(content: LoraWeights, style: LoraWeights, device: torch.device | str = "cpu",
                switchable: Callable[[str], object] = functools.partial(layer_sets.selects, K_LORA.layers),
                order: Callable[[str], str] = sdxl_unet.ldm_to_diffusers) -> Fusion:
    """``switchable``: which layers both files change K-LoRA switches (SDXL's attention
    projections, the registry's K-LoRA layers; FLUX's, ``core.flux_lora.ATTENTION_PIECES``);
    ``order``: the key of the official layer order (the sorted diffusers names)."""
    common = [p for p in set(content.layers) & set(style.layers) if switchable(p)]
    if not common:
        raise LoraFormatError(
            f"The content LoRA ({len(content.layers)} layers) and the style LoRA ({len(style.layers)} layers) "
            "change no attention projection in common, so K-LoRA has nothing to choose between. K-LoRA fuses two "
            "LoRAs trained on the same layers (e.g. two LoRAs on all attention layers, or two B-LoRAs); to stack "
            "LoRAs on different layers, chain two LoRA loaders instead."
        )
    switched = sorted(common, key=order)
    ratios, top_k = [], {}
    for path in switched:
        c, s = content.layers[path], style.layers[path]
        delta_c, delta_s = c.delta(device=device), s.delta(device=device)
        sum_c, sum_s = float(delta_c.abs().sum()), float(delta_s.abs().sum())
        for what, total in (("content", sum_c), ("style", sum_s)):
            if not total > 0 or math.isinf(total):
                raise LoraFormatError(
                    f"The {what} LoRA's change at {path} is {'zero' if total == 0 else 'not finite'}: K-LoRA weighs "
                    "the two LoRAs layer by layer and cannot use a layer one of them leaves unchanged (or broken). "
                    "Was the file trained (an untrained LoRA's up factors are zero)?"
                )
        ratios.append(sum_c / sum_s)
        k = c.rank * s.rank
        top_k[path] = (top_k_sum(delta_c, k), top_k_sum(delta_s, k))
    gamma = balance(ratios)
    constants = {path: (float32(kc / float32(gamma)), ks) for path, (kc, ks) in top_k.items()}
    plain = {name: LoraWeights({p: l for p, l in weights.layers.items() if p not in constants}, dict(weights.metadata))
             for name, weights in (("content", content), ("style", style))}
    return Fusion(switched, gamma, constants, plain["content"], plain["style"])


class KLoRASchedule(StepListener):
    """S(t) for every K-LoRA layer call of a sampling run, and the choices made."""

    def __init__(self, settings: KLoRASettings, layers: int):
        self.settings = settings
        self.layers = layers
        self.beta = settings.effective_beta
        self.begin_run()

    def begin_run(self) -> None:
        self.calls = 0  # K-LoRA layer calls since the run began: the official counter
        self.order = 0  # K-LoRA layer calls in the current model call
        self.step = self.steps = None
        self.choices: list[bool] = []  # True where the content delta was chosen, in call order

    def begin_call(self, call: SamplingCall) -> None:
        self.order = 0
        self.step, self.steps = call.step, call.steps

    def end_run(self) -> None:
        if self.choices:
            share = sum(self.choices) / len(self.choices)
            logging.info("K-LoRA Fuse: %d layer calls, content LoRA chosen in %.0f%%, style LoRA in %.0f%%",
                         len(self.choices), 100 * share, 100 * (1 - share))

    def time(self) -> tuple[int, int]:
        """(t, T) for the next layer call."""
        self.calls += 1
        self.order += 1
        if self.settings.schedule == "official":
            return self.calls, OFFICIAL_SUM_TIMESTEPS
        if self.step is None:
            raise RuntimeError(
                "K-LoRA Fuse (schedule 'normalized') needs to know the sampling step, but this model call came "
                "without the host's schedule (transformer_options['sample_sigmas']). Sample with a KSampler or "
                "SamplerCustom node, or set K-LoRA Fuse's schedule to 'official'."
            )
        return self.step * self.layers + self.order, self.steps * self.layers

    def chooses_content(self, content_over_balance: float, style_top_k: float) -> bool:
        t, sum_timesteps = self.time()
        scale = scale_at(t, sum_timesteps, self.settings.alpha, self.beta, self.settings.pattern)
        choice = prefers_content(content_over_balance, style_top_k, scale)
        self.choices.append(choice)
        return choice


class KLoRALayer:
    """The ``forward`` of one K-LoRA layer: the base output plus the chosen LoRA's delta."""

    def __init__(self, base: Callable, content: LowRankOutput, style: LowRankOutput, constants: tuple[float, float],
                 schedule: KLoRASchedule, rows: slice | None = None):
        self.base = base
        self.content, self.style = content, style
        self.constants = constants
        self.schedule = schedule
        self.rows = rows
        """The output rows the LoRAs change (FLUX's q/k/v slices of a fused layer); None: all."""

    def __call__(self, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self.base(inputs, *args, **kwargs)
        delta = self.content if self.schedule.chooses_content(*self.constants) else self.style
        delta = delta(inputs).to(output.dtype)
        if self.rows is None:
            return output + delta
        rows = self.rows
        return torch.cat([output[..., :rows.start], output[..., rows] + delta, output[..., rows.stop:]], dim=-1)


def layer_factories(fusion: Fusion, content: LoraWeights, style: LoraWeights, schedule: KLoRASchedule,
                    content_strength: float = 1.0, style_strength: float = 1.0,
                    module_of: Callable[[str], tuple[str, slice | None]] | None = None) -> dict[str, Callable]:
    """``module path -> (forward -> K-LoRA forward)`` for every switched layer. ``module_of``
    maps a layer to the module and output rows it changes (FLUX: several pieces of one fused
    module, chained in the official order); default: the layer is the module, all rows."""

    def factory(path, rows):
        content_delta = functools.partial(content.layers[path].lora_output, strength=content_strength)
        style_delta = functools.partial(style.layers[path].lora_output, strength=style_strength)
        return lambda base: KLoRALayer(base, content_delta, style_delta, fusion.constants[path], schedule, rows)

    by_module: dict[str, list[tuple[int, Callable]]] = {}
    for path in fusion.switched:
        module, rows = module_of(path) if module_of else (path, None)
        by_module.setdefault(module, []).append((0 if rows is None else rows.start, factory(path, rows)))

    def chained(factories):
        def make(base):
            for make_one in factories:
                base = make_one(base)
            return base
        return make

    # within a fused module, the pieces choose in row order (q, k, v): the order diffusers calls them
    return {module: chained([f for _, f in sorted(pieces, key=lambda piece: piece[0])])
            for module, pieces in by_module.items()}
