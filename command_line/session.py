"""A command's ComfyUI session: the host started as a library, and the graph pieces every
command builds (checkpoint, prompt, image latent, sampling) and runs with the host's executor."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import flux_graph, sample_image
from .comfyui import find_comfyui, is_comfyui_checkout, start_comfyui
from .runner import CommandLineError, run_prompt

WRITTEN_UI_KEY = "blora_files"
"""The training nodes' UI output listing the files they wrote (``nodes/schema.py``)."""

NEGATIVE = ""


class Session:
    """ComfyUI started for one command, with the graph pieces every command uses."""

    def __init__(self, args, flux: bool = False):
        """``flux``: FLUX.1 (``flux_graph``) instead of an SDXL checkpoint."""
        import torch

        path = Path(args.comfyui).expanduser() if args.comfyui else find_comfyui()[0]
        if path is None:
            raise CommandLineError(f"ComfyUI not found ({find_comfyui()[1]}); give --comfyui or set COMFYUI_PATH.")
        if not is_comfyui_checkout(path):
            raise CommandLineError(f"--comfyui {path}: no ComfyUI there (no comfy/ and nodes.py); give ComfyUI's folder.")
        self.tiny = args.tiny
        self.flux = flux
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

            self.nodes.NODE_CLASS_MAPPINGS.update(flux_graph.tiny_nodes() if flux else TINY_NODES)
            folder_paths.set_input_directory(folder_paths.get_output_directory())  # the image inbox too
            loras = Path(folder_paths.get_output_directory()) / "loras"
            loras.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
            family = "FLUX.1" if flux else "SDXL"
            print(f"--tiny: a tiny {family}-architecture model with random weights; its images are noise. "
                  f"Files go to {folder_paths.get_output_directory()}.")
        if flux:
            self.checkpoint = None
            self.model, self.clip, self.vae = flux_graph.load(self.graph, args, self.tiny)
        else:
            self.checkpoint = self.load_checkpoint(args.checkpoint)
            self.model, self.clip, self.vae = (self.checkpoint.out(i) for i in range(3))

    def load_checkpoint(self, name: str | None):
        if self.tiny:
            return self.graph.node("TinySDXLCheckpointLoader", seed=0)
        if not name:
            found = self.folder_paths.get_filename_list("checkpoints")
            raise CommandLineError("Give --checkpoint (an SDXL file in ComfyUI's checkpoints folder"
                                   + (f", e.g. {found[0]}" if found else "") + ") or run with --tiny.")
        return self.graph.node("CheckpointLoaderSimple", ckpt_name=name)

    def text(self, prompt: str):
        if self.flux:
            return flux_graph.text(self.graph, prompt, self.clip)
        if self.tiny:
            return self.graph.node("TinyTextEncode", text=prompt).out(0)
        return self.graph.node("CLIPTextEncode", text=prompt, clip=self.clip).out(0)

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
        if self.flux:
            scaled = flux_graph.scaled(self.graph, loaded.out(0), flux_graph.TINY_SIZE if self.tiny else 1024)
        else:
            scaled = self.graph.node("ImageScaleToTotalPixels", image=loaded.out(0), upscale_method="lanczos",
                                     megapixels=0.02 if self.tiny else 1.0).out(0)
        return self.graph.node("VAEEncode", pixels=scaled, vae=self.vae).out(0)

    def sample(self, model, prompt: str, prefix: str, args, latent=None, denoise: float = 1.0):
        size = 64 if self.tiny else args.size
        positive = self.text(prompt)
        if self.flux:
            latent = latent or flux_graph.empty_latent(self.graph, size)
            positive, settings = flux_graph.guided(self.graph, positive), flux_graph.SAMPLER
        else:
            latent = latent or self.graph.node("EmptyLatentImage", width=size, height=size, batch_size=1).out(0)
            settings = {"cfg": args.cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
        sampled = self.graph.node("KSampler", model=model, seed=args.seed, steps=4 if self.tiny else args.sample_steps,
                                  **settings, positive=positive, negative=self.text(NEGATIVE), latent_image=latent,
                                  denoise=denoise)
        decoded = self.graph.node("VAEDecode", samples=sampled.out(0), vae=self.vae)
        self.graph.node("SaveImage", images=decoded.out(0), filename_prefix=prefix)

    def run(self, prompt: dict | None = None) -> dict:
        """Run the graph; print each image, status text and LoRA file it wrote."""
        outputs = run_prompt(prompt or self.graph.finalize())
        for result in outputs.values():
            for image in result.get("images", []):
                print("image:", Path(self.folder_paths.get_output_directory()) / image["subfolder"] / image["filename"])
            for text in result.get("text", []):
                print(text)
            for path in result.get(WRITTEN_UI_KEY, []):
                print("lora:", path)
        return outputs


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
