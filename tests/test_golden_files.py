"""Golden files: what the trainers write on the tiny SDXL with fixed seeds, fingerprinted.

Recorded before the pack's structure was redesigned (method registry, training job, one LoRA
layer), so that the redesign is proven to change no trained number: B-LoRA, the style-LoRA
recipe (two images, two a step) and UnZipLoRA, each in both memory settings. The fingerprint is
a SHA-256 over every tensor (name, dtype, shape, bytes) and the metadata that carries trained
numbers (UnZipLoRA's mergers); metadata describing the run (timestamps, settings) may grow.

Regenerate (only for a deliberate change of what is trained): ``python -m tests.test_golden_files``
prints the table for the host found as the tests find it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from devkit import tiny_models

GOLDEN = Path(__file__).with_name("golden_files.json")
TRAINED_METADATA = ("unziplora.mergers",)
"""Metadata keys whose values are trained numbers, fingerprinted with the tensors."""


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            raw = tensor.reshape(-1).view(torch.uint8)
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(raw.numpy().tobytes())
    for key in TRAINED_METADATA:
        digest.update(f"{key}={metadata.get(key, '')}".encode())
    return digest.hexdigest()


def _two_images():
    (first, positive), (second, _) = tiny_models.image_and_prompt(0), tiny_models.image_and_prompt(1)
    return {"samples": torch.cat([first["samples"], second["samples"]])}, positive


def _train_blora(host, model, memory: str) -> list[str]:
    latents, positive = tiny_models.image_and_prompt()
    host.run_node("BLoRATrain", model, latents, positive, 4, 1e-2, 4, 7, "golden/blora", "fp32", memory=memory)
    return ["golden/blora.safetensors"]


def _train_style(host, model, memory: str) -> list[str]:
    latents, positive = _two_images()
    host.run_node("BLoRATrain", model, latents, positive, 3, 1e-2, 0, 5, "golden/style", "fp32",
                  recipe="all attention layers (style LoRA)", memory=memory)
    return ["golden/style.safetensors"]


def _train_unziplora(host, model, memory: str) -> list[str]:
    latents, positive = tiny_models.image_and_prompt()
    _, content = tiny_models.image_and_prompt(100)
    _, style = tiny_models.image_and_prompt(200)
    host.run_node("UnZipLoRATrain", model, latents, positive, content, style, 6, 1e-3, 1e-3, 5e-2, 4, 2, 0.25, 3,
                  "golden/unzip", "fp32", cone_threshold=1e-3, memory=memory)
    return ["golden/unzip_content.safetensors", "golden/unzip_style.safetensors"]


CASES = {"b-lora": _train_blora, "style": _train_style, "unziplora": _train_unziplora}
MEMORY = ("fastest", "8 GB")


def trained_fingerprints(host, model, loras_dir: Path, case: str, memory: str) -> dict[str, str]:
    return {name: fingerprint(loras_dir / name) for name in CASES[case](host, model, memory)}


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_files_are_the_golden_ones(host, loaded_sdxl, loras_dir, case, memory):
    expected = json.loads(GOLDEN.read_text())[case]
    assert trained_fingerprints(host, loaded_sdxl, loras_dir, case, memory) == expected


def main() -> None:
    import tempfile

    from devkit import host as host_harness

    host = host_harness.start_found_host()
    folder_paths = host.folder_paths
    table = {}
    with tempfile.TemporaryDirectory() as folder:
        folder_paths.folder_names_and_paths["loras"] = ([folder], folder_paths.folder_names_and_paths["loras"][1])
        folder_paths.filename_list_cache.pop("loras", None)
        with torch.inference_mode():
            model = tiny_models.build_tiny_sdxl()
        for case in sorted(CASES):
            runs = {memory: trained_fingerprints(host, model, Path(folder), case, memory) for memory in MEMORY}
            if runs[MEMORY[0]] != runs[MEMORY[1]]:
                print(f"{case}: the memory settings train different files: {runs}")
            table[case] = runs[MEMORY[0]]
    print(json.dumps(table, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
