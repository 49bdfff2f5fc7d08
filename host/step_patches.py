"""Layers that change between model calls, put in with the host's own mechanisms (the helper
ReChar Structure Fuse, K-LoRA Fuse and UnZipLoRA's prompt-separated recombination share).

On a clone of the model: each layer's ``forward`` is replaced through an object patch (the
module itself, its weights and any weight patch on it stay where they are, so other LoRAs on
the same layer still apply, also per layer under lowvram or dynamic VRAM), and two sampling
wrappers tell a ``core.step_lora.StepListener`` when a sampling run starts and ends
(``OUTER_SAMPLE``) and, before every model call, where sampling is (``APPLY_MODEL``: the sigma,
its step in the run's schedule, which batch chunks are cond and uncond). The host removes all
of it when the clone is unloaded; the input model is never changed.
"""

from __future__ import annotations

import comfy.patcher_extension

from ..core.step_lora import ForwardFactory, SamplingCall, StepListener

SIGMA_TOLERANCE = 1e-5
"""Relative: a call at a schedule sigma belongs to that sigma's step."""


def clone_with_step_layers(model, layers: dict[str, ForwardFactory], listener: StepListener, key: str):
    """A clone of ``model`` whose layers at ``layers``' ldm paths run the forwards the factories
    make from their current ones (so a forward another node already replaced is wrapped, not
    lost), with ``listener`` told about every run and call."""
    clone = model.clone()
    for path, make in layers.items():
        name = f"diffusion_model.{path}.forward"
        clone.add_object_patch(name, make(model.get_model_object(name)))

    def around_run(executor, *args, **kwargs):
        listener.begin_run()
        try:
            return executor(*args, **kwargs)
        finally:
            listener.end_run()

    def before_call(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        listener.begin_call(sampling_call(t, options))
        return executor(x, t, *args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, around_run)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, before_call)
    return clone


def sampling_call(t, transformer_options: dict) -> SamplingCall:
    """Where sampling is at a model call with sigma ``t``: the step is the one whose interval of
    the run's schedule (``sample_sigmas``, set by the host's sampler) holds the sigma."""
    sigma = float(t.flatten()[0])
    chunks = tuple(int(c) for c in transformer_options.get("cond_or_uncond", ()))
    schedule = transformer_options.get("sample_sigmas")
    if schedule is None or schedule.numel() < 2:
        return SamplingCall(sigma, chunks=chunks)
    sigmas = schedule.detach().flatten()[:-1].float().cpu()
    steps = sigmas.numel()
    step = int((sigmas >= sigma * (1 - SIGMA_TOLERANCE)).sum()) - 1
    return SamplingCall(sigma, min(max(step, 0), steps - 1), steps, chunks)
