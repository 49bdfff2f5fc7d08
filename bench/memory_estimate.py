"""GPU memory estimate of one B-LoRA training step at 1024 x 1024, made without a GPU.

Runs the pack's training forward (ComfyUI's full-size SDXL UNet, the pack's weight-wrapper LoRA
on the B-LoRA blocks, rank 64) on PyTorch's ``meta`` device, where tensors have shapes and
dtypes but no memory, and adds up the bytes autograd keeps for the backward pass: the memory
that training needs beyond the fp16 UNet, besides short-lived buffers. What a GPU would do that
the meta device does not is imitated:

- fp16 autocast: matrix products and convolutions take fp16 inputs, norms and the loss fp32
  (autocast's own lists), so saved tensors have the dtypes they would have on the GPU;
- fused SDPA (flash attention at SDXL's head size 64): saves q, k, v, the output and the
  log-sum-exp, not the attention matrix the meta device's math path would keep.

It is an estimate; ``bench/gpu_train_step.py`` measures the peak on a GPU.

    python -m bench.memory_estimate
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from devkit import host as bench_host
from bench import gpu_train_step

FP16_OPS = {F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
            torch.Tensor.__matmul__, torch.Tensor.matmul}
FP32_OPS = {F.layer_norm, F.group_norm, F.mse_loss, F.softmax, torch.softmax}


class MetaAutocast(TorchFunctionMode):
    """fp16 autocast's casts, for tensors on the meta device (autocast itself skips them)."""

    enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and (func in FP16_OPS or func in FP32_OPS):
            dtype = torch.float16 if func in FP16_OPS else torch.float32
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return func(*args, **kwargs)


def flash_like_attention(q, k, v, heads, mask=None, **_):
    """What CUDA's fused SDPA keeps for backward: q, k, v, output, log-sum-exp per head and row."""
    batch, tokens, _ = q.shape

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            ctx.save_for_backward(q, k, v, out, q.new_empty((batch, heads, tokens), dtype=torch.float32))
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v = ctx.saved_tensors[:3]
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return FusedAttention.apply(q, k, v)


def saved_for_backward(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds the graph."""
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        run()
    return sum(storages.values())


def main() -> None:
    setup = gpu_train_step.Setup(torch.device("cpu"), "full")  # sizes only: the tensors go to "meta"
    host = bench_host.start_found_host()
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models
    import comfy.utils

    recipes = host.pack("training.recipes")
    adapter_set = host.pack("training.lora_adapters")
    config = comfy.supported_models.SDXL(setup.unet_config)
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        unet = config.get_model({}, device=torch.device("meta")).diffusion_model
    unet.requires_grad_(False)
    weights = dict(unet.named_parameters())
    paths = [name[:-len(".weight")] for name in weights if name.endswith(".weight")]
    shapes = {path: tuple(weights[f"{path}.weight"].shape) for path in recipes.B_LORA.targets(paths)}
    adapters = adapter_set.LoraAdapterSet(shapes, gpu_train_step.RANK, None).to("meta")
    autocast = MetaAutocast()

    def fp32_delta(adapter):
        autocast.enabled = False  # the pack computes the LoRA product with autocast off
        try:
            return adapter.up @ adapter.down
        finally:
            autocast.enabled = True

    for path, adapter in adapters.items():
        adapter.delta = (lambda a: lambda: fp32_delta(a))(adapter)
        comfy.utils.get_attr(unet, path).weight_function = [adapter]
    attention.optimized_attention = attention.optimized_attention_masked = flash_like_attention

    latent = torch.empty(1, 4, setup.latent, setup.latent, device="meta")
    context = torch.empty(1, 77, setup.context_dim, device="meta", dtype=torch.float16)
    y = torch.empty(1, 2816, device="meta", dtype=torch.float16)
    timesteps = torch.full((1,), 500.0, device="meta")

    def forward():
        with autocast:
            prediction = unet(latent.half(), timesteps=timesteps, context=context, y=y)
            F.mse_loss(prediction, latent)

    saved = saved_for_backward(forward)
    lora = sum(p.numel() for p in adapters.parameters()) * 4
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    gb = 2**30
    print(f"SDXL UNet fp16 weights: {unet_bytes / gb:.2f} GB; B-LoRA rank {gpu_train_step.RANK}: {len(shapes)} layers")
    print(f"saved for backward: {saved / gb:.2f} GB")
    print(f"LoRA fp32 + gradients + AdamW moments: {4 * lora / gb:.2f} GB")
    print(f"estimate beyond the UNet, before short-lived buffers: {(saved + 4 * lora) / gb:.2f} GB (goal < 12 GB)")


if __name__ == "__main__":
    main()
