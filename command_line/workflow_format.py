"""ComfyUI's two workflow formats, both directions, from the host's own node definitions.

- ``build_ui``: a compact description (nodes with their inputs, links as ``(node, slot)``, notes)
  to the UI format the graph editor loads and saves (``widgets_values`` positional).
- ``ui_to_api``: a UI-format workflow to the API format the executor runs, as the editor's
  "Export (API)" does: widgets to named inputs, links to ``[node, slot]``; widgets a workflow
  was saved without (inputs a newer host appended) get the host's defaults, and trailing values of
  a core node saved by a newer host are ignored, both as in the editor.
- ``fill_defaults``: the same defaults for an API-format prompt built in code (the CLI).

Both take ``object_info`` (the server's ``/object_info``): the input order, which inputs are
widgets, and the extra widget values the editor stores (a seed's "control after generate", an
image loader's upload button).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
NODE_WIDTH = 330
AUTOGROW = "COMFY_AUTOGROW_V3"
"""A V3 input that grows a socket per link (``images`` -> ``images.image0``, ``images.image1``, ...)."""

OLDER_HOST_NODES = {"BatchImagesNode": ("ImageBatch", {"images.image0": "image1", "images.image1": "image2"})}
"""Nodes of newer hosts, each with the node an older host has in its place and how the inputs map:
0.33 deprecates ``ImageBatch`` for ``BatchImagesNode`` (its ``nodes_replacements``, read
backwards), which 0.3.64 lacks. Workflows ship with the newer node; ``for_host`` (the command
line, the tests) and the editor extension (``js/``, from ``/blora/methods``) put the older one in
its place where the host has no newer one."""


class WorkflowError(ValueError):
    """A workflow the graph editor would not load as saved (unknown node, wrong widget count)."""


@dataclass
class Node:
    id: int
    type: str
    inputs: dict = field(default_factory=dict)
    """Input name to a literal widget value, or to ``(node id, output slot)`` for a link."""
    pos: tuple[int, int] = (0, 0)
    title: str | None = None
    properties: dict = field(default_factory=dict)
    """Saved with the node beside "Node name for S&R": ``cnr_id``/``ver`` (its pack), ``models``."""


@dataclass
class Note:
    id: int
    text: str
    pos: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (400, 160)


def _spec_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def _is_widget(spec) -> bool:
    """Inputs the editor shows as widgets (and stores in widgets_values); ``forceInput`` ones are sockets."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return _spec_type(spec) in WIDGET_TYPES and not options.get("forceInput")


def _ordered_inputs(info: dict, with_section: bool = False) -> list[tuple]:
    order = info.get("input_order") or {section: list(info["input"].get(section, {})) for section in ("required", "optional")}
    return [(name, info["input"][section][name], section) if with_section else (name, info["input"][section][name])
            for section in ("required", "optional") for name in order.get(section, [])]


def _extra_widget_values(spec) -> list:
    """Values the editor stores after a widget's own value."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extras = []
    if options.get("control_after_generate"):
        extras.append("fixed")
    if options.get("image_upload"):
        extras.append("image")
    return extras


def _default(spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(_spec_type(spec), "")


def _autogrow_names(name: str, spec, wanted) -> list[str]:
    """The sockets an autogrow input shows for the links in ``wanted``: those, and one empty more."""
    template = spec[1]["template"]
    prefix = f"{name}.{template['prefix']}"
    count = len([w for w in wanted if w.startswith(prefix)])
    return [f"{prefix}{i}" for i in range(min(max(count + 1, template.get("min", 1)), template.get("max", 50)))]


def build_ui(nodes: list[Node], notes: list[Note], object_info: dict, extra: dict | None = None) -> dict:
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    by_id = {node.id: node for node in nodes}
    for node in nodes:
        for name, value in node.inputs.items():
            if isinstance(value, tuple):
                source, slot = value
                output_type = object_info[by_id[source].type]["output"][slot]
                link_id = len(links) + 1
                links.append([link_id, source, slot, node.id, name, output_type])
                outgoing.setdefault((source, slot), []).append(link_id)
    for order, node in enumerate(nodes):
        if node.type not in object_info:
            raise WorkflowError(f"unknown node type {node.type}")
        info = object_info[node.type]
        autogrow = [name for name, spec in _ordered_inputs(info) if _spec_type(spec) == AUTOGROW]
        grown = {x for x in node.inputs if x.split(".", 1)[0] in autogrow}
        unknown = set(node.inputs) - {name for name, _ in _ordered_inputs(info)} - grown
        if unknown:
            raise WorkflowError(f"{node.type} has no inputs {sorted(unknown)}")
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            kind = _spec_type(spec)
            link = next((l[0] for l in links if l[3] == node.id and l[4] == name), None)
            if kind == AUTOGROW:
                minimum = spec[1]["template"].get("min", 1)
                for index, grown_name in enumerate(_autogrow_names(name, spec, node.inputs)):
                    link = next((l[0] for l in links if l[3] == node.id and l[4] == grown_name), None)
                    entry = {"name": grown_name, "localized_name": grown_name, "label": grown_name.split(".", 1)[1],
                             "type": next(iter(spec[1]["template"]["input"]["required"].values()))[0], "link": link}
                    inputs.append({**entry, "shape": 7} if index >= minimum else entry)
            elif _is_widget(spec):
                value = node.inputs.get(name, _default(spec))
                widgets += [_default(spec) if isinstance(value, tuple) else value, *_extra_widget_values(spec)]
                if link is not None:
                    inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link})
            else:
                inputs.append({"name": name, "type": kind, "link": link})
        outputs = [{"name": out_name, "type": out_type, "links": outgoing.get((node.id, slot), []), "slot_index": slot}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        ui_node = {"id": node.id, "type": node.type, "pos": list(node.pos),
                   "size": [NODE_WIDTH, 46 + 24 * (len(inputs) + len(widgets) + len(outputs))],
                   "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                   "properties": {"Node name for S&R": node.type, **node.properties}, "widgets_values": widgets}
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append(ui_node)
    for note in notes:
        ui_nodes.append({"id": note.id, "type": "Note", "pos": list(note.pos), "size": list(note.size), "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [note.text], "color": "#432", "bgcolor": "#653"})
    for link in links:  # the editor stores target slots as indices into the node's inputs list
        target = next(n for n in ui_nodes if n["id"] == link[3])
        link[4] = next(i for i, entry in enumerate(target["inputs"]) if entry["name"] == link[4])
    return {"last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, **(extra or {})}, "version": 0.4}


def for_host(workflow: dict, object_info: dict) -> dict:
    """The workflow with each node the host lacks replaced by the one an older host has in its
    place (``OLDER_HOST_NODES``), as the editor extension does when it loads one."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] in object_info or node["type"] not in OLDER_HOST_NODES:
            continue
        older, names = OLDER_HOST_NODES[node["type"]]
        if older not in object_info:
            continue
        node["type"] = older
        node["properties"]["Node name for S&R"] = older
        node["inputs"] = [{**entry, "name": names[entry["name"]]} for entry in node["inputs"] if entry["name"] in names]
    return workflow


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow; raises WorkflowError where the editor would
    not load it (unknown node type, widget values that do not fit the node's widgets)."""
    workflow = for_host(flatten_subgraphs(workflow), object_info)
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is muted or bypassed; ship workflows active")
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: unknown node type {node['type']!r}")
        linked = {entry["name"]: links[entry["link"]] for entry in node.get("inputs", []) if entry.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs, position = {}, 0
        for name, spec, section in _ordered_inputs(info, with_section=True):
            if _is_widget(spec):
                extras = _extra_widget_values(spec)
                if position + 1 + len(extras) > len(values):
                    if position == len(values):
                        inputs[name] = _default(spec)  # saved before this input was appended: the editor's default
                        continue
                    raise WorkflowError(f"node {node['id']} ({node['type']}): too few widget values for {name!r}")
                value = values[position]
                if not _fits(spec, value):
                    raise WorkflowError(f"node {node['id']} ({node['type']}): widget value {value!r} does not fit "
                                        f"input {name!r} ({_spec_type(spec)}); are the widget values shifted?")
                inputs[name] = value
                position += 1 + len(extras)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            if _spec_type(spec) == AUTOGROW:
                inputs.update({grown: [str(link[1]), link[2]] for grown, link in linked.items()
                               if grown.startswith(name + ".")})
        if position < len(values) and not info.get("python_module", "nodes").startswith("custom_nodes"):
            pass  # a core node saved by a newer host with widgets appended since: the editor ignores them too
        elif position != len(values):
            raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                                f"the node has {position}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _fits(spec, value) -> bool:
    """Whether a saved widget value has the type of its input (combo values are not checked
    against their options: a file list differs from machine to machine)."""
    kind = _spec_type(spec)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    return not isinstance(value, (dict, list))


def fill_defaults(prompt: dict, object_info: dict) -> dict:
    """An API-format prompt with every widget input it leaves out set to the host's default,
    as the editor does for a node saved before an input existed (e.g. 0.33's
    ``resolution_steps`` on Scale Image to Total Pixels)."""
    for node in prompt.values():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        for name, spec in _ordered_inputs(info):
            if _is_widget(spec) and name not in node["inputs"]:
                node["inputs"][name] = _default(spec)
    return prompt


def widget_index(node_type: str, name: str, object_info: dict) -> int:
    """Where a widget's value sits in a UI node's ``widgets_values``."""
    position = 0
    for input_name, spec in _ordered_inputs(object_info[node_type]):
        if not _is_widget(spec):
            continue
        if input_name == name:
            return position
        position += 1 + len(_extra_widget_values(spec))
    raise WorkflowError(f"{node_type} has no widget {name!r}")


def shipped(folder) -> dict:
    """The shipped workflows in ``folder`` by their short name (``extra.blora.key``, written by
    ``tools.build_workflows``; the file name is the template browser's title)."""
    from pathlib import Path

    found = {}
    for path in sorted(Path(folder).glob("*.json")):
        key = json.loads(path.read_text()).get("extra", {}).get("blora", {}).get("key")
        if key:
            found[key] = path
    return found


def flatten_subgraphs(workflow: dict) -> dict:
    """The workflow with each subgraph node (its type a ``definitions.subgraphs`` id) replaced by
    the nodes inside it, ids ``"<outer>:<inner>"`` and links rewired through the subgraph's
    inputs and outputs, as the editor does when it queues a workflow."""
    definitions = {d["id"]: d for d in workflow.get("definitions", {}).get("subgraphs", [])}
    if not any(n["type"] in definitions for n in workflow["nodes"]):
        return workflow
    workflow = json.loads(json.dumps(workflow))
    links = {link[0]: link for link in workflow["links"]}
    next_id = max([0, *links]) + 1
    nodes = []
    for outer in workflow["nodes"]:
        definition = definitions.get(outer["type"])
        if definition is None:
            nodes.append(outer)
            continue
        prefix = f"{outer['id']}:"
        inner_ids = {}
        for inner in definition["nodes"]:
            inner_ids[inner["id"]] = prefix + str(inner["id"])
            nodes.append({**inner, "id": inner_ids[inner["id"]],
                          "inputs": [{**i, "link": None} for i in inner.get("inputs", [])]})
        placed = {n["id"]: n for n in nodes}
        for link in definition["links"]:
            target_id = link["target_id"]
            if link["origin_id"] == -10:  # from the subgraph's input: from what feeds the outer node's input
                outer_link = links.get(outer["inputs"][link["origin_slot"]].get("link"))
                if outer_link is None:
                    continue
                origin, slot = outer_link[1], outer_link[2]
            else:
                origin, slot = inner_ids[link["origin_id"]], link["origin_slot"]
            if target_id == -20:  # to the subgraph's output: to every consumer of the outer node's output
                for outer_link in [l for l in links.values() if l[1] == outer["id"] and l[2] == link["target_slot"]]:
                    outer_link[1], outer_link[2] = origin, slot
                continue
            links[next_id] = [next_id, origin, slot, inner_ids[target_id], link["target_slot"], link["type"]]
            placed[inner_ids[target_id]]["inputs"][link["target_slot"]]["link"] = next_id
            next_id += 1
    return {**workflow, "nodes": nodes, "links": list(links.values())}
