"""Errors a user can fix before anything runs are raised while the prompt is validated, so the
editor's error toast shows the pack's message ("<node> failed during validation: <message>",
frontend 1.49+ error catalog ``exception_during_validation``; 0.3.64's dialog shows it too).
An error raised while a node runs reaches only the details panel there."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from test_workflows import server  # noqa: F401  (the workflows' server: tiny models, B-LoRA files)


SHOWN_IN_THE_TOAST = {"exception_during_validation", "exception_during_inner_validation"}
"""Frontend 1.49 error catalog: "<node> failed during validation: <message>", "<node> couldn't
validate <input>: <message>"."""


def validation_errors(url: str, prompt: dict) -> dict:
    request = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        return json.loads(error.read())["node_errors"]
    raise AssertionError("the prompt was accepted")


def test_a_missing_lora_file_and_a_bad_window_are_told_in_the_toast(server):  # noqa: F811
    url, _ = server
    checkpoint = {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}}
    prompt = {
        "1": checkpoint,
        "2": {"class_type": "BLoRALoadContentLoRA", "inputs": {"model": ["1", 0], "lora_name": "gone.safetensors",
                                                               "strength": 1.0}},
        "3": {"class_type": "ReCharStructureFuse", "inputs": {
            "model": ["2", 0], "structure_lora": "b-lora/glyph.safetensors", "style_lora": "b-lora/style_image.safetensors",
            "structure_strength": 1.0, "style_strength": 1.0, "structure_start": 0.8, "structure_end": 0.2}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    errors = validation_errors(url, prompt)
    (missing,) = errors["2"]["errors"]
    assert missing["type"] in SHOWN_IN_THE_TOAST  # inner: found while validating the node it feeds
    assert "'gone.safetensors' is not in the loras folder" in missing["details"]
    (window,) = errors["3"]["errors"]
    assert window["type"] in SHOWN_IN_THE_TOAST and "must be below structure_end" in window["details"]
