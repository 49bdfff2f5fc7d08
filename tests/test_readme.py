"""The README's commands run as written: every command in its ``bash`` blocks is checked here.

- the demo (``python cli.py train --tiny``) runs in a fresh process from the pack's folder, with
  no file from the user, and says where its LoRA went;
- every other ``python cli.py`` line parses with the command line's own parser (options and
  values as written; those needing a real SDXL checkpoint cannot run here), and each ``--help``
  line runs;
- the test command is the one ``.ci/run`` runs; ``python -m bench.NAME`` / ``tools.NAME`` lines
  name modules that answer ``--help``; install lines name files the pack has; ``ray start``
  lines parse with Ray's own options;
- the supported hosts named in the README are those ``.ci/run`` tests and ``pyproject.toml``
  declares.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from devkit import PACK_ROOT
from devkit.host import COMFYUI_PATH

README = (PACK_ROOT / "README.md").read_text()
CI_SCRIPT = (PACK_ROOT / ".ci" / "run").read_text()


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined, ``VAR=value`` kept."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.extend(part.strip() for part in command.split("&&"))
    return commands


COMMANDS = readme_commands()
CLI_COMMANDS = [c for c in COMMANDS if "python cli.py" in c]
DEMO = next(c for c in CLI_COMMANDS if c.startswith("python cli.py train --tiny"))


def split_cli(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("cli.py") + 1:]


def run_in_pack_folder(arguments: list[str], environment: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=PACK_ROOT, env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=timeout)


def test_every_command_is_of_a_kind_this_test_checks():
    kinds = ("python cli.py", "python3 -m pytest", "python -m bench.", "python -m tools.", "pip install", "cd ",
             "git clone", "bash .ci/run", "python3 -m venv", "tar -xzf ", "ray start ")
    unchecked = [c for c in COMMANDS if not any(kind in c for kind in kinds)]
    assert unchecked == [], "add a check for these README commands"


def test_the_demo_runs_as_written_and_says_where_its_files_went(host, tmp_path):
    assert DEMO == "python cli.py train --tiny", "the README's demo needs no file from the user"
    result = run_in_pack_folder(["cli.py", *split_cli(DEMO)],
                                {"COMFYUI_PATH": str(COMFYUI_PATH), "BLORA_OUTPUT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lora = next(line.removeprefix("lora: ") for line in result.stdout.splitlines() if line.startswith("lora: "))
    assert lora == str(tmp_path / "loras" / "b-lora" / "blora_sample_cup.safetensors")
    assert os.path.isfile(lora)
    assert f"training on the bundled sample image (drawn in code), {tmp_path}{os.sep}" in result.stdout, \
        "nothing is written into ComfyUI's own folders"


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_cli_command_parses_as_written(command):
    from blora_pack.command_line.main import parser

    arguments = split_cli(command)
    if "--help" in arguments:
        result = run_in_pack_folder(["cli.py", *arguments], {})
        assert result.returncode == 0 and "usage: cli.py" in result.stdout, result.stderr[-2000:]
        return
    parsed = parser().parse_args(arguments)
    assert parsed.command == arguments[0]


def test_the_readme_shows_the_help_of_every_command():
    from blora_pack.command_line.main import parser

    commands = parser()._subparsers._group_actions[0].choices
    shown = {split_cli(c)[0] for c in CLI_COMMANDS if "--help" in c and len(split_cli(c)) == 2}
    assert shown == set(commands)


def test_the_test_command_is_what_ci_runs():
    assert "python3 -m pytest -q" in COMMANDS
    assert '-m pytest -q' in CI_SCRIPT


@pytest.mark.parametrize("command", [c for c in COMMANDS if " -m bench." in c or " -m tools." in c])
def test_benchmark_and_tool_commands_name_real_modules(command):
    module = shlex.split(command)[shlex.split(command).index("-m") + 1]
    result = run_in_pack_folder(["-m", module, "--help"], {}, timeout=120)
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("ray start ")])
def test_ray_commands_parse_with_rays_own_options(command):
    """The cluster set-up lines, parsed by the command ``ray start`` runs (nothing is started)."""
    from ray.scripts.scripts import start

    start.make_context("ray start", shlex.split(command)[2:])


def test_install_commands_name_files_that_exist():
    installs = [c for c in COMMANDS if "pip install -r" in c]
    assert installs
    for command in installs:
        for requirements in re.findall(r"-r (\S+)", command):
            if "ComfyUI-" not in requirements:  # a host's own, unpacked by the command before it
                assert (PACK_ROOT / requirements.split("/")[-1]).is_file(), requirements


def test_the_host_tarballs_named_are_the_ones_ci_unpacks():
    """The tarballs are the development layout's snapshots (``../shared/comfyui`` beside the
    pack), which a user's install (the pack cloned into ComfyUI/custom_nodes) does not have."""
    tarballs = [shlex.split(c)[2] for c in COMMANDS if c.startswith("tar -xzf ")]
    assert tarballs and all(t.startswith("../shared/comfyui/") for t in tarballs), tarballs
    if not (PACK_ROOT / "../shared/comfyui").is_dir():
        pytest.skip("no ../shared/comfyui beside the pack: the host snapshots exist only in the development layout, "
                    "not in a user's install")
    for tarball in tarballs:
        assert (PACK_ROOT / tarball).is_file() and tarball.rsplit("/", 1)[-1] in CI_SCRIPT.replace("$version", "0.33.0")


def test_supported_hosts_agree_everywhere():
    minimum = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    tested = re.search(r"HOST_VERSIONS=\(([^)]*)\)", CI_SCRIPT).group(1).split()
    assert minimum == ">=" + min(tested, key=lambda v: tuple(map(int, v.split("."))))
    for version in tested:
        assert f"ComfyUI {version}" in README, f"the README names the tested host {version}"


def test_links_and_pictures_name_files_the_pack_ships():
    """Every link and picture to a file of the pack names one that exists; every shipped
    workflow has its editor screenshot in the README (``tools/screenshot_workflows``); no picture
    in docs/images is left that nothing shows."""
    from tools import screenshot_workflows

    targets = {t for t in re.findall(r"\]\(([^)#\s]+)\)", README) if "://" not in t}
    assert targets
    for target in targets:
        assert (PACK_ROOT / target).exists(), f"the README links to {target}, which the pack lacks"
    for workflow, picture in screenshot_workflows.pictures().items():
        assert picture.relative_to(PACK_ROOT).as_posix() in targets, \
            f"{workflow.name} has no screenshot in the README: run python -m tools.screenshot_workflows"
    shown = README + (PACK_ROOT / "pyproject.toml").read_text()
    unused = [p.name for p in screenshot_workflows.IMAGES.iterdir() if f"docs/images/{p.name}" not in shown]
    assert not unused, f"pictures nothing shows: {unused}"
