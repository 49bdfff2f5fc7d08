"""The one place that knows how the supported ComfyUI versions differ (0.3.64 to 0.33).

Everything else in the pack calls these functions and never looks at the host's version; each
function checks for the host feature itself, not for a version number.
"""

from __future__ import annotations

import contextlib
import inspect

import comfy.model_management
import comfy.model_patcher

HAS_DYNAMIC_VRAM = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
"""0.15 and later: on NVIDIA GPUs models load through ``ModelPatcherDynamic`` (comfy-aimdo),
which streams weights to the GPU per layer; on the CPU it falls back to the plain patcher."""


def prepare_node_class(node_class, hidden: dict):
    """The per-run clone of a V3 node class with its hidden inputs, as the executor makes it:
    since 0.8 ``PREPARE_CLASS_CLONE`` takes V3 data (``{"hidden_inputs": ...}``), before it
    took the hidden inputs themselves."""
    first_parameter = next(iter(inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters))
    return node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if first_parameter == "v3_data" else hidden)


def is_dynamic(model_patcher) -> bool:
    return bool(getattr(model_patcher, "is_dynamic", lambda: False)())


@contextlib.contextmanager
def trainable_patcher(model_patcher):
    """``(patcher, disposable)``: the patcher whose module training may run on, while the
    context is open, and whether that module is thrown away afterwards.

    A dynamic patcher streams each weight into a shared cast buffer per layer, so a frozen
    weight that autograd saves for backward can be overwritten before backward reads it, and
    the weights carry loader tags that replacing a parameter drops. Training therefore runs on
    the host's own non-dynamic delegate (``get_non_dynamic_delegate``: the mechanism the host
    itself falls back to for features dynamic loading lacks, carrying the user's patches).

    Before the host reads that delegate from the checkpoint, the model and its clones are
    unloaded (``unload_model_and_clones``, as the host does before its own reload from the
    loader, ``deepclone_multigpu``), so the streaming buffers and pinned RAM copies of the same
    weights are given back first. The host would keep the delegate cached on the model, a
    second instance of its weights for as long as the model stays loaded; a delegate built here
    is dropped from the cache on exit instead and is disposable: the caller lets go of it where
    it is, without copying its weights back to RAM. One the host had already built is used,
    left cached, and not disposable. A plain patcher is yielded as it is, not disposable.
    """
    if not is_dynamic(model_patcher):
        yield model_patcher, False
        return
    cached = model_patcher.non_dynamic_delegate_model
    if cached is None:
        if getattr(model_patcher, "cached_patcher_init", None) is None:
            raise ValueError("Training needs this model loaded without dynamic VRAM, which ComfyUI does by loading "
                             "it again from its file, but the loader that made it did not say how (custom loaders "
                             "often do not). Load it with a core loader (Load Checkpoint, Load Diffusion Model), or "
                             "start ComfyUI with --disable-dynamic-vram.")
        comfy.model_management.unload_model_and_clones(model_patcher)
    try:
        yield model_patcher.get_non_dynamic_delegate(), cached is None
    finally:
        model_patcher.non_dynamic_delegate_model = cached


def prompt_executor(server):
    """The host's ``PromptExecutor`` with the classic cache (each run of the command line is one
    prompt). Since 0.19 it reads RAM-cache thresholds from ``cache_args``; 0 keeps them off."""
    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=False)


def fixed_seed_control():
    """``control_after_generate`` for a training node's seed: the seed stays as set after a run
    (``ControlAfterGenerate.fixed``, since 0.8), else the host's plain control (the widget
    defaults to randomize there; a resume takes the checkpoint's seed either way)."""
    from comfy_api.latest import io

    fixed = getattr(getattr(io, "ControlAfterGenerate", None), "fixed", None)
    return fixed if fixed is not None else True


def schema_discovery(**fields) -> dict:
    """The V3 schema fields that help users find a node (``search_aliases``, since 0.9;
    ``essentials_category``), those this host's ``io.Schema`` has: 0.3.64 refuses unknown ones."""
    import dataclasses

    from comfy_api.latest import io

    known = {f.name for f in dataclasses.fields(io.Schema)}
    return {name: value for name, value in fields.items() if name in known and value}
