"""The pack in a real ComfyUI server: registered, training reports to the front end, Cancel, a
re-queued prompt after its LoRA was deleted, and a server killed mid-training resumed exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

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


def training_prompt(lora_name: str, steps: int, **inputs) -> dict:
    return {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "TinyTextEncode", "inputs": {"text": "A [v]"}},
        "4": {"class_type": "BLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0], "steps": steps, "learning_rate": 1e-4,
            "rank": 4, "seed": 0, "lora_name": lora_name, "precision": "fp16", **inputs}},
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


def test_requeueing_the_same_prompt_trains_again_only_when_its_lora_was_deleted(server):
    url, workdir = server
    prompt, lora = training_prompt("again/cat", 2), workdir / "loras" / "again" / "cat.safetensors"
    steps = lambda messages: [m["data"]["step"] for m in messages if m["type"] == "blora.train"]  # noqa: E731
    history, messages = server_harness.run_prompt(url, prompt)
    assert history["status"]["status_str"] == "success" and steps(messages) == [1, 2] and lora.is_file()
    _, messages = server_harness.run_prompt(url, prompt)
    assert steps(messages) == [], "the file is there: ComfyUI's cached result stands"
    lora.unlink()
    history, messages = server_harness.run_prompt(url, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    assert steps(messages) == [1, 2] and lora.is_file(), "a deleted LoRA is trained again"


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
        texts = []
        messages = server_harness.receive_until(ws, lambda message: server_harness.is_end_of(message, queued),
                                                texts=texts)
    said = [text for node, text in texts if node == "4" and text.startswith("Cancelled: ")]
    assert said and said[0].endswith(" (queued/first_checkpoint.trainstate). To continue, turn 'resume' on and run "
                                     "again with the same settings (the seed is taken from the checkpoint); to start "
                                     "over, leave 'resume' off."), texts
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


def test_a_server_killed_mid_training_resumes_after_a_restart_to_the_uninterrupted_runs_file(host, tmp_path):
    """SIGKILL (a crash, the OOM killer: no handler runs) after the checkpoint of step 2; the
    server started again on the same folders resumes it, and the file equals an uninterrupted
    run's bit for bit (every tensor, every metadata field but the time it was made)."""
    workdir = tmp_path / "server"
    settings = {"checkpoint_every": 2}
    with server_harness.comfy_server(COMFYUI_PATH, workdir) as url:
        with server_harness.client(url) as (ws, client_id):
            server_harness.queue_prompt(url, training_prompt("killed/cat", 6, **settings), client_id)
            server_harness.receive_until(ws, lambda m: m["type"] == "blora.train" and m["data"]["step"] == 3)
            server_harness.kill(url)
    folder = workdir / "loras" / "killed"
    assert (folder / "cat_checkpoint.trainstate").is_file() and not (folder / "cat.safetensors").exists()
    with server_harness.comfy_server(COMFYUI_PATH, workdir) as url:
        resumed, messages = server_harness.run_prompt(url, training_prompt("killed/cat", 6, resume=True, **settings))
        assert resumed["status"]["status_str"] == "success", resumed["status"]
        assert [m["data"]["step"] for m in messages if m["type"] == "blora.train"][-1] == 6
        straight, _ = server_harness.run_prompt(url, training_prompt("straight/cat", 6, **settings))
        assert straight["status"]["status_str"] == "success", straight["status"]
    files = [folder / "cat.safetensors", workdir / "loras" / "straight" / "cat.safetensors"]
    (killed, killed_metadata), (expected, expected_metadata) = [
        (load_file(str(path)), safe_open(str(path), "pt").metadata()) for path in files]
    assert killed.keys() == expected.keys() and all(torch.equal(killed[k], expected[k]) for k in expected)
    assert {**killed_metadata, "blora.created": ""} == {**expected_metadata, "blora.created": ""}
    assert sorted(path.name for path in folder.iterdir()) == ["cat.safetensors"], \
        "the checkpoint and any temporary file a killed save left are gone"
