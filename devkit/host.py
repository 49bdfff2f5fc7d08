"""The real ComfyUI host, found and started in this process on the CPU, for tests, benchmarks
and tools.

Discovery order (the README documents it): ``$COMFYUI_PATH``, the folder two levels above the
pack (its place in a real install, ``ComfyUI/custom_nodes/<pack>``), then ``~/ComfyUI``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from blora_pack.command_line.comfyui import PACK_ROOT, find_comfyui, pack_module, start_comfyui  # noqa: F401

COMFYUI_PATH, COMFYUI_FOUND_HOW = find_comfyui()
NO_HOST_REASON = (
    f"HOST TESTS SKIPPED: {COMFYUI_FOUND_HOW}. Set COMFYUI_PATH to a ComfyUI checkout "
    "(see README, 'Tests') to run them."
)


@dataclass
class Host:
    path: Path
    nodes: object
    folder_paths: object

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def pack(self, submodule: str):
        """A module of the pack as the host loaded it (not the test-side ``blora_pack`` copy)."""
        return pack_module(submodule)

    def run_node(self, node_id: str, *args, unique_id: str = "7", **kwargs):
        """Run a node as the executor does: a per-run class clone with its hidden inputs, under
        inference mode. Returns the ``NodeOutput``."""
        import torch
        from comfy_api.latest import io

        compat = self.pack("host.compat")
        node_class = compat.prepare_node_class(self.node(node_id), {io.Hidden.unique_id: unique_id})
        with torch.inference_mode():
            return node_class.execute(*args, **kwargs)


_started: Host | None = None


def start_host(path: Path, cpu: bool = True, folders: Path | None = None) -> Host:
    """ComfyUI imported in this process with this pack loaded by the host's own loader; with
    ``folders``, its input, output, temp, user and default loras folders there."""
    global _started
    if _started is None:
        nodes = start_comfyui(path, cpu, folders)
        import folder_paths

        _started = Host(path, nodes, folder_paths)
    return _started


def start_found_host(cpu: bool = True) -> Host:
    """The host found as the tests find it, started; or exit saying where it was looked for."""
    if COMFYUI_PATH is None:
        sys.exit(NO_HOST_REASON)
    return start_host(COMFYUI_PATH, cpu=cpu)


def press_cancel_during_step(host: Host, monkeypatch, step_number: int) -> dict:
    """Make the host's Cancel fire while the UNet runs the ``step_number``-th training step
    (1-based), through the real interrupt flag. Returns counters of UNet calls made (``n``) and
    completed (``completed``): since 0.33 the host checks the flag inside every layer, so the
    call during which Cancel is pressed may not complete, and a checkpoint then holds one step
    less."""
    import comfy.model_management

    host_training = host.pack("host.training")
    real = host_training.unet_predict
    calls = {"n": 0, "completed": 0}

    def unet_predict(*args):
        predict = real(*args)

        def counting(*inputs):
            calls["n"] += 1
            if calls["n"] == step_number:
                comfy.model_management.interrupt_current_processing(True)
            output = predict(*inputs)
            calls["completed"] += 1
            return output

        return counting

    monkeypatch.setattr(host_training, "unet_predict", unet_predict)
    return calls


def press_cancel_after_step(host: Host, monkeypatch, step_number: int) -> None:
    """Make the host's Cancel land in the progress update of the ``step_number``-th training step
    (after its update): as a server's progress hook does (``main.hijack_progress``), the hook
    calls the host's own ``throw_exception_if_processing_interrupted``."""
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        if value == step_number:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
