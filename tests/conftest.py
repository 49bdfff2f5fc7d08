"""Test setup: the pack importable as ``blora_pack`` (host-free, by importing ``devkit``), and the
real ComfyUI host.

Host tests ask for the ``host`` fixture; without a ComfyUI checkout they skip with a reason
printed in the header and again at the end of the run, so a skipped run is never mistaken for
a passing one. In CI (``CI=true``) a test that would skip fails instead, except the checks
marked ``external_pack`` (they need another node pack that no registry here serves).
"""

from __future__ import annotations

import os

import pytest
import torch

from devkit import host as host_harness

COMFYUI_PATH, NO_HOST_REASON = host_harness.COMFYUI_PATH, host_harness.NO_HOST_REASON
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "external_pack: needs another node pack; may skip, also in CI")
    config.addinivalue_line("markers", "dynamic_vram: only for hosts with dynamic VRAM (0.15+); deselected on others")


def host_has_dynamic_vram() -> bool:
    patcher = COMFYUI_PATH / "comfy" / "model_patcher.py" if COMFYUI_PATH else None
    return patcher is not None and "class ModelPatcherDynamic" in patcher.read_text()


def pytest_collection_modifyitems(config, items):
    """Tests of a host feature the host under test lacks are not run there (deselected, not
    skipped: they do not apply)."""
    if host_has_dynamic_vram():
        return
    kept = [item for item in items if item.get_closest_marker("dynamic_vram") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_report_header(config):
    host = f"ComfyUI host: {host_harness.COMFYUI_FOUND_HOW}" if COMFYUI_PATH else f"!!! {NO_HOST_REASON} !!!"
    return host + (" (CI: a skip is a failure)" if IN_CI else "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("external_pack") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


def pytest_terminal_summary(terminalreporter):
    if COMFYUI_PATH is None:
        terminalreporter.write_sep("!", NO_HOST_REASON, red=True, bold=True)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The host, its input, output, temp, user and default loras folders temporary ones: the
    tests write nothing into the checkout (in a user's install, the user's own folders)."""
    if COMFYUI_PATH is None:
        pytest.skip(NO_HOST_REASON)
    return host_harness.start_host(COMFYUI_PATH, folders=tmp_path_factory.mktemp("host_folders"))


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
    from devkit import tiny_models

    return tiny_models.build_tiny_sdxl()


@pytest.fixture
def loaded_sdxl(host):
    """A tiny SDXL made the way a checkpoint loader makes it in a real run: under inference
    mode, so its weights are inference tensors (the trainer's classic pitfall)."""
    from devkit import tiny_models

    with torch.inference_mode():
        return tiny_models.build_tiny_sdxl()
