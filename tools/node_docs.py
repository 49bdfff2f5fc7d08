"""What the editor shows about each node besides the node itself, generated from the nodes'
schemas and the method registry:

- ``locales/en/nodeDefs.json``: every node's name and description, every input's and output's
  name and tooltip, as ComfyUI's ``/i18n`` serves a pack's ``locales/<lang>/`` (the other
  languages are translations of it, kept by hand: ``tests/test_node_docs.py`` fails when one
  lacks a node or an input);
- ``js/docs/<node id>.md`` (and ``js/docs/<node id>/<lang>.md`` with the language's headings and
  tooltips): the editor's node help page, read from the pack's web folder's ``docs/``;
  ``js/docs/images/``: the picture of a workflow that uses the node (the template's picture).

The prose on errors is written once here (``ERRORS``); everything else comes from the schemas
(what a node does, its inputs with defaults and ranges, tooltips) and the registry (the paper,
where each default comes from). Run after changing a node or the registry:

    python -m tools.node_docs
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from devkit import PACK_ROOT as ROOT

LOCALES = ROOT / "locales"
DOCS = ROOT / "js" / "docs"
LANGUAGES = ("zh", "ja")
"""Translated beside English (ComfyUI's locale codes: Simplified Chinese, Japanese)."""

SOURCE_ALIASES = {"content_learning_rate": ("learning_rate",), "beta": ("beta_s*", "beta_s"),
                  "prompt": ("content_prompt",)}
"""Inputs named other than the registry's numbers they default to."""

ERRORS = {
    "BLoRATrain": [
        ("The latents input holds no image / has N channels but this model works on M",
         "Encode your image with VAE Encode from the same SDXL checkpoint's VAE and connect its LATENT."),
        ("The latents contain NaN/inf", "The fp16 SDXL VAE overflowed: use the fp16-fix VAE or encode in fp32."),
        ("The positive conditioning is empty / has no pooled output",
         "Connect a CLIP Text Encode fed by the SDXL checkpoint's CLIP (prompt 'A [v]')."),
        ("N latent image(s) but M conditionings", "Give one prompt for all images or one per image, in order."),
        ("Training needs this model loaded without dynamic VRAM",
         "Load the model with Load Checkpoint, or start ComfyUI with --disable-dynamic-vram."),
        ("A file cannot be saved (disk full, read-only folder, name too long)",
         "The message names the cause: free space, choose another lora_name, or fix the folder's permissions."),
        ("Out of GPU memory", "Set memory to 8 GB (gradient checkpointing) or train at a smaller size."),
    ],
    "UnZipLoRATrain": [
        ("The content/style conditioning must be one prompt",
         "Connect one CLIP Text Encode to each of content_positive and style_positive."),
        ("The latents / conditioning do not fit the model", "As for Train B-LoRA: encode with the checkpoint's own "
                                                            "VAE and CLIP."),
        ("Out of GPU memory", "Set memory to 8 GB; UnZipLoRA trains two LoRAs and needs more memory than B-LoRA."),
    ],
    "SplitFluxTrain": [
        ("Train SplitFlux needs a FLUX.1 model; the MODEL input is ...",
         "Load FLUX.1 dev or schnell with Load Diffusion Model (fp8 weights work) or an all-in-one checkpoint. "
         "For SDXL use Train B-LoRA or Train UnZipLoRA."),
        ("The latents input holds no image / has N channels but this model works on M",
         "Encode your image with VAE Encode and the FLUX VAE (ae.safetensors), 16 latent channels."),
        ("The latent is W x H; FLUX patches 2 x 2 latent pixels",
         "Use an image whose sides are multiples of 16 pixels (crop or resize it before VAE Encode)."),
        ("The positive (content) / style conditioning is empty or is not FLUX's",
         "Encode both prompts with CLIP Text Encode fed by DualCLIPLoader type flux (clip_l + t5xxl)."),
        ("N latent image(s) but M conditionings", "Give one content prompt for all images or one per image, in order."),
        ("The style prompt has N text tokens but the content prompt M",
         "Prompt replacement needs prompts of the same token length: write the style prompt like the content "
         "prompt ('A <s> style' beside 'A <c> object'), or turn prompt_replacement off."),
        ("The mask covers N image tokens but the image has M",
         "Connect a mask of the trained image (any size: it is resized onto the tokens), or leave mask empty."),
        ("Training needs this model loaded without dynamic VRAM",
         "Load the model with Load Diffusion Model, or start ComfyUI with --disable-dynamic-vram."),
        ("A file cannot be saved (disk full, read-only folder, name too long, a name outside the loras folder)",
         "The message names the cause: free space, choose another lora_name, or fix the folder's permissions. "
         "Two files are written: <name>_content and <name>_style."),
        ("The checkpoint is at step N but steps is M", "Set steps to N or more to finish that run, or turn resume off."),
        ("Out of GPU memory",
         "Set memory to 8 GB (about 12.6 GiB at 1024 px with fp8 weights), load FLUX.1 with weight_dtype "
         "fp8_e4m3fn, or train at a smaller size; with a checkpoint saved, run again with resume on."),
    ],
    "BLoRALoadContentLoRA": [
        ("The file is not a LoRA / a LoHa, LoKr or DoRA file / is incomplete",
         "Pick a LoRA file (B-LoRA, kohya or diffusers); the message names the file and what it holds."),
        ("A layer's shape does not fit the model",
         "The LoRA was trained for another model: use an SDXL LoRA on SDXL, a FLUX.1 LoRA on FLUX.1."),
        ("On FLUX: strength_mode 'official' is B-LoRA's (SDXL)", "Use strength_mode 'comfyui' on a FLUX.1 model."),
        ("On FLUX: FLUX LoRAs are read from .safetensors files", "Pick a .safetensors LoRA file."),
        ("On FLUX: the file is not a SplitFlux content file, so it has no main branch",
         "content_branches 'main only' needs a file written by Train SplitFlux: use 'main + residual' for others."),
    ],
    "UnZipColumnMaskMerge": [
        ("The content/style conditioning must be one prompt", "Connect one CLIP Text Encode to each prompt input, "
                                                              "or none for a plain weight merge."),
        ("Damaged merger vectors in a file's metadata", "Retrain or pick the official *_merger_*.pth files."),
    ],
    "KLoRAFuse": [
        ("The two LoRAs share no layer", "Pick a content LoRA and a style LoRA trained on the same layers."),
        ("The model is neither SDXL nor FLUX.1", "K-LoRA Fuse works on SDXL and FLUX.1 models with LoRAs for them."),
        ("On FLUX: FLUX LoRAs are read from .safetensors files", "Pick .safetensors LoRA files."),
    ],
    "ReCharStructureFuse": [
        ("structure_start must be below structure_end", "Set structure_start lower than structure_end."),
    ],
}
ERRORS["BLoRALoadStyleLoRA"] = ERRORS["BLoRALoadContentLoRA"][:-1]  # content_branches is Load Content LoRA's
COMMON_ERROR = ("Every error message says what was wrong and what to do: in ComfyUI 0.33's editor it is in the "
                "error toast; the full report is under View details.")


def start_host():
    from devkit import host

    return host.start_found_host()


def schemas(started) -> list:
    return [node_class.define_schema() for node_class in started.pack("nodes").node_classes()]


I18N_SPECIAL = "{}@|$"
"""Characters vue-i18n (the frontend's) reads as syntax in a message: written as ``{'x'}``."""


def i18n_escape(text: str) -> str:
    return "".join(f"{{'{c}'}}" if c in I18N_SPECIAL else c for c in text)


def i18n_unescape(text: str) -> str:
    for c in I18N_SPECIAL:
        text = text.replace(f"{{'{c}'}}", c)
    return text


def en_node_defs(all_schemas) -> dict:
    """``locales/en/nodeDefs.json``: the schemas' own strings, keyed as the frontend looks them up."""
    defs = {}
    for schema in all_schemas:
        def text(name, tooltip):
            return {"name": i18n_escape(name), **({"tooltip": i18n_escape(tooltip)} if tooltip else {})}
        defs[schema.node_id] = {
            "display_name": i18n_escape(schema.display_name), "description": i18n_escape(schema.description),
            "inputs": {i.id: text(i.display_name or i.id, i.tooltip) for i in schema.inputs},
            "outputs": {str(n): text(o.display_name or o.io_type, o.tooltip) for n, o in enumerate(schema.outputs)}}
    return defs


def _sources(methods_of_node, input_id: str) -> list[str]:
    keys = SOURCE_ALIASES.get(input_id, (input_id,))
    found = []
    for method in methods_of_node:
        sources = {**(method.recipe.sources if method.recipe else {}), **method.sources}
        for name in keys:
            if name in sources:
                label = method.title if len(keys) == 1 else f"{method.title} ({name})"
                found.append(f"{label}: {sources[name]}" if len(methods_of_node) > 1 or len(keys) > 1
                             else sources[name])
    return found


MODEL_FILES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def _range(i) -> str:
    low, high = getattr(i, "min", None), getattr(i, "max", None)
    if low is None and high is None:
        options = [o for o in getattr(i, "options", None) or () if not str(o).endswith(MODEL_FILES)]
        fixed = options and getattr(i, "default", None) in options  # a file list differs between machines
        return " / ".join(f"`{o}`" for o in options) if fixed and len(options) <= 4 else ""
    number = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    return f"{number(low)} to {number(high)}" if low is not None and high is not None else ""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def help_page(schema, lang: str, defs: dict, headings: dict, picture: str | None) -> str:
    from blora_pack import methods

    node_methods = [m for m in methods.METHODS if schema.node_id in m.nodes]
    own = json.loads(i18n_unescape(json.dumps(defs.get(schema.node_id, {}), ensure_ascii=False)))
    h = headings
    lines = [f"# {own.get('display_name', schema.display_name)}", "", own.get("description", schema.description), ""]
    for method in node_methods:
        lines.append(f"**{h['method']}:** {method.title}: {method.help}. {h['paper']}: {method.paper}.")
        lines.append("")
    if picture:
        lines += [f"![{h['picture']}](images/{picture})", ""]
    lines += [f"## {h['inputs']}", "", f"| {h['input']} | {h['type']} | {h['default']} | {h['range']} | "
              f"{h['what']} | {h['source']} |", "|---|---|---|---|---|---|"]
    for i in schema.inputs:
        text = own.get("inputs", {}).get(i.id, {})
        default = getattr(i, "default", None)
        shown = "" if default is None else f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        required = "" if i.optional else f" ({h['required']})"
        lines.append(f"| `{i.id}`{required} | {i.io_type} | {_cell(shown)} | {_cell(_range(i))} | "
                     f"{_cell(text.get('tooltip', i.tooltip or ''))} | {_cell('; '.join(_sources(node_methods, i.id)))} |")
    lines += ["", f"## {h['outputs']}", ""]
    for index, o in enumerate(schema.outputs):
        text = own.get("outputs", {}).get(str(index), {})
        tooltip = text.get("tooltip", o.tooltip or "")
        lines.append(f"- `{o.display_name or o.io_type}` ({o.io_type})" + (f": {tooltip}" if tooltip else ""))
    lines += ["", f"## {h['errors']}", "", COMMON_ERROR, ""]
    for error, what in ERRORS.get(schema.node_id, []):
        lines.append(f"- **{error}**: {what}")
    return "\n".join(lines).rstrip() + "\n"


def pictures() -> dict[str, Path]:
    """Per node id, the picture of the first shipped workflow that uses it."""
    from blora_pack.command_line import workflow_format

    found = {}
    shipped = workflow_format.shipped(ROOT / "workflows")
    for key, path in sorted(shipped.items(), key=lambda item: (item[0].endswith("_ipadapter"), item[0])):
        for node in json.loads(path.read_text())["nodes"]:
            found.setdefault(node["type"], path.with_suffix(".jpg"))
    return found


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def generated(all_schemas) -> dict[Path, str | Path]:
    """Every generated file: its text, or the file it is a copy of."""
    en = en_node_defs(all_schemas)
    files: dict[Path, str | Path] = {LOCALES / "en" / "nodeDefs.json": json.dumps(en, indent=1, ensure_ascii=False) + "\n"}
    shown = pictures()
    for schema in all_schemas:
        picture = shown.get(schema.node_id)
        name = None
        if picture is not None:
            name = json.loads(picture.with_suffix(".json").read_text())["extra"]["blora"]["key"] + ".jpg"
            files[DOCS / "images" / name] = picture
        for lang in ("en", *LANGUAGES):
            defs = en if lang == "en" else read_json(LOCALES / lang / "nodeDefs.json")
            headings = read_json(LOCALES / lang / "main.json")["bloraHelp"]
            path = DOCS / f"{schema.node_id}.md" if lang == "en" else DOCS / schema.node_id / f"{lang}.md"
            files[path] = help_page(schema, lang, defs, headings, name)
    return files


def main() -> None:
    from devkit import host

    if host.COMFYUI_PATH is None:
        sys.exit(host.NO_HOST_REASON)
    files = generated(schemas(start_host()))
    if DOCS.exists():
        shutil.rmtree(DOCS)
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_text(content)
        print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
