"""pyproject.toml as the Comfy Registry reads it: parsed by comfy-cli's own parser
(``comfy_cli.registry.config_parser.extract_node_configuration``, what ``comfy node validate``
and ``publish`` call; offline). comfy-cli lives in a virtual environment of its own (its
dependencies are not the pack's): ``$COMFY_CLI_PYTHON`` names its python (``.ci/run`` makes it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from devkit import PACK_ROOT

COMFY_CLI_PYTHON = os.environ.get("COMFY_CLI_PYTHON")
PARSE = """
import dataclasses, json, sys
from comfy_cli.registry.config_parser import extract_node_configuration
config = extract_node_configuration(sys.argv[1])
print(json.dumps(dataclasses.asdict(config) if config else None))
"""


@pytest.fixture(scope="module")
def registry_view():
    if not COMFY_CLI_PYTHON or not Path(COMFY_CLI_PYTHON).is_file():
        pytest.skip("COMFY_CLI_PYTHON names no python with comfy-cli (.ci/run installs one)")
    result = subprocess.run([COMFY_CLI_PYTHON, "-c", PARSE, str(PACK_ROOT / "pyproject.toml")], capture_output=True,
                            text=True, timeout=120, cwd=PACK_ROOT, env={**os.environ, "COMFY_CLI_SKIP_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout.lower() + result.stderr.lower(), result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def requirements() -> list[str]:
    lines = (PACK_ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_dependencies_are_the_requirements(registry_view):
    assert registry_view["project"]["dependencies"] == requirements()


def test_the_registry_gets_a_name_version_publisher_icon_and_host_range(registry_view):
    project, comfy = registry_view["project"], registry_view["tool_comfy"]
    assert project["name"] and project["version"] and comfy["publisher_id"] and comfy["display_name"]
    assert project["supported_comfyui_version"] == ">=0.3.64"
    assert project["supported_os"] and project["supported_accelerators"]
    assert project["urls"]["repository"] and project["urls"]["issues"]
    prefix = "https://raw.githubusercontent.com/blora-content-style/blora-content-style/main/"
    assert comfy["icon"].startswith(prefix), "the icon is a file of the repository"
    icon = Image.open(PACK_ROOT / comfy["icon"].removeprefix(prefix))
    assert icon.size[0] == icon.size[1], "the registry shows the icon square"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", comfy["icon"].removeprefix(prefix)], cwd=PACK_ROOT,
                             capture_output=True)
    assert tracked.returncode == 0, "the icon must be committed (the registry reads the repository)"
