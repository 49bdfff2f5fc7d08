"""Finding and starting the real ComfyUI host in-process, on the CPU.

Discovery order (the README documents it): ``$COMFYUI_PATH``, the folder two levels above the
pack (its place in a real install, ``ComfyUI/custom_nodes/<pack>``), then ``~/ComfyUI``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def candidate_paths() -> list[tuple[str, Path]]:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("$COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"]).expanduser()))
    candidates.append(("two levels above the pack", PACK_ROOT.parents[1]))
    candidates.append(("~/ComfyUI", Path.home() / "ComfyUI"))
    return candidates


def find_comfyui() -> tuple[Path | None, str]:
    """The host checkout and how it was found, or None and why none was."""
    tried = []
    for label, path in candidate_paths():
        if is_comfyui_checkout(path):
            return path.resolve(), f"{label}: {path.resolve()}"
        tried.append(f"{label} ({path})")
    return None, "no ComfyUI checkout at " + ", ".join(tried)


@dataclass
class Host:
    path: Path
    nodes: object
    folder_paths: object
    pack_module_name: str

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def pack(self, submodule: str):
        """A module of the pack as the host loaded it (not the test-side ``blora_pack`` copy)."""
        import importlib

        return importlib.import_module(f"{self.pack_module_name}.{submodule}")

    def run_node(self, node_id: str, *args, unique_id: str = "7", **kwargs):
        """Run a node as the executor does: a per-run class clone with its hidden inputs, under
        inference mode. Returns the ``NodeOutput``."""
        import torch
        from comfy_api.latest import io

        node_class = self.node(node_id).PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id})
        with torch.inference_mode():
            return node_class.execute(*args, **kwargs)


_started: Host | None = None


def start_host(path: Path, cpu: bool = True) -> Host:
    """Import ComfyUI from ``path`` (on the CPU unless ``cpu`` is False) with plain SDPA
    attention, then load this pack through the host's own custom-node loader. Done once per
    process."""
    global _started
    if _started is not None:
        return _started
    sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    import utils.extra_config  # noqa: F401  (before `nodes`, which puts comfy/ first on sys.path)
    import folder_paths
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
        raise RuntimeError(f"ComfyUI's custom-node loader could not load the pack at {PACK_ROOT}")
    _started = Host(path, nodes, folder_paths, str(PACK_ROOT).replace(".", "_x_"))
    return _started


def press_cancel_during_step(host: Host, monkeypatch, step_number: int) -> dict:
    """Make the host's Cancel fire while the UNet runs the ``step_number``-th training step
    (1-based), through the real interrupt flag. Returns a counter of UNet calls."""
    import comfy.model_management

    host_training = host.pack("nodes.host_training")
    real = host_training.unet_predict
    calls = {"n": 0}

    def unet_predict(*args):
        predict = real(*args)

        def counting(*inputs):
            calls["n"] += 1
            if calls["n"] == step_number:
                comfy.model_management.interrupt_current_processing(True)
            return predict(*inputs)

        return counting

    monkeypatch.setattr(host_training, "unet_predict", unet_predict)
    return calls
