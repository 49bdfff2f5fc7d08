"""Writes the pack's subgraph blueprints (subgraphs/*.json): each main recipe as one node.

ComfyUI 0.33 serves a pack's ``subgraphs/*.json`` as blueprints (the node library's
"Subgraph Blueprints", found by their file name in search; 0.3.64 has no blueprints). A
blueprint here is the sampling part of a shipped workflow: the model, CLIP and VAE of your
checkpoint come in, the image comes out; inside, the pack's nodes with the recipe's settings,
the prompts, the latent and KSampler. Its LoRA files, strengths and prompt are shown on the node
itself (promoted widgets). Built from the same descriptions as the workflows, with the host's node
definitions:

    python -m tools.build_blueprints
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from devkit import PACK_ROOT as ROOT
from blora_pack.command_line.workflow_format import Node, build_ui
from tools import build_workflows as workflows

FOLDER = ROOT / "subgraphs"
CHECKPOINT_OUTPUTS = (("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"))
"""The subgraph's inputs: what the workflow took from its checkpoint loader, by output slot."""


@dataclass(frozen=True)
class Blueprint:
    name: str
    description: str
    describe: Callable[[], list[Node]]
    """A shipped workflow's nodes: checkpoint loader (id 1), ..., one SaveImage."""
    promoted: tuple[tuple[str, str], ...]
    """(node type, widget) shown on the blueprint node, in order."""


def sampling_part(nodes: list[Node]) -> list[Node]:
    """A workflow's nodes from the checkpoint loader's outputs to the image it saves."""
    return [n for n in nodes if n.type not in ("CheckpointLoaderSimple", "SaveImage")]


def _style_transfer(kind: str) -> Callable[[], list[Node]]:
    return lambda: workflows.b_lora_apply(kind)[0]


def _unzip_recombine() -> list[Node]:
    """UnZipLoRA's recombination of two saved files, prompt-separated (the workflow's right part)."""
    at = workflows.at
    return [workflows.checkpoint(1, at(0, 0)),
            workflows.text(50, "", 1, at(1, 3), "Negative (empty)"), workflows.empty_latent(51, at(1, 5)),
            workflows.text(55, "A monadikos cat in pop art style", 1, at(1, 0), "Prompt"),
            Node(56, "UnZipColumnMaskMerge", {"model": (1, 0), "content_lora": "unziplora/image_a_content.safetensors",
                                              "style_lora": "unziplora/image_b_style.safetensors",
                                              "content_merger": "none", "style_merger": "none",
                                              "content_positive": (60, 0), "style_positive": (61, 0)}, at(2, 0)),
            workflows.text(60, "A monadikos cat", 1, at(1, 7), "Content prompt"),
            workflows.text(61, "A cat in pop art style", 1, at(1, 9), "Style prompt"),
            *workflows.sample(57, (56, 0), (55, 0), (50, 0), (51, 0), (1, 2), "unziplora/recombined", 3, 0)]


LORAS = (("BLoRALoadContentLoRA", "lora_name"), ("BLoRALoadStyleLoRA", "lora_name"))
BLUEPRINTS = (
    Blueprint(f"{workflows.B_LORA.title} style transfer", "The content of one B-LoRA in the style of another.",
              _style_transfer("style_transfer"),
              (*LORAS, ("BLoRALoadContentLoRA", "strength"), ("BLoRALoadStyleLoRA", "strength"),
               ("CLIPTextEncode", "text"), ("KSampler", "seed"))),
    Blueprint(f"{workflows.B_LORA.title} text stylization", "A B-LoRA's content restyled by the prompt.",
              _style_transfer("text_stylization"), (LORAS[0], ("CLIPTextEncode", "text"), ("KSampler", "seed"))),
    Blueprint(f"{workflows.B_LORA.title} consistent style", "New subjects in a B-LoRA's style.",
              _style_transfer("consistent_style"), (LORAS[1], ("CLIPTextEncode", "text"), ("KSampler", "seed"))),
    Blueprint(f"{workflows.K_LORA.title} fusion", "Any content LoRA with any style LoRA, fused with no training.",
              lambda: workflows.k_lora_fuse()[0],
              (("KLoRAFuse", "content_lora"), ("KLoRAFuse", "style_lora"), ("CLIPTextEncode", "text"),
               ("KSampler", "seed"))),
    Blueprint(f"{workflows.UNZIPLORA.title} recombination", "A content LoRA and a style LoRA (UnZipLoRA files) "
              "recombined as the official inference.", _unzip_recombine,
              (("UnZipColumnMaskMerge", "content_lora"), ("UnZipColumnMaskMerge", "style_lora"),
               ("CLIPTextEncode", "text"), ("KSampler", "seed"))),
)


def build(blueprint: Blueprint, object_info: dict) -> dict:
    nodes = blueprint.describe()
    saved = next(n for n in nodes if n.type == "SaveImage").inputs["images"]
    wired = []  # (inner node, input, checkpoint output slot)
    inner = sampling_part(nodes)
    for node in inner:
        node.properties.update(workflows.node_properties(node, {}))
        for name, value in list(node.inputs.items()):
            if isinstance(value, tuple) and value[0] == 1:
                wired.append((node.id, name, value[1]))
                del node.inputs[name]
    ui = build_ui(inner, [], object_info)
    used = sorted({slot for _, _, slot in wired})
    links = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4], "type": l[5]}
             for l in ui["links"]]
    by_id = {n["id"]: n for n in ui["nodes"]}
    inputs = []
    for index, slot in enumerate(used):
        name, kind = CHECKPOINT_OUTPUTS[slot]
        ids = []
        for node_id, input_name, _ in [w for w in wired if w[2] == slot]:
            link_id = len(links) + 1 + max([0, *[l["id"] for l in links]])
            target = by_id[node_id]
            target_slot = next(i for i, e in enumerate(target["inputs"]) if e["name"] == input_name)
            target["inputs"][target_slot]["link"] = link_id
            links.append({"id": link_id, "origin_id": -10, "origin_slot": index, "target_id": node_id,
                          "target_slot": target_slot, "type": kind})
            ids.append(link_id)
        inputs.append({"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{blueprint.name}/in/{name}")), "name": name,
                       "type": kind, "linkIds": ids, "localized_name": name, "label": name, "pos": [0, 40 * index]})
    out_link = max(l["id"] for l in links) + 1
    links.append({"id": out_link, "origin_id": saved[0], "origin_slot": saved[1], "target_id": -20, "target_slot": 0,
                  "type": "IMAGE"})
    by_id[saved[0]]["outputs"][saved[1]]["links"] = [out_link]
    outputs = [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{blueprint.name}/out/IMAGE")), "name": "IMAGE",
                "type": "IMAGE", "linkIds": [out_link], "localized_name": "IMAGE", "label": "IMAGE", "pos": [0, 0]}]
    promoted = []
    for node_type, widget in blueprint.promoted:  # the first such node not shown yet; a prompt before a negative
        candidates = sorted((n for n in ui["nodes"] if n["type"] == node_type and [str(n["id"]), widget] not in promoted),
                            key=lambda n: n.get("title", "").startswith("Negative"))
        promoted.append([str(candidates[0]["id"]), widget])
    definition_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"blora-content-style/{blueprint.name}"))
    definition = {
        "id": definition_id, "version": 1, "revision": 0, "config": {},
        "state": {"lastGroupId": 0, "lastNodeId": max(by_id), "lastLinkId": out_link, "lastRerouteId": 0},
        "name": blueprint.name, "category": workflows.B_LORA.title, "description": blueprint.description,
        "inputNode": {"id": -10, "bounding": [-200, 0, 120, 40 + 40 * len(inputs)]},
        "outputNode": {"id": -20, "bounding": [2400, 0, 120, 60]},
        "inputs": inputs, "outputs": outputs, "widgets": [], "nodes": ui["nodes"], "groups": [], "links": links,
        "extra": {}}
    instance = {"id": 1000, "type": definition_id, "pos": [0, 0], "size": [300, 60 + 26 * len(promoted)], "flags": {},
                "order": 0, "mode": 0,
                "inputs": [{"label": i["name"], "localized_name": i["name"], "name": i["name"], "type": i["type"],
                            "link": None} for i in inputs],
                "outputs": [{"label": "IMAGE", "localized_name": "IMAGE", "name": "IMAGE", "type": "IMAGE", "links": []}],
                "properties": {"proxyWidgets": promoted, "cnr_id": workflows.PACK_ID}, "widgets_values": [],
                "title": blueprint.name}
    return {"revision": 0, "last_node_id": 1000, "last_link_id": 0, "version": 0.4, "nodes": [instance], "links": [],
            "extra": {"BlueprintDescription": blueprint.description}, "definitions": {"subgraphs": [definition]}}


def main() -> None:
    from devkit import host, server as server_harness

    if host.COMFYUI_PATH is None:
        sys.exit(host.NO_HOST_REASON)
    with server_harness.comfy_server(host.COMFYUI_PATH, Path(tempfile.mkdtemp())) as url:
        object_info = server_harness.get_json(url, "/object_info")
    FOLDER.mkdir(exist_ok=True)
    for old in FOLDER.glob("*.json"):
        old.unlink()
    for blueprint in BLUEPRINTS:
        (FOLDER / f"{blueprint.name}.json").write_text(json.dumps(build(blueprint, object_info), indent=1) + "\n")
        print("wrote", blueprint.name)


if __name__ == "__main__":
    main()
