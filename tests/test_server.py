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


def training_prompt(lora_name: str, steps: int) -> dict:
    return {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "TinyTextEncode", "inputs": {"text": "A [v]"}},
        "4": {"class_type": "BLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0], "steps": steps, "learning_rate": 1e-4,
            "rank": 4, "seed": 0, "lora_name": lora_name, "precision": "fp16"}},
    }


def test_training_reports_every_step_and_saves_the_file(server):
    url, workdir = server
    history, messages = server_harness.run_prompt(url, training_prompt("served/cat", 4))
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
    served = server_harness.get_json(url, "/blora/methods")
    assert served["training_nodes"] == ["BLoRATrain", "SplitFluxTrain", "UnZipLoRATrain"]
    recipes = served["recipes"]
    assert recipes["all attention layers (style LoRA)"] == {"rank": 8, "learning_rate": 1e-5, "alpha": 0.0, "steps": 1000}
    assert recipes["B-LoRA blocks (content + style)"]["rank"] == 64


def test_cancel_stops_the_running_training_with_a_checkpoint_and_the_next_queued_one_still_runs(server):
    """What the README says Cancel does: the host's interrupt stops the running prompt only."""
    url, workdir = server
    with server_harness.client(url) as (ws, client_id):
        running = server_harness.queue_prompt(url, training_prompt("queued/first", 100000), client_id)
        queued = server_harness.queue_prompt(url, training_prompt("queued/second", 2), client_id)
        server_harness.receive_until(ws, lambda message: message["type"] == "blora.train")
        server_harness.post(url, "/interrupt")
        messages = server_harness.receive_until(ws, lambda message: server_harness.is_end_of(message, queued))
    assert "execution_interrupted" in [m["type"] for m in messages if m.get("data", {}).get("prompt_id") == running]
    assert (workdir / "loras" / "queued" / "first_checkpoint.safetensors").is_file()
    assert not (workdir / "loras" / "queued" / "first.safetensors").exists()
    history = server_harness.get_json(url, f"/history/{queued}")[queued]
    assert history["status"]["status_str"] == "success", history["status"]
    assert (workdir / "loras" / "queued" / "second.safetensors").is_file()


def test_the_pack_loaded_twice_into_one_server_is_harmless(host, tmp_path):
    """Two copies in one server's custom_nodes (a user's second clone, or a folder linked beside
    the installed pack): both load, the server starts, the routes answer once."""
    workdir = tmp_path / "server"
    with server_harness.comfy_server(COMFYUI_PATH, workdir, extra_packs=(PACK_ROOT,)) as url:
        assert server_harness.get_json(url, "/blora/methods")["recipes"]["B-LoRA blocks (content + style)"]["rank"] == 64
        assert server_harness.get_json(url, "/object_info/BLoRATrain")["BLoRATrain"]["display_name"] == "Train B-LoRA"
    log = (workdir / "server.log").read_text()
    for folder in (server_harness.PACK_FOLDER_NAME, PACK_ROOT.name):
        assert f"seconds: {workdir / 'custom_nodes' / folder}\n" in log, f"{folder} was not loaded:\n{log[-3000:]}"
