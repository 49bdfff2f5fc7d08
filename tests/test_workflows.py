"""Every shipped workflow loads (known nodes, right widget counts) and runs headless.

Each UI-format file is converted to the API format with the host's own node definitions (as
the editor's "Export (API)"), then run by a real ComfyUI server on loopback. Only the loaders
are swapped for tiny fixtures (checkpoint -> TinySDXLCheckpointLoader, CLIPTextEncode ->
TinyTextEncode, ControlNetLoader -> TinyControlNetLoader); for CPU time, step counts and image
sizes are scaled down, nothing else. The FLUX.1 workflows (those with a UNETLoader) get the tiny
FLUX instead (UNETLoader -> TinyFluxModelLoader, VAELoader -> TinyFluxVAELoader, CLIPTextEncode ->
TinyFluxTextEncode, DualCLIPLoader dropped: ``devkit/fixture_nodes/tiny_flux_fixtures``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lora_namings
from devkit import server as server_harness
from devkit import tiny_flux, tiny_models
from devkit.host import COMFYUI_PATH

from blora_pack.command_line.tiny import swap_loaders_for_tiny
from blora_pack.command_line import workflow_format
from blora_pack.training import splitflux

SHIPPED = workflow_format.shipped(Path(__file__).resolve().parents[1] / "workflows")
WORKFLOWS = [w for key, w in SHIPPED.items() if not key.endswith("_ipadapter")]
IPADAPTER_WORKFLOWS = [w for key, w in SHIPPED.items() if key.endswith("_ipadapter")]
IPADAPTER_PACK = server_harness.ipadapter_pack()
INPUT_IMAGES = ("my_image.png", "image_a.png", "image_b.png", "style_1.png", "style_2.png", "content_photo.png",
                "glyph.png")
SCALED_DOWN = {
    "BLoRATrain": {"steps": 2}, "UnZipLoRATrain": {"steps": 3}, "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64}, "ImageScaleToTotalPixels": {"megapixels": 0.01},
    "SplitFluxTrain": {"steps": 2}, "EmptySD3LatentImage": {"width": 64, "height": 64},
    "ImageScale": {"width": 64, "height": 64},
}
OUTPUT_TYPES = {"SaveImage", "PreviewImage"}


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflows")
    with server_harness.comfy_server(COMFYUI_PATH, workdir, extra_packs=(IPADAPTER_PACK,) if IPADAPTER_PACK else ()) as url:
        for index, name in enumerate(INPUT_IMAGES):
            pixels = np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(workdir / "input" / name)
        shapes = lora_namings.b_lora_shapes(tiny_models.build_tiny_sdxl().model.diffusion_model.state_dict())
        (workdir / "loras" / "b-lora").mkdir()
        for seed, name in enumerate(("content_image", "style_image", "glyph")):
            layers = lora_namings.random_layers(shapes, rank=4, seed=seed)
            save_file(lora_namings.write_naming(layers, "official"), str(workdir / "loras" / "b-lora" / f"{name}.safetensors"))
        write_flux_loras(workdir / "loras")
        yield url, server_harness.get_json(url, "/object_info")


def splitflux_files(seed: int) -> tuple[dict, dict]:
    """The content and style state dicts of SplitFlux layers for the tiny FLUX, random nonzero."""
    layers = splitflux.SplitFluxLayers(tiny_flux.HIDDEN_SIZE, splitflux.SplitFluxSettings())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return splitflux.role_state_dict(layers, "content"), splitflux.role_state_dict(layers, "style")


def write_flux_loras(loras: Path):
    """What the FLUX workflows load: SplitFlux files of two images, and two FLUX LoRAs changing the
    same layers (single blocks 0-11) for K-LoRA Fuse."""
    (loras / "splitflux").mkdir()
    (loras / "flux").mkdir()
    main_rank = {splitflux.MAIN_RANK_METADATA_KEY: str(splitflux.SplitFluxSettings().content_rank)}
    content, _ = splitflux_files(0)
    _, style = splitflux_files(1)
    save_file(content, str(loras / "splitflux" / "content_image_content.safetensors"), main_rank)
    save_file(style, str(loras / "splitflux" / "style_image_style.safetensors"))
    save_file(content, str(loras / "flux" / "subject.safetensors"))
    save_file({**splitflux_files(2)[0], **style}, str(loras / "flux" / "style.safetensors"))


def runnable(prompt: dict) -> dict:
    is_flux = any(node["class_type"] == "UNETLoader" for node in prompt.values())
    swap = tiny_flux.swap_flux_loaders_for_tiny if is_flux else swap_loaders_for_tiny
    for node in swap(prompt).values():
        node["inputs"].update(SCALED_DOWN.get(node["class_type"], {}))
    return prompt


def test_workflows_are_shipped():
    assert set(SHIPPED) == {"rechar_character_ipadapter", "lora_style_transfer_sdedit_ipadapter", "b-lora_train",
                            "b-lora_style_transfer", "b-lora_text_stylization", "b-lora_consistent_style",
                            "unziplora_train_and_recombine", "lora_style_transfer_sdedit", "rechar_character",
                            "k-lora_fuse", "splitflux_train", "splitflux_recontextualize", "splitflux_style_transfer",
                            "k-lora_fuse_flux"}
    assert len(list(next(iter(SHIPPED.values())).parent.glob("*.json"))) == len(SHIPPED), "a workflow with no key"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_workflow_runs_headless(server, workflow):
    url, object_info = server
    prompt = runnable(workflow_format.ui_to_api(json.loads(workflow.read_text()), object_info))
    history, messages = server_harness.run_prompt(url, prompt)
    assert history["status"]["status_str"] == "success", [m for m in messages if m["type"] == "execution_error"]
    outputs = [node_id for node_id, node in prompt.items() if node["class_type"] in OUTPUT_TYPES]
    assert outputs
    for node_id in outputs:
        assert history["outputs"][node_id]["images"], f"{workflow.name}: node {node_id} produced no image"


def test_a_wrong_widget_count_or_unknown_node_is_caught(server):
    url, object_info = server
    workflow = json.loads(SHIPPED["b-lora_train"].read_text())
    scale = next(n for n in workflow["nodes"] if n["type"] == "ImageScaleToTotalPixels")
    scale["widgets_values"] = scale["widgets_values"] + [8]  # a core node saved by a newer host: ignored, as the editor does
    assert workflow_format.ui_to_api(workflow, object_info)[str(scale["id"])]["inputs"]["upscale_method"] == "lanczos"
    node = next(n for n in workflow["nodes"] if n["type"] == "BLoRATrain")
    saved = list(node["widgets_values"])
    node["widgets_values"] = saved[:-1]  # saved before the last optional input was appended: still loads
    assert workflow_format.ui_to_api(workflow, object_info)[str(node["id"])]["inputs"]["preview_every"] == 0
    node["widgets_values"] = saved[:3]  # saved before every input after `rank` existed: the host's defaults
    inputs = workflow_format.ui_to_api(workflow, object_info)[str(node["id"])]["inputs"]
    assert inputs["rank"] == saved[2] and inputs["seed"] == 0 and inputs["precision"] == "fp16"
    node["widgets_values"] = saved[:4]  # the seed without its "control after generate" value
    with pytest.raises(workflow_format.WorkflowError, match="too few widget values"):
        workflow_format.ui_to_api(workflow, object_info)
    node["widgets_values"] = saved[1:] + saved[:1]  # shifted by one
    with pytest.raises(workflow_format.WorkflowError, match="does not fit"):
        workflow_format.ui_to_api(workflow, object_info)
    node["widgets_values"] = saved + [1]
    with pytest.raises(workflow_format.WorkflowError, match="widget values"):
        workflow_format.ui_to_api(workflow, object_info)
    node["type"] = "NoSuchNode"
    with pytest.raises(workflow_format.WorkflowError, match="unknown node type 'NoSuchNode'"):
        workflow_format.ui_to_api(workflow, object_info)


@pytest.mark.external_pack
@pytest.mark.parametrize("workflow", IPADAPTER_WORKFLOWS, ids=[w.stem for w in IPADAPTER_WORKFLOWS])
def test_ipadapter_variants_fit_that_packs_node_definitions(server, workflow):
    """Not run (they need IP-Adapter model files), but every node type and widget count is
    checked against cubiq/ComfyUI_IPAdapter_plus's own definitions, loaded in the server."""
    if IPADAPTER_PACK is None:
        pytest.skip("IP-ADAPTER CHECK SKIPPED: set IPADAPTER_PACK_PATH to a copy of cubiq/ComfyUI_IPAdapter_plus")
    _, object_info = server
    prompt = workflow_format.ui_to_api(json.loads(workflow.read_text()), object_info)
    types = {node["class_type"] for node in prompt.values()}
    assert {"IPAdapterAdvanced", "IPAdapterModelLoader", "CLIPVisionLoader"} <= types
    core = workflow_format.for_host(json.loads(SHIPPED[json.loads(workflow.read_text())["extra"]["blora"]["key"]
                                                .removesuffix("_ipadapter")].read_text()), object_info)
    assert {n["type"] for n in core["nodes"]} - {"Note"} <= types, "the variant keeps the core workflow's nodes"


def test_run_with_checkpoint_loads_that_checkpoint(server):
    """``cli.py run WORKFLOW --checkpoint X``: the workflow's own checkpoint name is replaced."""
    from blora_pack.command_line import main

    _, object_info = server
    prompt = workflow_format.ui_to_api(json.loads(SHIPPED["rechar_character"].read_text()), object_info)
    main.use_checkpoint(prompt, "my_sdxl.safetensors")
    loaders = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders and all(n["inputs"]["ckpt_name"] == "my_sdxl.safetensors" for n in loaders)
    with pytest.raises(main.CommandLineError, match="no Load Checkpoint"):
        main.use_checkpoint({"1": {"class_type": "KSampler", "inputs": {}}}, "x.safetensors")
