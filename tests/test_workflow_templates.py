"""The shipped workflows as the editor's template browser and missing-models list read them.

The frontend lists ``<pack>/workflows/*.json`` by file name (the card's title) with
``<name>.jpg`` beside it as the picture; models a loader names come with their download URL and
folder on the node (``properties.models``), packs by their registry id (``properties.cnr_id``).
The workflows are built from the host's node definitions by ``tools.build_workflows``; these
tests redraw and rebuild from the same descriptions and compare.
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from PIL import Image

from devkit import PACK_ROOT, server as server_harness
from devkit.host import COMFYUI_PATH

from blora_pack.command_line import workflow_format
from tools import build_workflows, workflow_thumbnails

FOLDER = PACK_ROOT / "workflows"
SHIPPED = workflow_format.shipped(FOLDER)
PACK_VERSION = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def object_info(host, tmp_path_factory):
    with server_harness.comfy_server(COMFYUI_PATH, tmp_path_factory.mktemp("templates")) as url:
        yield server_harness.get_json(url, "/object_info"), url


def test_each_workflow_has_its_title_description_and_picture():
    assert {s.key for s in build_workflows.SHIPPED} == set(SHIPPED)
    for item in build_workflows.SHIPPED:
        path = SHIPPED[item.key]
        assert path.stem == item.title and not set("#?%") & set(item.title), "the file name is the browser's title"
        workflow = json.loads(path.read_text())
        assert workflow["extra"]["blora"]["description"] == item.description
        assert workflow["nodes"][-1]["widgets_values"][0].startswith(f"{item.title}\n{item.description}\n")
        picture = Image.open(path.with_suffix(".jpg"))
        assert picture.format == "JPEG" and picture.size[0] == picture.size[1]
        display = {n["type"]: n["type"] for n in workflow["nodes"]}  # titles only change the boxes' labels
        redrawn = build_workflows.thumbnail(item, workflow, {t: {"display_name": d} for t, d in display.items()})
        banner = workflow_thumbnails.BANNER
        difference = np.abs(np.asarray(picture, float)[-banner:] - np.asarray(redrawn, float)[-banner:]).mean()
        assert difference < 4, f"{path.name}: its picture shows another title or description; run tools.build_workflows"


def test_loaders_carry_their_models_and_nodes_their_pack():
    seen = set()
    for path in SHIPPED.values():
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "Note":
                continue
            properties = node["properties"]
            assert properties["cnr_id"] in {build_workflows.PACK_ID, build_workflows.IPADAPTER_PACK_ID, "comfy-core"}
            if node["type"] in build_workflows.pack_nodes():
                assert properties["cnr_id"] == build_workflows.PACK_ID and properties["ver"] == PACK_VERSION
            if node["type"] in build_workflows.IPADAPTER_NODES:
                assert properties["cnr_id"] == build_workflows.IPADAPTER_PACK_ID
            for value in node["widgets_values"]:
                if value in build_workflows.MODELS:
                    (model,) = [m for m in properties["models"] if m["name"] == value]  # DualCLIPLoader: two
                    assert model["url"].startswith("https://huggingface.co/")
                    assert model["directory"] == build_workflows.MODELS[value][0]
                    seen.add(value)
    assert seen == set(build_workflows.MODELS), "a model no shipped workflow loads"


def test_workflows_are_what_the_builder_writes(object_info):
    """Rebuilt from the descriptions with this host's node definitions (the IP-Adapter variants
    need that pack's and are compared by their core part in test_workflows)."""
    info, url = object_info
    for item in build_workflows.SHIPPED:
        if item.ipadapter:
            continue
        shipped = json.loads(SHIPPED[item.key].read_text())
        rebuilt = build_workflows.build(item, info, {})
        strip = lambda w: [{k: v for k, v in n.items() if k not in ("properties", "size")} for n in w["nodes"]]  # noqa: E731
        if "BatchImagesNode" in info:  # the primary host, which the shipped files are built from
            assert strip(rebuilt) == strip(shipped), f"{SHIPPED[item.key].name} is stale: run tools.build_workflows"
        else:  # an older host's core nodes have fewer widgets; the pack's nodes are the same
            ours = lambda w: [n for n in strip(w) if n["type"] in build_workflows.pack_nodes()]  # noqa: E731
            assert ours(rebuilt) == ours(shipped), f"{SHIPPED[item.key].name} is stale: run tools.build_workflows"


def test_batching_uses_the_hosts_node_and_loads_on_older_hosts(object_info):
    info, url = object_info
    workflow = json.loads(SHIPPED["lora_style_transfer_sdedit"].read_text())
    assert "BatchImagesNode" in {n["type"] for n in workflow["nodes"]}
    assert "ImageBatch" not in {n["type"] for n in workflow["nodes"]}
    prompt = workflow_format.ui_to_api(workflow, info)
    (batch,) = [n for n in prompt.values() if n["class_type"] in ("BatchImagesNode", "ImageBatch")]
    if "BatchImagesNode" in info:
        assert batch["class_type"] == "BatchImagesNode" and set(batch["inputs"]) == {"images.image0", "images.image1"}
        replacements = server_harness.get_json(url, "/node_replacements")
        (replacement,) = replacements["ImageBatch"]
        older, names = workflow_format.OLDER_HOST_NODES["BatchImagesNode"]
        assert replacement["new_node_id"] == "BatchImagesNode" and older == "ImageBatch"
        assert {m["new_id"]: m["old_id"] for m in replacement["input_mapping"]} == names
    else:
        assert batch["class_type"] == "ImageBatch" and set(batch["inputs"]) == {"image1", "image2"}
