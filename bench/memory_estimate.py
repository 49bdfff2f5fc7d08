"""GPU memory of one training step at 1024 x 1024, made without a GPU, for each method that
trains (B-LoRA, the style recipe, UnZipLoRA: every registry record with a recipe) and memory
setting (``fastest``, ``8 GB``).

Runs the pack's training forward (ComfyUI's full-size SDXL UNet, the method's LoRA as the pack
applies it, at the recipe's rank) on PyTorch's ``meta`` device, where tensors have shapes and dtypes but no
memory, and adds up the whole peak: the resident fp16 weights, the bytes autograd keeps for
backward (with gradient checkpointing: each checkpointed layer's inputs, plus the largest layer
while it is recomputed; a frozen weight a product saves is the resident weight itself, not
counted twice), and the LoRA with its gradients and AdamW moments. Short-lived buffers and the
CUDA context are not counted. A test runs the same count on the tiny UNet on the CPU and
compares it with the bytes a real run (real gradient checkpointing) keeps alive. What a GPU
would do that the meta device does not is imitated:

- fp16 autocast: matrix products and convolutions take fp16 inputs, norms and the loss fp32
  (autocast's own lists), so saved tensors have the dtypes they would have on the GPU;
- fused SDPA (flash attention at SDXL's head size 64): saves q, k, v, the output and the
  log-sum-exp, not the attention matrix the meta device's math path would keep.

It is an estimate; ``bench/gpu_train_step.py`` measures the peak on a GPU.

    python -m bench.memory_estimate [--json records.json]
"""

from __future__ import annotations


import argparse
import contextlib
import json
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from devkit import host as bench_host
from bench import gpu_train_step

FP16_OPS = {F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
            torch.Tensor.__matmul__, torch.Tensor.matmul}
FP32_OPS = {F.layer_norm, F.group_norm, F.mse_loss, F.softmax, torch.softmax}


class MetaAutocast(TorchFunctionMode):
    """fp16 (or ``dtype``) autocast's casts, for tensors on the meta device (autocast itself skips them)."""

    enabled = True
    dtype = torch.float16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and (func in FP16_OPS or func in FP32_OPS):
            dtype = self.dtype if func in FP16_OPS else torch.float32
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return func(*args, **kwargs)


def _fused_attention(q, k, v, out: torch.Tensor, batch: int, heads: int, tokens: int):
    """What CUDA's fused SDPA keeps for backward: q, k, v, output, log-sum-exp per head and row."""

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v, out, q.new_empty((batch, heads, tokens), dtype=torch.float32))
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v = ctx.saved_tensors[:3]
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return FusedAttention.apply(q, k, v)


def flash_like_attention(q, k, v, heads, mask=None, **_):
    """SDXL's call (q, k, v as (B, tokens, heads * dim)), output shaped like q."""
    batch, tokens, _ = q.shape
    return _fused_attention(q, k, v, torch.empty_like(q), batch, heads, tokens)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def saved_storages(run) -> dict[int, torch.UntypedStorage]:
    """The distinct storages autograd saves while ``run()`` builds the graph."""
    storages: dict[int, torch.UntypedStorage] = {}  # held until counted (see CheckpointCount)

    def keep(tensor):
        storages[_storage_key(tensor)] = tensor.untyped_storage()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        run()
    return storages


def saved_for_backward(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds the graph."""
    return sum(storage.nbytes() for storage in saved_storages(run).values())


class CheckpointCount:
    """What non-reentrant gradient checkpointing keeps: the inputs of each checkpointed layer whose
    ops save anything (the recomputation holds them; a layer backward never needs, e.g. one before
    the first trained module, keeps nothing), nothing the layer's own ops save, and in backward the
    largest single layer's saved tensors while it is recomputed.

    Storages are counted by identity, so each is held until counted: a freed storage's address
    may be given to the next one, which would then be taken for the same storage."""

    def __init__(self, checkpointed_function, counted_elsewhere: set[int] = frozenset()):
        self.checkpointed_function = checkpointed_function
        """The pack's ``gradient_checkpointing.checkpointed_function``: what checkpointing runs."""
        self.counted_elsewhere = counted_elsewhere
        """Storage keys not to count (weights, LoRA parameters: counted on their own)."""
        self.inputs: dict[int, torch.UntypedStorage] = {}
        self.largest_layer = 0

    @contextlib.contextmanager
    def counting(self, layers):
        """Each of ``layers`` counted (not checkpointed) while the context is open."""
        try:
            for layer in layers:
                layer.forward = self._counted(self.checkpointed_function(layer, layer.forward))
            yield self
        finally:
            for layer in layers:
                vars(layer).pop("forward", None)

    def _counted(self, forward):
        """``forward`` as checkpointing runs it (``checkpointed_function``), counted."""
        def counted(*args, **kwargs):
            inner: dict[int, torch.UntypedStorage] = {}

            def discard(tensor):
                inner[_storage_key(tensor)] = tensor.untyped_storage()
                return None

            with torch.autograd.graph.saved_tensors_hooks(discard, lambda _: None):
                out = forward(*args, **kwargs)
            inputs = {_storage_key(value): value.untyped_storage()
                      for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor)}
            if inner:  # a layer none of whose ops saves anything is never recomputed: its inputs are let go
                self.inputs.update(inputs)
            layer_bytes = sum(storage.nbytes() for key, storage in inner.items()
                              if key not in self.counted_elsewhere and key not in inputs)  # inputs: held already
            self.largest_layer = max(self.largest_layer, layer_bytes)
            return out

        return counted


def parameter_storages(*modules: torch.nn.Module) -> set[int]:
    return {_storage_key(p) for module in modules for p in module.parameters()}


def held_for_backward(host, forward, checkpointed_layers, counted_elsewhere: set[int]) -> dict[str, int]:
    """What ``forward()`` (one training forward) leaves for backward, in bytes, less the storages
    in ``counted_elsewhere`` (keys of the weights and LoRA parameters: a frozen fp16 weight a
    product saves is the resident weight itself): ``held`` (autograd's saved tensors outside
    ``checkpointed_layers`` and those layers' inputs, each storage once) and ``largest_layer``
    (held in addition while that layer is recomputed in backward, see ``CheckpointCount``)."""
    count = CheckpointCount(host.pack("training.gradient_checkpointing").checkpointed_function, counted_elsewhere)
    with count.counting(checkpointed_layers):
        storages = saved_storages(forward)
    storages.update(count.inputs)
    held = sum(storage.nbytes() for key, storage in storages.items() if key not in counted_elsewhere)
    return {"held": held, "largest_layer": count.largest_layer}


def build_trainer(host, method_key: str, unet, context_dim: int, device: torch.device, lora_product=None):
    """The method's LoRA on ``unet``, as the pack applies it, at its recipe's rank; returns
    (trainable, trained paths). ``lora_product(up, down)`` replaces a plain LoRA's product (the
    meta run turns its autocast off there)."""
    import comfy.utils

    methods = host.pack("methods")
    layer_sets = host.pack("core.layer_sets")
    method = methods.by_key(method_key)
    rank, _, alpha = method.recipe.resolved()
    weights = dict(unet.named_parameters())
    paths = [name[:-len(".weight")] for name in weights if name.endswith(".weight")]
    shapes = {path: tuple(weights[f"{path}.weight"].shape) for path in layer_sets.select(method.layers, paths)}
    if method_key != "unziplora":
        lora_adapters = host.pack("training.lora_adapters")
        adapters = lora_adapters.LoraAdapterSet(shapes, rank, alpha).to(device)
        for path, adapter in adapters.items():
            if lora_product is not None:
                adapter.delta = (lambda a: lambda *args, **kwargs: lora_product(a.up, a.down))(adapter)
            comfy.utils.get_attr(unet, path).weight_function = [lora_adapters.WeightDelta(adapter)]
        return adapters, list(shapes)
    unziplora = host.pack("training.unziplora")
    settings = unziplora.UnZipConfig()
    layers = {path: layer.to(device) for path, layer in unziplora.make_layers(shapes, rank, settings, 0).items()}
    dtype = next(unet.parameters()).dtype
    contexts = {role: torch.zeros(1, 77, context_dim, device=device, dtype=dtype) for role in unziplora.ROLES}
    for path, wrap in unziplora.module_wrappers(layers, contexts, settings).items():
        comfy.utils.set_attr(unet, path, wrap(comfy.utils.get_attr(unet, path)))
    return torch.nn.ModuleList(layers.values()), list(shapes)


AUTOCAST = MetaAutocast()


def fp32_product(up, down):
    AUTOCAST.enabled = False  # the pack computes LoRA products with autocast off
    try:
        return up @ down
    finally:
        AUTOCAST.enabled = True


def estimate(host, setup, method_key: str, setting: str) -> dict:
    """One training step's peak (GiB) for a method under memory ``setting``, resident weights included."""
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models

    memory = host.pack("training.memory")
    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    config = comfy.supported_models.SDXL(setup.unet_config)
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        unet = config.get_model({}, device=torch.device("meta")).diffusion_model
    unet.requires_grad_(False)
    resident = sum(p.numel() * p.element_size() for p in unet.parameters())
    trainable, trained = build_trainer(host, method_key, unet, setup.context_dim, torch.device("meta"), fp32_product)

    latent = torch.empty(1, 4, setup.latent, setup.latent, device="meta")
    context = torch.empty(1, 77, setup.context_dim, device="meta", dtype=torch.float16)
    y = torch.empty(1, 2816, device="meta", dtype=torch.float16)
    timesteps = torch.full((1,), 500.0, device="meta")

    def forward():
        with AUTOCAST:
            prediction = unet(latent.half(), timesteps=timesteps, context=context, y=y)
            F.mse_loss(prediction, latent)

    method = host.pack("methods").by_key(method_key)
    layers = gradient_checkpointing.backward_path_layers(unet, trained)[:memory.recomputed_layers(setting, method, 0.0)]
    with mock.patch.object(attention, "optimized_attention", flash_like_attention), \
            mock.patch.object(attention, "optimized_attention_masked", flash_like_attention):
        held = held_for_backward(host, forward, layers, parameter_storages(unet, trainable))
    saved = held["held"] + held["largest_layer"]
    optimizer_state = 4 * sum(p.numel() for p in trainable.parameters()) * 4  # fp32 weights, grads, 2 moments
    gib = 2**30
    return {"method": method_key, "memory": setting, "resolution": setup.latent * 8,
            "peak_gib": round((resident + saved + optimizer_state) / gib, 2),
            "resident_weights_gib": round(resident / gib, 2),
            "saved_for_backward_gib": round(saved / gib, 2), "lora_and_optimizer_gib": round(optimizer_state / gib, 2),
            "trained_layers": len(trained), "recomputed_layers": len(layers)}


def flux_attention(q, k, v, heads, mask=None, skip_reshape=False, **_):
    """FLUX's call (q, k, v as (B, heads, tokens, dim)): what fused SDPA keeps, output (B, tokens, heads * dim)."""
    batch, _, tokens, dim = q.shape
    return _fused_attention(q, k, v, q.new_empty((batch, tokens, heads * dim)), batch, heads, tokens)


FLUX_TEXT_TOKENS = 512
"""T5 tokens (diffusers' training default; ComfyUI pads to at least 256)."""


def build_splitflux(host, transformer: torch.nn.Module, hidden_size: int, text_tokens: int, device: torch.device):
    """SplitFlux's layers on ``transformer`` as the pack applies them (its module wrappers);
    returns (trainable, trained paths)."""
    import comfy.utils

    splitflux = host.pack("training.splitflux")
    settings = splitflux.SplitFluxSettings()
    trainable = splitflux.SplitFluxLayers(hidden_size, settings).to(device)
    wrappers = splitflux.module_wrappers(trainable, splitflux.TokenLayout(text_tokens=text_tokens), settings)
    for path, wrap in wrappers.items():
        comfy.utils.set_attr(transformer, path, wrap(comfy.utils.get_attr(transformer, path)))
    return trainable, list(wrappers)


def estimate_flux(host, method_key: str, setting: str, latent_size: int = 128,
                  recomputed_layers: int | None = 0) -> dict:
    """SplitFlux's training step on the full-size FLUX.1-dev at 1024 x 1024: fp8 resident weights
    (FLUX.1-dev as its fp8 checkpoints load) computed in bf16, the pack's SplitFlux layers and
    module wrappers, the single blocks the setting names recomputed (``recomputed_layers``
    when ``setting`` is None). The no-grad style-prompt pass (prompt replacement) keeps nothing
    for backward and is not counted."""
    import comfy.ldm.flux.math as flux_math
    import comfy.model_base
    import comfy.supported_models

    from devkit import tiny_flux

    memory = host.pack("training.memory")
    gradient_checkpointing = host.pack("training.gradient_checkpointing")
    flux_training = host.pack("host.flux_training")
    config = comfy.supported_models.Flux(tiny_flux.flux_unet_config(tiny_flux.FLUX1_DEV_CONFIG))
    config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    meta = torch.device("meta")
    transformer = comfy.model_base.Flux(config, device=meta).diffusion_model
    transformer.requires_grad_(False)
    resident = sum(p.numel() * p.element_size() for p in transformer.parameters())
    trainable, trained = build_splitflux(host, transformer, tiny_flux.FLUX1_DEV_CONFIG["hidden_size"],
                                         FLUX_TEXT_TOKENS, meta)
    latent = torch.empty(1, 16, latent_size, latent_size, device=meta)
    context = torch.empty(1, FLUX_TEXT_TOKENS, 4096, device=meta, dtype=torch.bfloat16)
    y = torch.empty(1, 768, device=meta, dtype=torch.bfloat16)
    scalar = torch.full((1,), 0.5, device=meta)

    def forward():
        AUTOCAST.dtype = torch.bfloat16
        try:
            with AUTOCAST:
                prediction = transformer(latent.bfloat16(), scalar, context=context, y=y, guidance=scalar)
                F.mse_loss(prediction, latent)
        finally:
            AUTOCAST.dtype = torch.float16

    if setting is not None:
        # the plan on a card with no room to spare (free 0): what memory_peak_gib records
        recomputed_layers = memory.recomputed_layers(setting, host.pack("methods").by_key(method_key), 0.0)
    layers = gradient_checkpointing.backward_path_layers(transformer, trained)[:recomputed_layers]
    with flux_training.in_training_flag(), mock.patch.object(flux_math, "optimized_attention", flux_attention):
        held = held_for_backward(host, forward, layers, parameter_storages(transformer, trainable))
    saved = held["held"] + held["largest_layer"]
    optimizer_state = 4 * sum(p.numel() for p in trainable.parameters()) * 4
    gib = 2**30
    return {"method": method_key, "memory": setting, "resolution": latent_size * 8,
            "peak_gib": round((resident + saved + optimizer_state) / gib, 2),
            "resident_weights_gib": round(resident / gib, 2),
            "saved_for_backward_gib": round(saved / gib, 2), "lora_and_optimizer_gib": round(optimizer_state / gib, 2),
            "trained_layers": len(trainable.targets), "recomputed_layers": len(layers)}


GOALS_GIB = {("b-lora", "8 GB"): 7.0, ("b-lora", "fastest"): 12.0, ("unziplora", "8 GB"): 11.0,
             ("splitflux", "8 GB"): 16.0, ("splitflux", "fastest"): 22.0}
"""The issues' goals: B-LoRA "8 GB" <= 7.0 GiB, "fastest" <= 12 GiB; UnZipLoRA's smallest <= 11 GiB;
SplitFlux on FLUX.1-dev: smallest <= 16 GiB (a 16 GB card), fastest <= 24 GiB, taken here as
22.0 so that ``auto`` (peak + 0.8 GiB) picks it on a 24 GB card with a display attached (about
23 GiB free). Keeping every single block's activations needs 39.65 GiB (``keep_all_peak_gib``),
so on a GPU with less free SplitFlux's ``fastest`` recomputes the first ``fastest_recomputes`` of
them (``fewest_recomputed_layers``)."""


def fewest_recomputed_layers(host, method_key: str, goal_gib: float) -> int:
    """The fewest layers of a FLUX method's backward path, from its first, to recompute for its
    peak at 1024 px to be at most ``goal_gib`` (each kept single block costs the same, so the
    peak falls with every one recomputed: a bisection)."""
    low, high = 0, estimate_flux(host, method_key, None, recomputed_layers=None)["recomputed_layers"]
    while low < high:
        middle = (low + high) // 2
        if estimate_flux(host, method_key, None, recomputed_layers=middle)["peak_gib"] <= goal_gib:
            high = middle
        else:
            low = middle + 1
    return low


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write one record per method and setting here")
    args = parser.parse_args(argv)
    setup = gpu_train_step.Setup(torch.device("cpu"), "full")  # sizes only: the tensors go to "meta"
    host = bench_host.start_found_host()
    memory = host.pack("training.memory")
    methods = host.pack("methods")
    records = [(estimate_flux(host, method.key, setting) if method.family == "FLUX.1"
                else estimate(host, setup, method.key, setting))
               for method in methods.METHODS if method.recipe is not None for setting in memory.RESOLVED]
    print("| method | memory | peak at 1024 px (GiB) | resident weights | saved for backward | LoRA + AdamW | goal |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        goal = GOALS_GIB.get((r["method"], r["memory"]))
        print(f"| {r['method']} ({r['trained_layers']} layers) | {r['memory']} | {r['peak_gib']:.2f} | "
              f"{r['resident_weights_gib']:.2f} | {r['saved_for_backward_gib']:.2f} | {r['lora_and_optimizer_gib']:.2f} | "
              + (f"<= {goal} {'met' if r['peak_gib'] <= goal else 'MISSED'}" if goal else "") + " |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
