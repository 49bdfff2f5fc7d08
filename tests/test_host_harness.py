"""The reference harness itself: the host loads the pack and writes into temporary folders only,
and the two tiny UNets agree."""

from __future__ import annotations

from pathlib import Path

import torch

from devkit import tiny_models


def test_host_loads_pack_through_its_own_loader(host):
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["BLoRALoadContentLoRA"] == "Load Content LoRA"
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["BLoRALoadStyleLoRA"] == "Load Style LoRA"
    schema = host.node("BLoRALoadContentLoRA").GET_SCHEMA()
    assert schema.category == "B-LoRA"
    assert [i.id for i in schema.inputs][:3] == ["model", "lora_name", "strength"]


def test_the_tests_host_writes_into_temporary_folders_not_the_checkout(host):
    folder_paths = host.folder_paths
    written = {"input": folder_paths.get_input_directory(), "output": folder_paths.get_output_directory(),
               "temp": folder_paths.get_temp_directory(), "user": folder_paths.get_user_directory(),
               "loras": folder_paths.get_folder_paths("loras")[0]}
    inside = {name: path for name, path in written.items() if Path(path).resolve().is_relative_to(host.path.resolve())}
    assert inside == {}, "in a user's install these are the user's own folders"


def test_tiny_sdxl_has_sdxl_block_names(tiny_sdxl):
    keys = tiny_sdxl.model.diffusion_model.state_dict().keys()
    for block in ("output_blocks.0.1", "output_blocks.1.1"):
        for index in (0, 1):
            assert f"{block}.transformer_blocks.{index}.attn2.to_k.weight" in keys
    assert 1e6 < sum(p.numel() for p in tiny_sdxl.model.parameters()) < 2e7


def test_diffusers_twin_gives_the_same_output(tiny_sdxl):
    unet = tiny_models.diffusers_unet_from(tiny_sdxl)
    inputs = tiny_models.sample_inputs(batch=2)
    with torch.no_grad():
        ours = tiny_models.comfy_unet_output(tiny_sdxl, *inputs)
        reference = tiny_models.diffusers_unet_output(unet, *inputs)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_starting_comfyui_as_a_library_reports_no_failure_that_is_not_one(host, tmp_path):
    """0.33's node replacements need a server and fail when ComfyUI starts as a library (the
    command line, the tests): that report, with its advice to reinstall, is dropped; any other
    failed file is still reported, with the advice."""
    import logging
    import subprocess
    import sys

    from blora_pack.command_line import comfyui
    from devkit import PACK_ROOT
    from devkit.host import COMFYUI_PATH

    script = ("import devkit\nfrom blora_pack.command_line.comfyui import start_comfyui\n"
              f"start_comfyui(__import__('pathlib').Path({str(COMFYUI_PATH)!r}))\nprint('started')\n")
    started = subprocess.run([sys.executable, "-c", script], cwd=PACK_ROOT, capture_output=True, text=True, timeout=300)
    assert "started" in started.stdout, started.stderr
    assert "IMPORT FAILED" not in started.stderr + started.stdout and "pip install" not in started.stderr

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for failed in (["nodes_replacements.py"], ["nodes_replacements.py", "nodes_other.py"]):
            records.clear()
            with comfyui._without_server_only_failures():
                for name in failed:
                    logging.warning(f"IMPORT FAILED: {name}")
                logging.warning("Please do a: pip install -r requirements.txt")
            shown = [r.getMessage() for r in records]
            if failed == ["nodes_replacements.py"]:
                assert shown == []
            else:
                assert "IMPORT FAILED: nodes_other.py" in shown and "Please do a: pip install -r requirements.txt" in shown
    finally:
        root.removeHandler(handler)
