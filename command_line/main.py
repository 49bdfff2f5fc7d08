"""``python cli.py COMMAND``: the seeds' entry points on top of ComfyUI used as a library.

Each command builds a ComfyUI graph of core nodes and this pack's nodes and runs it with the
host's own executor, so it does exactly what the same graph does in the editor. ``--tiny``
swaps the checkpoint for a tiny SDXL-architecture model with random weights (its images are
noise) so the whole path can be seen working on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from ..training.memory import SETTINGS as MEMORY_SETTINGS
from ..training.recipes import PRECISIONS
from .comfyui import PACK_ROOT, find_comfyui, start_comfyui
from . import library as library_command
from . import sample_image, training_options
from .runner import CommandLineError, node_definitions, run_prompt

WORKFLOWS = PACK_ROOT / "workflows"
NEGATIVE = ""


class Session:
    """ComfyUI started for one command, with the graph pieces every command uses."""

    def __init__(self, args):
        import torch

        path = Path(args.comfyui).expanduser() if args.comfyui else find_comfyui()[0]
        if path is None:
            raise CommandLineError(f"ComfyUI not found ({find_comfyui()[1]}); give --comfyui or set COMFYUI_PATH.")
        self.tiny = args.tiny
        self.nodes = start_comfyui(path, cpu=args.cpu or not torch.cuda.is_available())
        import folder_paths
        from comfy_execution.graph_utils import GraphBuilder

        self.folder_paths = folder_paths
        self.graph = GraphBuilder()
        output = os.environ.get("BLORA_OUTPUT_DIR") or args.output_dir
        if output:
            Path(output).mkdir(parents=True, exist_ok=True)
            folder_paths.set_output_directory(str(Path(output).resolve()))
        if self.tiny:
            from .tiny import TINY_NODES

            self.nodes.NODE_CLASS_MAPPINGS.update(TINY_NODES)
            folder_paths.set_input_directory(folder_paths.get_output_directory())  # the image inbox too
            loras = Path(folder_paths.get_output_directory()) / "loras"
            loras.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
            print("--tiny: a tiny SDXL-architecture model with random weights; its images are noise. "
                  f"Files go to {folder_paths.get_output_directory()}.")
        self.checkpoint = self.load_checkpoint(args.checkpoint)

    def load_checkpoint(self, name: str | None):
        if self.tiny:
            return self.graph.node("TinySDXLCheckpointLoader", seed=0)
        if not name:
            found = self.folder_paths.get_filename_list("checkpoints")
            raise CommandLineError("Give --checkpoint (an SDXL file in ComfyUI's checkpoints folder"
                                   + (f", e.g. {found[0]}" if found else "") + ") or run with --tiny.")
        return self.graph.node("CheckpointLoaderSimple", ckpt_name=name)

    def text(self, prompt: str):
        if self.tiny:
            return self.graph.node("TinyTextEncode", text=prompt).out(0)
        return self.graph.node("CLIPTextEncode", text=prompt, clip=self.checkpoint.out(1)).out(0)

    def image_latent(self, image: str | None):
        """An image file encoded as a latent, scaled to about a megapixel as the official scripts do.
        With ``--tiny`` and no image, the sample drawn by ``sample_image``."""
        inbox = Path(self.folder_paths.get_input_directory()) / "blora_cli"
        inbox.mkdir(parents=True, exist_ok=True)
        if image is None:
            if not self.tiny:
                raise CommandLineError("Give --image (the picture to train on).")
            source = sample_image.write_sample(inbox)
            print(f"--tiny: training on the bundled sample image (drawn in code), {source}")
        else:
            source = Path(image).expanduser()
            if not source.is_file():
                raise CommandLineError(f"No image at {source}.")
            shutil.copyfile(source, inbox / source.name)
        loaded = self.graph.node("LoadImage", image=f"blora_cli/{source.name}")
        scaled = self.graph.node("ImageScaleToTotalPixels", image=loaded.out(0), upscale_method="lanczos",
                                 megapixels=0.02 if self.tiny else 1.0)
        return self.graph.node("VAEEncode", pixels=scaled.out(0), vae=self.checkpoint.out(2)).out(0)

    def sample(self, model, prompt: str, prefix: str, args, latent=None, denoise: float = 1.0):
        size = 64 if self.tiny else args.size
        latent = latent or self.graph.node("EmptyLatentImage", width=size, height=size, batch_size=1).out(0)
        sampled = self.graph.node("KSampler", model=model, seed=args.seed, steps=4 if self.tiny else args.sample_steps,
                                  cfg=args.cfg, sampler_name="dpmpp_2m", scheduler="karras",
                                  positive=self.text(prompt), negative=self.text(NEGATIVE), latent_image=latent,
                                  denoise=denoise)
        decoded = self.graph.node("VAEDecode", samples=sampled.out(0), vae=self.checkpoint.out(2))
        self.graph.node("SaveImage", images=decoded.out(0), filename_prefix=prefix)

    def run(self, prompt: dict | None = None) -> dict:
        outputs = run_prompt(prompt or self.graph.finalize())
        for result in outputs.values():
            for image in result.get("images", []):
                print("image:", Path(self.folder_paths.get_output_directory()) / image["subfolder"] / image["filename"])
            for text in result.get("text", []):
                print(text)
        return outputs

    def print_lora_files(self, name: str, suffixes=("",)) -> None:
        folder = Path(self.folder_paths.get_folder_paths("loras")[0])
        for suffix in suffixes:
            print("lora:", folder / lora_name(name + suffix))


def image_stem(image: str | None) -> str:
    return Path(image).stem if image else Path(sample_image.FILE_NAME).stem


def lora_name(value: str) -> str:
    return value if value.endswith(".safetensors") else value + ".safetensors"


def existing_lora(value: str) -> str:
    """``value`` as a file name in the loras folder, checked before the graph runs (the host's
    own check of a file list would only say "Value not in list")."""
    from ..host import model as host_model

    name = lora_name(value)
    try:
        host_model.lora_file_path(name)
    except FileNotFoundError as error:
        raise CommandLineError(str(error)) from None
    return name


def command_train(args) -> None:
    recipe = training_options.RECIPES[args.recipe]
    session = Session(args)
    steps = training_options.steps_for(args.steps, args.tiny, recipe)
    name = args.name or f"b-lora/{image_stem(args.image)}"
    session.graph.node("BLoRATrain", model=session.checkpoint.out(0), latents=session.image_latent(args.image),
                       positive=session.text(args.prompt), steps=steps,
                       learning_rate=args.learning_rate or recipe.learning_rate, rank=args.rank or recipe.rank,
                       seed=args.seed, lora_name=name,
                       precision=args.precision, recipe=recipe.name, prompt=args.prompt,
                       export_diffusers=args.export_diffusers, memory=args.memory)
    session.run()
    session.print_lora_files(name)


def _with_blocks(session, args, content: str | None, style: str | None):
    model = session.checkpoint.out(0)
    mode = "official B-LoRA (squared)"
    if content:
        model = session.graph.node("BLoRALoadContentLoRA", model=model, lora_name=existing_lora(content),
                                   strength=args.content_strength, strength_mode=mode).out(0)
    if style:
        model = session.graph.node("BLoRALoadStyleLoRA", model=model, lora_name=existing_lora(style),
                                   strength=args.style_strength, strength_mode=mode).out(0)
    return model


def _fused_k_lora(session, args):
    """Content and style LoRA files fused by K-LoRA Fuse (official defaults, strengths linear)."""
    return session.graph.node("KLoRAFuse", model=session.checkpoint.out(0), content_lora=existing_lora(args.content),
                              style_lora=existing_lora(args.style)).out(0)


def command_stylize(args) -> None:
    if args.fuse == "k-lora" and not args.style:
        raise CommandLineError("--fuse k-lora needs --style (the style LoRA to fuse with the content LoRA).")
    if not (args.style or args.text):
        raise CommandLineError("stylize needs --style (a style B-LoRA) or --text (a prompt such as 'A [c] made of gold').")
    session = Session(args)
    prompt = args.text or args.prompt or "A [c] in [s] style"
    if args.fuse == "k-lora":
        session.sample(_fused_k_lora(session, args), prompt, "k-lora/stylize", args)
    else:
        session.sample(_with_blocks(session, args, args.content, args.style), prompt, "blora/stylize", args)
    session.run()


def command_generate(args) -> None:
    session = Session(args)
    session.sample(_with_blocks(session, args, None, args.style), args.text, "blora/generate", args)
    session.run()


def command_unzip(args) -> None:
    session = Session(args)
    name = args.name or f"unziplora/{image_stem(args.image)}"
    if args.action == "train":
        steps = args.steps if args.steps is not None else (12 if args.tiny else 600)
        session.graph.node("UnZipLoRATrain", model=session.checkpoint.out(0), latents=session.image_latent(args.image),
                           positive=session.text(args.prompt), content_positive=session.text(args.content_prompt),
                           style_positive=session.text(args.style_prompt), steps=steps, content_learning_rate=5e-5,
                           style_learning_rate=5e-5, merger_learning_rate=5e-3, rank=args.rank,
                           sample_times=3, column_ratio=0.1, seed=args.seed,
                           lora_name=name, precision=args.precision,
                           prompt=args.prompt, memory=args.memory)
    else:
        prompts = {f"{role}_positive": session.text(text) for role, text in
                   (("content", args.content_prompt), ("style", args.style_prompt)) if text}
        merged = session.graph.node("UnZipColumnMaskMerge", model=session.checkpoint.out(0),
                                    content_lora=existing_lora(args.content), style_lora=existing_lora(args.style),
                                    content_strength=args.content_strength, style_strength=args.style_strength,
                                    content_merger=args.content_merger, style_merger=args.style_merger, **prompts)
        session.sample(merged.out(0), args.prompt, "unziplora/recombined", args)
    session.run()
    if args.action == "train":
        session.print_lora_files(name, ("_content", "_style"))


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def command_run(args) -> None:
    """Any workflow (a shipped one by name, or a UI-format file), inputs overridden with --set."""
    from ..core import workflow_format

    path = Path(args.workflow)
    if not path.is_file():
        path = WORKFLOWS / (args.workflow if args.workflow.endswith(".json") else args.workflow + ".json")
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in WORKFLOWS.glob("*.json")))
        raise CommandLineError(f"No workflow {args.workflow!r}; shipped ones: {shipped}.")
    session = Session(args)
    prompt = workflow_format.ui_to_api(json.loads(path.read_text()), node_definitions(session.nodes))
    display = session.nodes.NODE_DISPLAY_NAME_MAPPINGS
    names = {str(n["id"]): {n.get("title"), n["type"], display.get(n["type"])} for n in json.loads(path.read_text())["nodes"]}
    for assignment in args.set:
        match = re.fullmatch(r"(?P<node>[^.=]+)\.(?P<input>[^=]+)=(?P<value>.*)", assignment)
        if not match:
            raise CommandLineError(f"--set takes NODE.INPUT=VALUE (NODE: an id, title, name or type), got {assignment!r}.")
        targets = [i for i in prompt if match["node"] == i or match["node"] in names.get(i, ())]
        if not targets:
            raise CommandLineError(f"--set {assignment!r}: no node with id, title, name or type {match['node']!r}.")
        for target in targets:
            prompt[target]["inputs"][match["input"]] = _parse_value(match["value"])
    if args.tiny:
        from .tiny import swap_loaders_for_tiny

        swap_loaders_for_tiny(prompt)
    session.run(prompt)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, two levels up, ~/ComfyUI)")
    common.add_argument("--checkpoint", help="an SDXL checkpoint in ComfyUI's checkpoints folder")
    common.add_argument("--tiny", action="store_true", help="a tiny random SDXL-architecture model (images are noise)")
    common.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    common.add_argument("--output-dir", help="where images (and, with --tiny, LoRAs) go; $BLORA_OUTPUT_DIR wins")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--memory", choices=MEMORY_SETTINGS, default=MEMORY_SETTINGS[0],
                        help="training memory: auto (the fastest that fits the free VRAM, 8 GB if that runs out), "
                             "fastest, or 8 GB "
                             "(gradient checkpointing, for 1024 px on an 8 GB card)")
    common.add_argument("--size", type=int, default=1024, help="sample size in pixels")
    common.add_argument("--sample-steps", type=int, default=30)
    common.add_argument("--cfg", type=float, default=5.0)
    common.add_argument("--content-strength", type=float, default=1.0, help="official alpha (squared)")
    common.add_argument("--style-strength", type=float, default=1.1, help="official alpha (squared)")
    main = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    commands = main.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="an image and a checkpoint to a B-LoRA file")
    train.add_argument("--image", help="the picture to train on (with --tiny, default: a sample drawn in code)")
    train.add_argument("--prompt", default="A [v]")
    train.add_argument("--name", help="output name in the loras folder (default b-lora/<image name>)")
    train.add_argument("--steps", type=int)
    train.add_argument("--recipe", choices=sorted(training_options.RECIPES), default="b-lora",
                       help="b-lora: the two B-LoRA blocks (rank 64, lr 5e-5); style: all attention layers, the "
                            "style-LoRA recipe (rank 8, alpha 16, lr 1e-5)")
    train.add_argument("--rank", type=int, help="default: the recipe's")
    train.add_argument("--learning-rate", type=float, help="default: the recipe's")
    train.add_argument("--precision", choices=PRECISIONS, default="fp16")
    train.add_argument("--export-diffusers", action="store_true", help="also write the official diffusers format")
    train.set_defaults(run=command_train)

    stylize = commands.add_parser("stylize", parents=[common], help="content B-LoRA with a style B-LoRA or a text")
    stylize.add_argument("--content", required=True, help="content B-LoRA (file in the loras folder)")
    stylize.add_argument("--style", help="style B-LoRA")
    stylize.add_argument("--text", help="a prompt instead of a style, e.g. 'A [c] made of gold'")
    stylize.add_argument("--prompt", help="the prompt with a style B-LoRA (default 'A [c] in [s] style')")
    stylize.add_argument("--fuse", choices=("b-lora", "k-lora"), default="b-lora",
                         help="b-lora: the content block of --content with the style block of --style (strengths "
                              "squared, as the official B-LoRA); k-lora: the two whole LoRA files fused by K-LoRA "
                              "Fuse (the official defaults, strengths 1)")
    stylize.set_defaults(run=command_stylize)

    generate = commands.add_parser("generate", parents=[common], help="a style B-LoRA with a text")
    generate.add_argument("--style", required=True)
    generate.add_argument("--text", required=True, help="e.g. 'A backpack in [s] style'")
    generate.set_defaults(run=command_generate)

    unzip = commands.add_parser("unzip", parents=[common], help="UnZipLoRA: train, or recombine two LoRAs")
    unzip.add_argument("action", choices=("train", "recombine"))
    unzip.add_argument("--image", help="the picture to train on (with --tiny, default: a sample drawn in code)")
    unzip.add_argument("--prompt", required=True, help="combined prompt (train) or the sampling prompt (recombine)")
    unzip.add_argument("--content-prompt", help="train: the content prompt; recombine (optional, with --style-prompt): "
                                                "the content LoRA's own prompt, as the official inference")
    unzip.add_argument("--style-prompt", help="train: the style prompt; recombine: the style LoRA's own prompt")
    unzip.add_argument("--name")
    unzip.add_argument("--steps", type=int)
    unzip.add_argument("--rank", type=int, default=64)
    unzip.add_argument("--precision", choices=PRECISIONS, default="fp16")
    unzip.add_argument("--content", help="content LoRA (recombine)")
    unzip.add_argument("--style", help="style LoRA (recombine)")
    unzip.add_argument("--content-merger", default="none")
    unzip.add_argument("--style-merger", default="none")
    unzip.set_defaults(run=command_unzip)

    run = commands.add_parser("run", parents=[common], help="any shipped workflow, inputs overridden")
    run.add_argument("workflow", help="a shipped workflow's name (e.g. b-lora_train) or a UI-format .json file")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input of the node with that id, title or type (repeatable)")
    run.set_defaults(run=command_run)

    library_command.add_parser(commands)
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "unzip":
        needed = (("content_prompt", "style_prompt") + (() if args.tiny else ("image",)) if args.action == "train"
                  else ("content", "style"))
        missing = [f"--{name.replace('_', '-')}" for name in needed if not getattr(args, name)]
        if missing:
            print(f"error: unzip {args.action} needs {', '.join(missing)}", file=sys.stderr)
            return 2
    try:
        args.run(args)
    except CommandLineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
