"""The pack in a real ComfyUI server: registered, and training reports to the front end."""

from __future__ import annotations

import pytest

from devkit import PACK_ROOT
from devkit import server as server_harness
from devkit.host import COMFYUI_PATH


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    with server_harness.comfy_server(COMFYUI_PATH, workdir) as url:
        yield url, workdir


def test_nodes_are_registered_with_their_inputs(server):
    url, _ = server
    info = server_harness.get_json(url, "/object_info")
    assert info["BLoRATrain"]["display_name"] == "Train B-LoRA"
    assert info["BLoRATrain"]["category"] == "B-LoRA"
    assert list(info["BLoRATrain"]["input"]["required"]) == [
        "model", "latents", "positive", "steps", "learning_rate", "rank", "seed", "lora_name", "precision"]
    assert list(info["BLoRALoadContentLoRA"]["input"]["required"]) == ["model", "lora_name", "strength"]


def test_training_reports_every_step_and_saves_the_file(server):
    url, workdir = server
    prompt = {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "TinyTextEncode", "inputs": {"text": "A [v]"}},
        "4": {"class_type": "BLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0], "steps": 4, "learning_rate": 1e-4,
            "rank": 4, "seed": 0, "lora_name": "served/cat", "precision": "fp16"}},
    }
    history, messages = server_harness.run_prompt(url, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    events = [m["data"] for m in messages if m["type"] == "blora.train"]
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(e["node"] == "4" and e["total"] == 4 and e["loss"] > 0 for e in events)
    progress = [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "4"]
    # the host's bar: since 0.33 it sends at most one update per 100 ms (first and last always)
    assert progress[-1] == 4 and progress == sorted(set(progress)) and len(progress) >= 2
    assert (workdir / "loras" / "served" / "cat.safetensors").is_file()
    assert history["outputs"]["4"]["text"] == ["saved served/cat.safetensors (4 steps, last loss "
                                              f"{events[-1]['loss']:.4f})"]


def test_front_end_script_and_recipe_defaults_are_served(server):
    url, _ = server
    scripts = server_harness.get_json(url, "/extensions")
    assert any(s.endswith("/blora_training.js") for s in scripts), scripts
    recipes = server_harness.get_json(url, "/blora/recipes")
    assert recipes["all attention layers (style LoRA)"] == {"rank": 8, "learning_rate": 1e-5, "alpha": 0.0, "steps": 1000}
    assert recipes["B-LoRA blocks (content + style)"]["rank"] == 64


def test_the_pack_loaded_twice_into_one_server_is_harmless(host, tmp_path):
    """Two copies in one server's custom_nodes (a user's second clone, or a folder linked beside
    the installed pack): both load, the server starts, the routes answer once."""
    workdir = tmp_path / "server"
    with server_harness.comfy_server(COMFYUI_PATH, workdir, extra_packs=(PACK_ROOT,)) as url:
        assert server_harness.get_json(url, "/blora/recipes")["B-LoRA blocks (content + style)"]["rank"] == 64
        assert server_harness.get_json(url, "/object_info/BLoRATrain")["BLoRATrain"]["display_name"] == "Train B-LoRA"
    log = (workdir / "server.log").read_text()
    for folder in (server_harness.PACK_FOLDER_NAME, PACK_ROOT.name):
        assert f"seconds: {workdir / 'custom_nodes' / folder}\n" in log, f"{folder} was not loaded:\n{log[-3000:]}"
