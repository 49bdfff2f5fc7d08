"""``python cli.py COMMAND``: the seeds' entry points on top of ComfyUI used as a library.

Each command builds a ComfyUI graph of core nodes and this pack's nodes and runs it with the
host's own executor, so it does exactly what the same graph does in the editor. ``--tiny``
swaps the checkpoint for a tiny SDXL-architecture model with random weights (its images are
noise) so the whole path can be seen working on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .. import methods
from ..training.memory import SETTINGS as MEMORY_SETTINGS
from .comfyui import PACK_ROOT
from . import library as library_command
from . import flux_graph, training_options
from .runner import CommandLineError, node_definitions
from .session import Session, existing_lora, image_stem

WORKFLOWS = PACK_ROOT / "workflows"
UNZIPLORA = methods.by_key("unziplora")
UNZIP_TINY_STEPS = 12
"""``unzip train --tiny``'s default: enough steps for every column period on the tiny model."""
NEGATIVE = ""


def command_train(args) -> None:
    method = training_options.TRAIN_RECIPES[args.recipe]
    if method.nodes[0] == "SplitFluxTrain":
        return command_train_splitflux(args, method)
    if flux_graph.wants_flux(args):
        raise CommandLineError(f"--recipe {args.recipe} trains SDXL; on FLUX.1 use --recipe "
                               f"{', '.join(training_options.FLUX_RECIPES)}.")
    recipe = method.recipe
    session = Session(args)
    steps = training_options.steps_for(args.steps, args.tiny, recipe)
    name = args.name or f"b-lora/{image_stem(args.image)}"
    prompt = args.prompt or training_options.B_LORA_PROMPT
    session.graph.node("BLoRATrain", model=session.model, latents=session.image_latent(args.image),
                       positive=session.text(prompt), steps=steps, learning_rate=args.learning_rate or 0.0,
                       rank=args.rank or 0, seed=args.seed, lora_name=name, precision=args.precision,
                       recipe=recipe.name, prompt=prompt, export_diffusers=args.export_diffusers,
                       memory=args.memory, overwrite=args.overwrite)
    session.run()


def command_train_splitflux(args, method) -> None:
    """Train SplitFlux on FLUX.1: content and style files from one image."""
    for option, given in (("--rank", args.rank), ("--export-diffusers", args.export_diffusers)):
        if given:
            raise CommandLineError(f"{option} is not an option of {method.title} (its ranks are the paper's).")
    recipe = method.recipe
    session = Session(args, flux=True)
    prompt = args.prompt or recipe.settings["content_prompt"]
    style_prompt = args.style_prompt or recipe.settings["style_prompt"]
    session.graph.node("SplitFluxTrain", model=session.model, latents=session.image_latent(args.image),
                       positive=session.text(prompt), style_positive=session.text(style_prompt),
                       steps=training_options.steps_for(args.steps, args.tiny, recipe),
                       learning_rate=args.learning_rate or recipe.learning_rate, seed=args.seed,
                       lora_name=args.name or f"splitflux/{image_stem(args.image)}", precision=args.precision,
                       prompt=prompt, memory=args.memory, overwrite=args.overwrite)
    session.run()


def _with_blocks(session, args, content: str | None, style: str | None):
    """B-LoRA's blocks (strengths squared, as the official B-LoRA); on FLUX.1 SplitFlux's: the
    content file's main branch only (re-contextualisation) and the style blocks, strengths linear."""
    model = session.model
    if session.flux:
        mode, branches, strengths = "comfyui (linear)", {"content_branches": "main only"}, (1.0, 1.0)
    else:
        mode, branches, strengths = "official B-LoRA (squared)", {}, (1.0, 1.1)
    content_strength, style_strength = (_given(args.content_strength, strengths[0]),
                                        _given(args.style_strength, strengths[1]))
    if content:
        model = session.graph.node("BLoRALoadContentLoRA", model=model, lora_name=existing_lora(content),
                                   strength=content_strength, strength_mode=mode, **branches).out(0)
    if style:
        model = session.graph.node("BLoRALoadStyleLoRA", model=model, lora_name=existing_lora(style),
                                   strength=style_strength, strength_mode=mode).out(0)
    return model


def _fused_k_lora(session, args):
    """Content and style LoRA files fused by K-LoRA Fuse (official defaults, strengths linear)."""
    if not args.style:
        raise CommandLineError("--fuse k-lora needs --style (the style LoRA to fuse with the content LoRA).")
    return session.graph.node("KLoRAFuse", model=session.model, content_lora=existing_lora(args.content),
                              style_lora=existing_lora(args.style)).out(0)


FUSIONS = {"b-lora": lambda session, args: _with_blocks(session, args, args.content, args.style),
           "k-lora": _fused_k_lora}
"""How ``stylize --fuse`` builds each fusion method of the registry (``methods.fusions``)."""


def command_stylize(args) -> None:
    if not (args.style or args.text):
        raise CommandLineError("stylize needs --style (a style B-LoRA) or --text (a prompt such as 'A [c] made of gold').")
    if args.fuse == "k-lora" and not args.style:
        raise CommandLineError("--fuse k-lora needs --style (the style LoRA to fuse with the content LoRA).")
    session = Session(args, flux_graph.wants_flux(args))
    prompt = args.text or args.prompt or ("A <c> object in <s> style" if session.flux else "A [c] in [s] style")
    folder = "blora" if args.fuse == "b-lora" else args.fuse  # B-LoRA's images beside generate's, as before
    if session.flux and args.fuse == "b-lora":
        folder = "splitflux"
    session.sample(FUSIONS[args.fuse](session, args), prompt, f"{folder}/stylize", args)
    session.run()


def command_generate(args) -> None:
    session = Session(args, flux_graph.wants_flux(args))
    session.sample(_with_blocks(session, args, None, args.style), args.text, "blora/generate", args)
    session.run()


def command_unzip(args) -> None:
    session = Session(args)
    name = args.name or f"unziplora/{image_stem(args.image)}"
    if args.action == "train":
        recipe = UNZIPLORA.recipe
        settings = recipe.settings
        steps = args.steps if args.steps is not None else (UNZIP_TINY_STEPS if args.tiny else recipe.steps)
        session.graph.node("UnZipLoRATrain", model=session.checkpoint.out(0), latents=session.image_latent(args.image),
                           positive=session.text(args.prompt), content_positive=session.text(args.content_prompt),
                           style_positive=session.text(args.style_prompt), steps=steps,
                           content_learning_rate=recipe.learning_rate,
                           style_learning_rate=settings["style_learning_rate"],
                           merger_learning_rate=settings["merger_learning_rate"], rank=args.rank or recipe.rank,
                           sample_times=settings["sample_times"], column_ratio=settings["column_ratio"],
                           seed=args.seed, lora_name=name, precision=args.precision, prompt=args.prompt,
                           memory=args.memory, overwrite=args.overwrite)
    else:
        prompts = {f"{role}_positive": session.text(text) for role, text in
                   (("content", args.content_prompt), ("style", args.style_prompt)) if text}
        merged = session.graph.node("UnZipColumnMaskMerge", model=session.checkpoint.out(0),
                                    content_lora=existing_lora(args.content), style_lora=existing_lora(args.style),
                                    content_strength=_given(args.content_strength, 1.0),
                                    style_strength=_given(args.style_strength, 1.1),
                                    content_merger=args.content_merger, style_merger=args.style_merger, **prompts)
        session.sample(merged.out(0), args.prompt, "unziplora/recombined", args)
    session.run()


def _given(value, default):
    return default if value is None else value


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


CHECKPOINT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name"}


def use_checkpoint(prompt: dict, checkpoint: str) -> None:
    """``run --checkpoint``: every checkpoint loader of the workflow loads ``checkpoint``."""
    loaders = [node for node in prompt.values() if node["class_type"] in CHECKPOINT_LOADERS]
    if not loaders:
        raise CommandLineError("--checkpoint: this workflow has no Load Checkpoint node; set its model loader "
                               "with --set NODE.INPUT=VALUE instead.")
    for node in loaders:
        node["inputs"][CHECKPOINT_LOADERS[node["class_type"]]] = checkpoint


def command_run(args) -> None:
    """Any workflow (a shipped one by name, or a UI-format file), inputs overridden with --set."""
    from . import workflow_format

    path = Path(args.workflow)
    if not path.is_file():
        shipped = workflow_format.shipped(WORKFLOWS)
        by_title = {p.stem: p for p in shipped.values()}
        path = shipped.get(args.workflow.removesuffix(".json")) or by_title.get(args.workflow.removesuffix(".json"))
        if path is None:
            raise CommandLineError(f"No workflow {args.workflow!r}; shipped ones: {', '.join(sorted(shipped))}.")
    assignments = []
    for assignment in args.set:  # checked before ComfyUI starts
        match = re.fullmatch(r"(?P<node>[^.=]+)\.(?P<input>[^=]+)=(?P<value>.*)", assignment)
        if not match:
            raise CommandLineError(f"--set takes NODE.INPUT=VALUE (NODE: an id, title, name or type), got {assignment!r}.")
        assignments.append((assignment, match))
    workflow = json.loads(path.read_text())
    flux = flux_graph.wants_flux(args) or any(n["type"] == "UNETLoader" for n in workflow["nodes"])
    session = Session(args, flux)
    prompt = workflow_format.ui_to_api(workflow, node_definitions(session.nodes))
    if args.checkpoint:
        use_checkpoint(prompt, args.checkpoint)
    display = session.nodes.NODE_DISPLAY_NAME_MAPPINGS
    names = {str(n["id"]): {n.get("title"), n["type"], display.get(n["type"])} for n in workflow["nodes"]}
    for assignment, match in assignments:
        targets = [i for i in prompt if match["node"] == i or match["node"] in names.get(i, ())]
        if not targets:
            raise CommandLineError(f"--set {assignment!r}: no node with id, title, name or type {match['node']!r}.")
        for target in targets:
            prompt[target]["inputs"][match["input"]] = _parse_value(match["value"])
    if args.tiny:
        if flux:
            from devkit.tiny_flux import swap_flux_loaders_for_tiny as swap_loaders_for_tiny
        else:
            from .tiny import swap_loaders_for_tiny
        swap_loaders_for_tiny(prompt)
    session.run(prompt)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # every command: where ComfyUI and the model are
    common.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, two levels up, ~/ComfyUI)")
    common.add_argument("--checkpoint", help="an SDXL checkpoint in ComfyUI's checkpoints folder")
    common.add_argument("--tiny", action="store_true",
                        help="a tiny random SDXL-architecture model, or FLUX.1 with --flux (images are noise)")
    common.add_argument("--flux", action="store_true",
                        help="FLUX.1 instead of SDXL (implied by --unet and by train --recipe splitflux)")
    common.add_argument("--unet", help=f"a FLUX.1 diffusion model in diffusion_models (default {flux_graph.DEFAULT_FILES['unet']})")
    common.add_argument("--clip-l", help=f"FLUX.1's CLIP-L in text_encoders (default {flux_graph.DEFAULT_FILES['clip_l']})")
    common.add_argument("--t5", help=f"FLUX.1's T5-XXL in text_encoders (default {flux_graph.DEFAULT_FILES['t5']})")
    common.add_argument("--vae", help=f"FLUX.1's VAE in vae (default {flux_graph.DEFAULT_FILES['vae']})")
    common.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    common.add_argument("--output-dir", help="where images (and, with --tiny, LoRAs) go; $BLORA_OUTPUT_DIR wins")
    sampling = argparse.ArgumentParser(add_help=False)  # the commands that sample an image themselves
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--size", type=int, default=1024, help="sample size in pixels")
    sampling.add_argument("--sample-steps", type=int, default=30)
    sampling.add_argument("--cfg", type=float, default=5.0, help="SDXL (FLUX.1 runs at 1, with FluxGuidance 3.5)")
    training = argparse.ArgumentParser(add_help=False)  # the commands that train
    training.add_argument("--memory", choices=MEMORY_SETTINGS, default=MEMORY_SETTINGS[0],
                          help="training memory: auto (the fastest that fits the free VRAM, 8 GB if that runs out), "
                               "fastest, or 8 GB (gradient checkpointing, for 1024 px on an 8 GB card)")
    strengths = argparse.ArgumentParser(add_help=False)  # the commands that apply a content and a style LoRA
    strengths.add_argument("--content-strength", type=float,
                           help="SDXL: official alpha (squared), default 1.0; FLUX.1: linear, default 1.0")
    strengths.add_argument("--style-strength", type=float,
                           help="SDXL: official alpha (squared), default 1.1; FLUX.1: linear, default 1.0")
    main = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    commands = main.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common, sampling, training], help="an image and a checkpoint to a B-LoRA file")
    train.add_argument("--image", help="the picture to train on (with --tiny, default: a sample drawn in code)")
    train.add_argument("--prompt", help=f"default {training_options.B_LORA_PROMPT!r}; splitflux: its content prompt "
                                        f"({training_options.FLUX_RECIPES['splitflux'].recipe.settings['content_prompt']!r})")
    train.add_argument("--style-prompt", help="splitflux: the style prompt (default: the recipe's "
                                              f"{training_options.FLUX_RECIPES['splitflux'].recipe.settings['style_prompt']!r})")
    train.add_argument("--name", help="output name in the loras folder (default b-lora/<image name>)")
    training_options.add_recipe_arguments(train, training_options.TRAIN_RECIPES)
    training_options.add_precision_argument(train)
    train.add_argument("--export-diffusers", action="store_true", help="also write the official diffusers format")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a finished LoRA of the same name (default: the next free name, NAME_2, ...)")
    train.set_defaults(run=command_train)

    stylize = commands.add_parser("stylize", parents=[common, sampling, strengths], help="content B-LoRA with a style B-LoRA or a text")
    stylize.add_argument("--content", required=True, help="content B-LoRA (file in the loras folder)")
    stylize.add_argument("--style", help="style B-LoRA")
    stylize.add_argument("--text", help="a prompt instead of a style, e.g. 'A [c] made of gold'")
    stylize.add_argument("--prompt", help="the prompt with a style B-LoRA (default 'A [c] in [s] style')")
    stylize.add_argument("--fuse", choices=[m.key for m in methods.fusions()], default=methods.fusions()[0].key,
                         help="; ".join(f"{m.key}: {m.help}" for m in methods.fusions())
                         + " (b-lora: strengths squared, as the official B-LoRA; k-lora: its official defaults)")
    stylize.set_defaults(run=command_stylize)

    generate = commands.add_parser("generate", parents=[common, sampling, strengths], help="a style B-LoRA with a text")
    generate.add_argument("--style", required=True)
    generate.add_argument("--text", required=True, help="e.g. 'A backpack in [s] style'")
    generate.set_defaults(run=command_generate)

    unzip = commands.add_parser("unzip", parents=[common, sampling, training, strengths], help="UnZipLoRA: train, or recombine two LoRAs")
    unzip.add_argument("action", choices=("train", "recombine"))
    unzip.add_argument("--image", help="the picture to train on (with --tiny, default: a sample drawn in code)")
    unzip.add_argument("--prompt", required=True, help="combined prompt (train) or the sampling prompt (recombine)")
    unzip.add_argument("--content-prompt", help="train: the content prompt; recombine (optional, with --style-prompt): "
                                                "the content LoRA's own prompt, as the official inference")
    unzip.add_argument("--style-prompt", help="train: the style prompt; recombine: the style LoRA's own prompt")
    unzip.add_argument("--name")
    unzip.add_argument("--steps", type=int)
    unzip.add_argument("--rank", type=int, help=f"default: the recipe's ({UNZIPLORA.recipe.rank})")
    training_options.add_precision_argument(unzip)
    unzip.add_argument("--content", help="content LoRA (recombine)")
    unzip.add_argument("--style", help="style LoRA (recombine)")
    unzip.add_argument("--content-merger", default="none")
    unzip.add_argument("--style-merger", default="none")
    unzip.add_argument("--overwrite", action="store_true",
                       help="train: replace finished LoRAs of the same name (default: the next free name)")
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
