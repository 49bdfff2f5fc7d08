"""Test setup: the pack importable as ``blora_pack`` (host-free), and the real ComfyUI host.

Host tests ask for the ``host`` fixture; without a ComfyUI checkout they skip with a reason
printed in the header and again at the end of the run, so a skipped run is never mistaken for
a passing one.
"""

from __future__ import annotations

import pytest
import torch

import pack_import

pack_import.register_pack()
import host_harness  # noqa: E402  (imports the pack as blora_pack)

COMFYUI_PATH, COMFYUI_FOUND_HOW = host_harness.find_comfyui()
NO_HOST_REASON = (
    f"HOST TESTS SKIPPED: {COMFYUI_FOUND_HOW}. Set COMFYUI_PATH to a ComfyUI checkout "
    "(see README, 'Tests') to run them."
)


def pytest_report_header(config):
    return f"ComfyUI host: {COMFYUI_FOUND_HOW}" if COMFYUI_PATH else f"!!! {NO_HOST_REASON} !!!"


def pytest_terminal_summary(terminalreporter):
    if COMFYUI_PATH is None:
        terminalreporter.write_sep("!", NO_HOST_REASON, red=True, bold=True)


@pytest.fixture(scope="session")
def host():
    if COMFYUI_PATH is None:
        pytest.skip(NO_HOST_REASON)
    return host_harness.start_host(COMFYUI_PATH)


@pytest.fixture
def inference_mode():
    """The host's executor runs every node under inference mode; so do node tests."""
    with torch.inference_mode():
        yield


@pytest.fixture
def loras_dir(host, tmp_path):
    """A fresh, empty loras folder registered with the host for one test."""
    folder_paths = host.folder_paths
    saved = folder_paths.folder_names_and_paths["loras"]
    folder = tmp_path / "loras"
    folder.mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.pop("loras", None)
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture
def tiny_sdxl(host):
    import tiny_models

    return tiny_models.build_tiny_sdxl()


@pytest.fixture
def loaded_sdxl(host):
    """A tiny SDXL made the way a checkpoint loader makes it in a real run: under inference
    mode, so its weights are inference tensors (the trainer's classic pitfall)."""
    import tiny_models

    with torch.inference_mode():
        return tiny_models.build_tiny_sdxl()
