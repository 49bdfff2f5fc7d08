"""The command line, as a user runs it: ``python cli.py ...`` in a fresh process, on top of the
ComfyUI checkout the tests found, with the tiny model (``--tiny``) and BLORA_OUTPUT_DIR."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from devkit import host as host_harness
from devkit.host import COMFYUI_PATH


@pytest.fixture(scope="module")
def cli(host, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli_output")
    image = output.parent / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(image)
    environment = {**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "BLORA_OUTPUT_DIR": str(output)}

    def run(*arguments, expect=0):
        result = subprocess.run([sys.executable, str(host_harness.PACK_ROOT / "cli.py"), *arguments], env=environment,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    return run, output, image


def test_train_then_stylize_generate_and_run(cli):
    run, output, image = cli
    result = run("train", "--tiny", "--image", str(image), "--steps", "5", "--name", "b-lora/photo")
    assert "its images are noise" in result.stdout and "saved b-lora/photo.safetensors (5 steps" in result.stdout
    assert (output / "blora_cli" / image.name).is_file(), "with --tiny the image inbox is in the output folder too"
    with safe_open(str(output / "loras" / "b-lora" / "photo.safetensors"), "pt") as handle:
        assert handle.metadata()["blora.steps"] == "5"
    run("train", "--tiny", "--image", str(image), "--steps", "2", "--name", "style/photo", "--recipe", "style")
    with safe_open(str(output / "loras" / "style" / "photo.safetensors"), "pt") as handle:
        assert (handle.metadata()["blora.rank"], handle.metadata()["blora.alpha"]) == ("8", "16")
    run("stylize", "--tiny", "--content", "b-lora/photo", "--text", "A [v] made of gold")
    run("generate", "--tiny", "--style", "b-lora/photo", "--text", "A backpack in [v] style")
    assert sorted(p.name for p in (output / "blora").iterdir()) == ["generate_00001_.png", "stylize_00001_.png"]
    result = run("run", "b-lora_text_stylization", "--tiny", "--set", "Load Content LoRA.lora_name=b-lora/photo.safetensors",
                 "--set", "KSampler.steps=2", "--set", "EmptyLatentImage.width=64", "--set", "EmptyLatentImage.height=64")
    assert "text_stylization_00001_.png" in result.stdout


def test_splitflux_train_then_stylize_on_the_tiny_flux(cli):
    run, output, image = cli
    result = run("train", "--tiny", "--recipe", "splitflux", "--image", str(image), "--steps", "2",
                 "--name", "splitflux/photo")
    assert "tiny FLUX.1-architecture model" in result.stdout
    for role in ("content", "style"):
        with safe_open(str(output / "loras" / "splitflux" / f"photo_{role}.safetensors"), "pt") as handle:
            assert handle.metadata()["blora.steps"] == "2" and handle.metadata()["splitflux.role"] == role
    result = run("stylize", "--tiny", "--flux", "--content", "splitflux/photo_content", "--style", "splitflux/photo_style")
    assert "splitflux/stylize_00001_.png" in result.stdout.replace("\\", "/")
    result = run("run", "splitflux_recontextualize", "--tiny", "--set",
                 "Load Content LoRA.lora_name=splitflux/photo_content.safetensors", "--set", "KSampler.steps=2",
                 "--set", "EmptySD3LatentImage.width=64", "--set", "EmptySD3LatentImage.height=64")
    assert "recontextualized_00001_.png" in result.stdout


def test_unzip_train_and_recombine(cli):
    run, output, image = cli
    run("unzip", "train", "--tiny", "--image", str(image), "--prompt", "A monadikos cat in sketch style",
        "--content-prompt", "A monadikos cat", "--style-prompt", "A cat in sketch style", "--rank", "4", "--steps", "4")
    assert (output / "loras" / "unziplora" / "photo_style.safetensors").is_file()
    result = run("unzip", "recombine", "--tiny", "--content", "unziplora/photo_content", "--style", "unziplora/photo_style",
                 "--prompt", "A monadikos cat in sketch style")
    assert "recombined_00001_.png" in result.stdout


@pytest.mark.parametrize("arguments, message", [
    (["stylize", "--tiny", "--content", "b-lora/nope", "--text", "x"], "is not in the loras folder"),
    (["train", "--tiny", "--image", "/no/such.png"], "No image at /no/such.png"),
    (["train", "--image", "x.png"], "Give --checkpoint"),
    (["train", "--tiny", "--recipe", "splitflux", "--rank", "4"], "--rank is not an option of SplitFlux"),
    (["train", "--tiny", "--flux"], "--recipe b-lora trains SDXL; on FLUX.1 use --recipe splitflux"),
    (["run", "b-lora_train", "--tiny", "--set", "Nothing.steps=3"], "no node with id, title, name or type 'Nothing'"),
    (["run", "no_such_workflow", "--tiny"], "shipped ones: b-lora_consistent_style"),
])
def test_clear_errors(cli, arguments, message):
    run, _, _ = cli
    assert message in run(*arguments, expect=2).stderr


@pytest.mark.parametrize("arguments, message", [
    (["run", "no_such_workflow", "--tiny"], "shipped ones: b-lora_consistent_style"),
    (["run", "b-lora_train", "--tiny", "--set", "steps"], "--set takes NODE.INPUT=VALUE"),
    (["stylize", "--tiny", "--content", "b-lora/x"], "stylize needs --style"),
    (["run", "b-lora_train", "--tiny"], "no ComfyUI there"),  # the check itself: here --comfyui is first wrong
    (["stylize", "--tiny", "--content", "b-lora/x", "--text", "t", "--fuse", "k-lora"], "--fuse k-lora needs --style"),
])
def test_arguments_are_checked_before_comfyui_starts(cli, arguments, message):
    """Each refusal comes before ComfyUI is imported (which takes 20-30 s on a busy machine): with
    no ComfyUI at --comfyui, the refusal is still about the arguments."""
    run, _, _ = cli
    result = run(*arguments, "--comfyui", "/no/such/comfyui", expect=2)
    assert message in result.stderr


def test_each_commands_help_lists_only_the_options_it_uses(cli):
    run, _, _ = cli
    shown = {command: run(command, "--help").stdout for command in ("train", "stylize", "generate", "unzip", "run")}
    for option in ("--seed", "--memory", "--cfg", "--size", "--content-strength"):
        assert option not in shown["run"], f"run --help lists {option}, which run ignores"
    assert "--memory" in shown["train"] and "--memory" in shown["unzip"]
    assert "--memory" not in shown["stylize"] and "--memory" not in shown["generate"]
    assert "--style-strength" not in shown["train"] and "--style-strength" in shown["stylize"]
    assert all("--checkpoint" in text for text in shown.values())
