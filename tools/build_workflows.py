"""Writes the shipped example workflows (workflows/*.json, UI format) from the descriptions below.

Node definitions come from a real ComfyUI server started on loopback with this pack (found as
for the tests), so widget order and defaults are the host's. Run after changing a node's inputs:

    python -m tools.build_workflows
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from devkit import PACK_ROOT as ROOT
from blora_pack import methods
from blora_pack.command_line.workflow_format import OLDER_HOST_NODES, Node, Note, build_ui
from tools import flux_workflows

SPLITFLUX = methods.by_key("splitflux")
B_LORA, STYLE_LORA, UNZIPLORA, K_LORA, RECHAR = (methods.by_key(k) for k in ("b-lora", "style", "unziplora", "k-lora",
                                                                             "rechar"))
CHECKPOINT = "sd_xl_base_1.0.safetensors"
MODELS = {  # what each model file a workflow loads is, where ComfyUI keeps it, where to download it
    CHECKPOINT: ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                                "sd_xl_base_1.0.safetensors"),
    "controlnet-canny-sdxl-1.0.safetensors": ("controlnet", "https://huggingface.co/diffusers/controlnet-canny-sdxl-1.0/"
                                                            "resolve/main/diffusion_pytorch_model.safetensors"),
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": ("clip_vision", "https://huggingface.co/h94/IP-Adapter/resolve/main/"
                                                                   "models/image_encoder/model.safetensors"),
    "ip-adapter_sdxl_vit-h.safetensors": ("ipadapter", "https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/"
                                                       "ip-adapter_sdxl_vit-h.safetensors"),
    "ip_plus_composition_sdxl.safetensors": ("ipadapter", "https://huggingface.co/ostris/ip-composition-adapter/resolve/"
                                                          "main/ip_plus_composition_sdxl.safetensors"),
    flux_workflows.UNET: ("diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/"
                                              "flux1-dev.safetensors"),
    flux_workflows.CLIP_L: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                                             "clip_l.safetensors"),
    flux_workflows.T5XXL: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                                            "t5xxl_fp16.safetensors"),
    flux_workflows.VAE: ("vae", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors"),
}
PACK_ID = "blora-content-style"
"""The pack's Comfy Registry id (pyproject.toml's project name): ``cnr_id`` on its nodes."""
IPADAPTER_PACK_ID = "comfyui_ipadapter_plus"
"""cubiq/ComfyUI_IPAdapter_plus's Comfy Registry id."""
IPADAPTER_NODES = {"IPAdapterAdvanced", "IPAdapterModelLoader"}
SAMPLER = {"seed": 0, "steps": 30, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}
COLUMN = 380


def at(column: float, row: float) -> tuple[int, int]:
    return int(column * COLUMN), int(row * 130)


def checkpoint(node_id: int, pos) -> Node:
    return Node(node_id, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, pos)


def image_latent(first_id: int, image: str, checkpoint_id: int, column: float, row: float) -> list[Node]:
    """Load an image, scale it to about one megapixel keeping its shape (the official scripts
    resize to 1024 px, no crop), encode it: three nodes, latent from ``first_id + 2``."""
    return [
        Node(first_id, "LoadImage", {"image": image}, at(column, row)),
        Node(first_id + 1, "ImageScaleToTotalPixels", {"image": (first_id, 0), "upscale_method": "lanczos",
                                                       "megapixels": 1.0}, at(column, row + 3)),
        Node(first_id + 2, "VAEEncode", {"pixels": (first_id + 1, 0), "vae": (checkpoint_id, 2)}, at(column, row + 4.5)),
    ]


def text(node_id: int, prompt: str, checkpoint_id: int, pos, title: str | None = None) -> Node:
    return Node(node_id, "CLIPTextEncode", {"text": prompt, "clip": (checkpoint_id, 1)}, pos, title)


def sample(first_id: int, model, positive, negative, latent, vae, prefix: str, column: float, row: float,
           **overrides) -> list[Node]:
    """KSampler, decode, save: three nodes."""
    return [
        Node(first_id, "KSampler", {**SAMPLER, **overrides, "model": model, "positive": positive,
                                    "negative": negative, "latent_image": latent}, at(column, row)),
        Node(first_id + 1, "VAEDecode", {"samples": (first_id, 0), "vae": vae}, at(column, row + 3.5)),
        Node(first_id + 2, "SaveImage", {"images": (first_id + 1, 0), "filename_prefix": prefix}, at(column + 1, row)),
    ]


def empty_latent(node_id: int, pos) -> Node:
    return Node(node_id, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos)


def b_lora_train():
    nodes = [checkpoint(1, at(0, 0)), *image_latent(2, "my_image.png", 1, 0, 1.5),
             text(5, "A [v]", 1, at(1, 0), "Prompt: A [v]"), text(6, "", 1, at(1, 2), "Negative (empty)"),
             Node(7, "BLoRATrain", {"model": (1, 0), "latents": (4, 0), "positive": (5, 0),
                                    "learning_rate": B_LORA.recipe.learning_rate, "rank": B_LORA.recipe.rank,
                                    "lora_name": "b-lora/my_image"},
                  at(2, 0)),
             empty_latent(8, at(2, 6.2)),
             *sample(9, (7, 0), (5, 0), (6, 0), (8, 0), (1, 2), "b-lora/reconstruction", 3, 0),
             Node(12, "PreviewImage", {"images": (7, 2)}, at(4, 3), "Loss curve")]
    notes = [Note(20, "Train B-LoRA on one image.\n\n1. Pick your SDXL checkpoint and your image (about 1024 px).\n"
                      "2. Keep the prompt 'A [v]' (any rare token works; the paper uses A [v]).\n"
                      "3. Queue. The LoRA lands in models/loras/b-lora/my_image.safetensors; the sample shows the "
                      "reconstruction ('A [v]' with the trained LoRA).\n\nThen use its content or style with "
                      "Load Content LoRA / Load Style LoRA (see the other workflows).", at(0, -2.2), (760, 200))]
    return nodes, notes


def b_lora_apply(kind: str):
    prompts = {"style_transfer": "A [c] in [s] style", "text_stylization": "A [c] made of gold",
               "consistent_style": "A backpack in [s] style"}
    nodes = [checkpoint(1, at(0, 0))]
    model = (1, 0)
    if kind in ("style_transfer", "text_stylization"):
        nodes.append(Node(2, "BLoRALoadContentLoRA", {"model": model, "lora_name": "b-lora/content_image.safetensors",
                                                      "strength": 1.0, "strength_mode": "official B-LoRA (squared)"},
                          at(1, 0)))
        model = (2, 0)
    if kind in ("style_transfer", "consistent_style"):
        nodes.append(Node(3, "BLoRALoadStyleLoRA", {"model": model, "lora_name": "b-lora/style_image.safetensors",
                                                    "strength": 1.1, "strength_mode": "official B-LoRA (squared)"},
                          at(1, 2.5)))
        model = (3, 0)
    nodes += [text(4, prompts[kind], 1, at(2, 0), "Prompt"), text(5, "", 1, at(2, 2), "Negative (empty)"),
              empty_latent(6, at(2, 4)), *sample(7, model, (4, 0), (5, 0), (6, 0), (1, 2), f"b-lora/{kind}", 3, 0)]
    guide = {
        "style_transfer": "Content of image A in the style of image B.\nLoad Content LoRA takes block output_blocks.0.1 of "
                          "A's B-LoRA, Load Style LoRA block output_blocks.1.1 of B's. In the prompt, replace [c] and [s] "
                          "with each B-LoRA's training token (e.g. 'A [v18] in [v30] style').",
        "text_stylization": "The content of a B-LoRA restyled by text.\nReplace [c] with its training token "
                            "(e.g. 'A [v3] made of gold').",
        "consistent_style": "New subjects in the style of a B-LoRA.\nReplace [s] with its training token "
                            "(e.g. 'A backpack in [v38] style').",
    }[kind]
    strengths = ("\n\nStrengths are typed as in the official inference.py (mode 'official B-LoRA (squared)'): "
                 "content 1.0, style 1.1, the paper's settings.")
    return nodes, [Note(20, guide + strengths, at(0, -2.2), (760, 180))]


def unziplora_train_and_recombine():
    nodes = [checkpoint(1, at(0, 0))]
    prompts = {"a": ("A monadikos cat in sketch style", "A monadikos cat", "A cat in sketch style"),
               "b": ("A monadikos rose in pop art style", "A monadikos rose", "A rose in pop art style")}
    for index, name in enumerate(("a", "b")):
        base_id, row = 10 + 20 * index, 7 * index
        combined, content, style = prompts[name]
        nodes += [*image_latent(base_id, f"image_{name}.png", 1, 1, row),
                  text(base_id + 3, combined, 1, at(2, row), "Combined prompt"),
                  text(base_id + 4, content, 1, at(2, row + 2), "Content prompt"),
                  text(base_id + 5, style, 1, at(2, row + 4), "Style prompt"),
                  Node(base_id + 6, "UnZipLoRATrain", {"model": (1, 0), "latents": (base_id + 2, 0),
                                                       "positive": (base_id + 3, 0), "content_positive": (base_id + 4, 0),
                                                       "style_positive": (base_id + 5, 0),
                                                       "lora_name": f"unziplora/image_{name}"}, at(3, row))]
    nodes += [text(50, "", 1, at(0, 3), "Negative (empty)"), empty_latent(51, at(0, 5)),
              *sample(52, (16, 0), (13, 0), (50, 0), (51, 0), (1, 2), "unziplora/a_recombined", 4, 0),
              text(55, "A monadikos cat in pop art style", 1, at(4, 7), "Cross-image prompt"),
              Node(56, "UnZipColumnMaskMerge", {"model": (1, 0), "content_lora": "unziplora/image_a_content.safetensors",
                                                "style_lora": "unziplora/image_b_style.safetensors",
                                                "content_merger": "none", "style_merger": "none",
                                                "content_lora_file": (16, 1), "style_lora_file": (36, 2),
                                                "content_positive": (60, 0), "style_positive": (61, 0)}, at(4, 9)),
              text(60, "A monadikos cat", 1, at(4, 12.5), "Cross-image content prompt"),
              text(61, "A cat in pop art style", 1, at(4, 14.5), "Cross-image style prompt"),
              *sample(57, (56, 0), (55, 0), (50, 0), (51, 0), (1, 2), "unziplora/a_content_b_style", 5, 7)]
    notes = [Note(80, "UnZipLoRA: train content and style LoRAs from each image, then recombine across images.\n\n"
                      "Top: image A -> Train UnZipLoRA -> its own content + style, recombined (the node's MODEL output).\n"
                      "Below: image B, the same.\n"
                      "Right: A's content with B's style: UnZip Column Mask Merge on the files the two trainings "
                      "just saved (wired from their content_lora / style_lora outputs; mergers travel inside the "
                      "files). Later, pick any saved pair in its content_lora / style_lora lists instead "
                      "(disconnect the two file inputs), no training needed.\n\n"
                      "Both recombine as the official inference does (prompt-separated): in cross-attention keys and "
                      "values the model sees the sampled prompt, the content LoRA its content prompt, the style LoRA "
                      "its style prompt (the training node uses its own training prompts; the merge node the two "
                      "prompts wired into content_positive / style_positive). Unwire those two for a plain weight merge.\n\n"
                      "'monadikos' is the rare token for the subject; the style prompt keeps the class noun and drops "
                      "the token, the content prompt drops the style words.", at(0, -3), (1100, 300))]
    return nodes, notes


def k_lora_fuse():
    nodes = [checkpoint(1, at(0, 0)),
             Node(2, "KLoRAFuse", {"model": (1, 0), "content_lora": "b-lora/content_image.safetensors",
                                   "style_lora": "b-lora/style_image.safetensors"}, at(1, 0)),
             text(3, "A [c] in [s] style", 1, at(2, 0), "Prompt"), text(4, "", 1, at(2, 2), "Negative (empty)"),
             empty_latent(5, at(2, 4)),
             *sample(6, (2, 0), (3, 0), (4, 0), (5, 0), (1, 2), "k-lora/fused", 3, 0, steps=50, sampler_name="euler",
                     scheduler="normal")]
    notes = [Note(20, "K-LoRA (Ouyang et al., CVPR 2025): the content LoRA of image A and the style LoRA of image B "
                      "fused with no training.\n\nPick the two files: any SDXL LoRAs trained on the same layers "
                      "(B-LoRAs from Train B-LoRA, LoRAs on all attention layers, kohya or diffusers LoRAs). On every "
                      "attention projection both change, each step uses one of them, chosen by how strongly each "
                      f"changes the layer against a weight S that moves over sampling (pattern {K_LORA.defaults['pattern']}, "
                      f"alpha {K_LORA.defaults['alpha']:g}: the "
                      "official defaults: style in the first steps, then content, style growing towards the end). In the prompt, replace [c] "
                      "and [s] with each LoRA's training token. 50 steps, as the official script.", at(0, -2.2),
                  (760, 200))]
    return nodes, notes


def lora_style_transfer_sdedit():
    nodes = [checkpoint(1, at(0, 0)),
             Node(2, "LoadImage", {"image": "style_1.png"}, at(1, 0)),
             Node(3, "LoadImage", {"image": "style_2.png"}, at(1, 3)),
             Node(4, "BatchImagesNode", {"images.image0": (2, 0), "images.image1": (3, 0)}, at(1, 6)),
             Node(5, "ImageScaleToTotalPixels", {"image": (4, 0), "upscale_method": "lanczos", "megapixels": 1.0},
                  at(1, 7.5)),
             Node(6, "VAEEncode", {"pixels": (5, 0), "vae": (1, 2)}, at(1, 9)),
             text(7, "A Monet painting, water lilies", 1, at(2, 0), "Caption of style_1"),
             text(8, "A Monet painting, a bridge over a pond", 1, at(2, 2), "Caption of style_2"),
             Node(9, "ConditioningCombine", {"conditioning_1": (7, 0), "conditioning_2": (8, 0)}, at(2, 4)),
             Node(10, "BLoRATrain", {"model": (1, 0), "latents": (6, 0), "positive": (9, 0),
                                     "steps": STYLE_LORA.recipe.steps, "learning_rate": STYLE_LORA.recipe.learning_rate,
                                     "rank": STYLE_LORA.recipe.rank, "lora_name": "style/monet",
                                     "recipe": STYLE_LORA.recipe.name, "prompt": "A Monet painting, ..."},
                  at(3, 0)),
             Node(11, "LoadImage", {"image": "content_photo.png"}, at(3, 6)),
             Node(12, "ImageScaleToTotalPixels", {"image": (11, 0), "upscale_method": "lanczos", "megapixels": 1.0},
                  at(3, 9)),
             Node(13, "VAEEncode", {"pixels": (12, 0), "vae": (1, 2)}, at(3, 10.5)),
             text(14, "A Monet painting", 1, at(4, 6), "Prompt"), text(15, "", 1, at(4, 8), "Negative (empty)"),
             *sample(16, (10, 0), (14, 0), (15, 0), (13, 0), (1, 2), "style/transfer", 5, 0, denoise=0.5)]
    notes = [Note(30, "LoRA style transfer (Diffusion-LoRA-Style-Transfer on SDXL).\n\n1. A style LoRA on all attention "
                      "layers from several style images, each with its caption starting with the same identifier "
                      f"('A Monet painting, ...'); rank {STYLE_LORA.recipe.rank}, alpha {STYLE_LORA.recipe.alpha:g} (the "
                      f"recipe's), learning rate {STYLE_LORA.recipe.learning_rate:g}. Add images with "
                      "more Batch Images inputs / Conditioning Combine nodes, captions in the same order as the images.\n"
                      "2. SDEdit: the content photo is noised part-way and denoised with the LoRA (KSampler denoise "
                      "0.5). Higher denoise: more style, less of the photo.\n\nThe original also conditions on the "
                      "photo with an IP-Adapter to keep its details; see the _ipadapter variant.", at(0, -2.6), (900, 240))]
    return nodes, notes


def rechar_character():
    nodes = [checkpoint(1, at(0, 0)),
             Node(2, "LoadImage", {"image": "glyph.png"}, at(0, 2.5), "Character / glyph"),
             Node(3, "ControlNetLoader", {"control_net_name": "controlnet-canny-sdxl-1.0.safetensors"}, at(0, 6)),
             Node(4, "ReCharStructureFuse", {"model": (1, 0), "structure_lora": "b-lora/glyph.safetensors",
                                             "style_lora": "b-lora/style_image.safetensors", "glyph": (2, 0),
                                             "strength_mode": "official B-LoRA (squared)"}, at(1, 0)),
             text(5, "", 1, at(1, 4), "Negative (empty)"), empty_latent(6, at(1, 6))]
    passes = [  # (prompt, model, seed, title): ReChar's structure pass, style pass and fusion
        ("A [v3] content", None, 42, "structure"), ("A landscape in [v101] style", None, 43, "style"),
        ("A beautiful landscape", (4, 0), 44, "fused")]
    nodes.append(Node(10, "BLoRALoadContentLoRA", {"model": (1, 0), "lora_name": "b-lora/glyph.safetensors",
                                                   "strength": 1.0, "strength_mode": "official B-LoRA (squared)"},
                      at(2, 0), "Structure pass: content block only"))
    nodes.append(Node(11, "BLoRALoadStyleLoRA", {"model": (1, 0), "lora_name": "b-lora/style_image.safetensors",
                                                 "strength": 1.0, "strength_mode": "official B-LoRA (squared)"},
                      at(2, 6), "Style pass: style block only"))
    models = {"structure": (10, 0), "style": (11, 0)}
    for index, (prompt, model, seed, title) in enumerate(passes):
        base, row = 20 + 10 * index, 6 * index
        nodes += [text(base, prompt, 1, at(3, row), f"Prompt ({title} pass)"),
                  Node(base + 1, "ControlNetApplyAdvanced", {"positive": (base, 0), "negative": (5, 0), "control_net": (3, 0),
                                                             "image": (4, 1), "strength": 0.5, "start_percent": 0.0,
                                                             "end_percent": 1.0, "vae": (1, 2)}, at(4, row)),
                  *sample(base + 2, model or models[title], (base + 1, 0), (base + 1, 1), (6, 0), (1, 2),
                          f"rechar/{title}", 5, row, seed=seed, steps=50, cfg=5.0 if title != "fused" else 7.5)]
    notes = [Note(90, "ReChar with core nodes: a character keeps its structure, takes a reference's style, and gets "
                      "decoration from text.\n\nTrain two B-LoRAs first (b-lora_train): one on the glyph ('A [v3]'), "
                      f"one on the style reference ('A [v101]'). The glyph's Canny edges (ReChar's {RECHAR.defaults['canny_low']}/"
                      f"{RECHAR.defaults['canny_high']} at {RECHAR.defaults['glyph_size']} px, "
                      "from ReChar Structure Fuse) drive the SDXL canny ControlNet in every pass (strength 0.5).\n"
                      "Top: structure pass (content block of the glyph B-LoRA). Middle: style pass (style block of the "
                      "style B-LoRA). Bottom: the fusion: both blocks (ReChar Structure Fuse) with the decoration prompt. "
                      "ReChar's own final pass adds two IP-Adapters fed with the first two images: see the _ipadapter "
                      "variant.\n\nstructure_start / structure_end on ReChar Structure Fuse limit the structure block "
                      "to part of the schedule (this pack's addition).", at(0, -3), (1100, 240))]
    return nodes, notes


IPADAPTER_SDXL_VIT_H = "ip-adapter_sdxl_vit-h.safetensors"
IPADAPTER_COMPOSITION = "ip_plus_composition_sdxl.safetensors"
CLIP_VISION_VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def ip_adapter(node_id: int, model, adapter_loader: int, image, weight: float, pos, title: str, **optional) -> Node:
    return Node(node_id, "IPAdapterAdvanced", {"model": model, "ipadapter": (adapter_loader, 0), "image": image,
                                               "weight": weight, "weight_type": "linear", "combine_embeds": "concat",
                                               "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only",
                                               **optional}, pos, title)


def rechar_character_ipadapter():
    """ReChar's own final pass: the fused model plus two IP-Adapters, the composition adapter fed
    the structure-pass image (masked to its Canny edges, weight 1.5) and the ViT-H adapter fed the
    style-pass image (weight 0.8), CFG 17.5."""
    nodes, notes = rechar_character()
    fused_sampler = next(n for n in nodes if n.type == "KSampler" and n.inputs["model"] == (4, 0))
    nodes += [Node(60, "CLIPVisionLoader", {"clip_name": CLIP_VISION_VIT_H}, at(6, 13)),
              Node(61, "IPAdapterModelLoader", {"ipadapter_file": IPADAPTER_COMPOSITION}, at(6, 15)),
              Node(62, "IPAdapterModelLoader", {"ipadapter_file": IPADAPTER_SDXL_VIT_H}, at(6, 16.5)),
              Node(63, "Canny", {"image": (23, 0), "low_threshold": RECHAR.defaults["canny_low"] / 255,
                                 "high_threshold": RECHAR.defaults["canny_high"] / 255}, at(7, 0)),
              Node(64, "ImageToMask", {"image": (63, 0), "channel": "red"}, at(7, 2)),
              ip_adapter(65, (4, 0), 61, (23, 0), 1.5, at(7, 4), "Composition IP-Adapter: structure image",
                         attn_mask=(64, 0), clip_vision=(60, 0)),
              ip_adapter(66, (65, 0), 62, (33, 0), 0.8, at(7, 9), "Style IP-Adapter: style image", clip_vision=(60, 0))]
    fused_sampler.inputs.update(model=(66, 0), cfg=17.5)
    notes[0].text += ("\n\nThis variant needs cubiq/ComfyUI_IPAdapter_plus and the model files "
                      f"{IPADAPTER_COMPOSITION} (ostris/ip-composition-adapter), {IPADAPTER_SDXL_VIT_H} (h94/IP-Adapter, "
                      f"sdxl_models) in models/ipadapter and {CLIP_VISION_VIT_H} in models/clip_vision.")
    return nodes, notes


def lora_style_transfer_sdedit_ipadapter():
    """The original's content preservation: an IP-Adapter fed the content photo itself (0.3)."""
    nodes, notes = lora_style_transfer_sdedit()
    sampler = next(n for n in nodes if n.type == "KSampler")
    nodes += [Node(40, "CLIPVisionLoader", {"clip_name": CLIP_VISION_VIT_H}, at(4, 10)),
              Node(41, "IPAdapterModelLoader", {"ipadapter_file": IPADAPTER_SDXL_VIT_H}, at(4, 11.5)),
              ip_adapter(42, (10, 0), 41, (12, 0), 0.3, at(5, 6), "IP-Adapter: the content photo (image_cond_scale)",
                         clip_vision=(40, 0))]
    sampler.inputs["model"] = (42, 0)
    notes[0].text += (f"\n\nThis variant needs cubiq/ComfyUI_IPAdapter_plus, {IPADAPTER_SDXL_VIT_H} in models/ipadapter "
                      f"and {CLIP_VISION_VIT_H} in models/clip_vision. Higher IP-Adapter weight: closer to the photo.")
    return nodes, notes


@dataclass(frozen=True)
class Shipped:
    """A shipped workflow. The template browser shows its file name as the title (``title``:
    the method's registry title and what the workflow does), the picture ``<title>.jpg`` beside
    it; ``key`` is its short name on the command line (``cli.py run KEY``)."""

    key: str
    method: methods.Method
    subject: str
    description: str
    describe: Callable[[], tuple[list[Node], list[Note]]]
    ipadapter: bool = False

    @property
    def title(self) -> str:
        return f"{self.method.title} - {self.subject}"


SHIPPED = (
    Shipped("b-lora_train", B_LORA, "train on one image", "Train a B-LoRA on one image: its content and style blocks, "
            "a sample of the reconstruction and the loss curve.", b_lora_train),
    Shipped("b-lora_style_transfer", B_LORA, "style transfer", "The content of image A in the style of image B, from "
            "their two B-LoRAs.", lambda: b_lora_apply("style_transfer")),
    Shipped("b-lora_text_stylization", B_LORA, "text stylization", "The content of a B-LoRA restyled by the prompt "
            "(e.g. made of gold).", lambda: b_lora_apply("text_stylization")),
    Shipped("b-lora_consistent_style", B_LORA, "consistent style", "New subjects in the style of a B-LoRA.",
            lambda: b_lora_apply("consistent_style")),
    Shipped("unziplora_train_and_recombine", UNZIPLORA, "train and recombine", "Content and style LoRAs trained "
            "jointly from each of two images, then A's content with B's style.", unziplora_train_and_recombine),
    Shipped("k-lora_fuse", K_LORA, "fuse two LoRAs", "Any content LoRA with any style LoRA, fused per layer and step "
            "with no training.", k_lora_fuse),
    Shipped("lora_style_transfer_sdedit", STYLE_LORA, "SDEdit", "A style LoRA from captioned images, applied to a "
            "photo by partial denoising.", lora_style_transfer_sdedit),
    Shipped("rechar_character", RECHAR, "stylized character", "A character's structure, a reference's style and a "
            "decoration prompt, guided by the glyph's Canny edges.", rechar_character),
    Shipped("rechar_character_ipadapter", RECHAR, "stylized character (IP-Adapter)", "ReChar's own final pass: the "
            "fusion plus two IP-Adapters (needs ComfyUI_IPAdapter_plus).", rechar_character_ipadapter, True),
    Shipped("lora_style_transfer_sdedit_ipadapter", STYLE_LORA, "SDEdit (IP-Adapter)", "SDEdit keeping the photo's "
            "details with an IP-Adapter (needs ComfyUI_IPAdapter_plus).", lora_style_transfer_sdedit_ipadapter, True),
    Shipped("splitflux_train", SPLITFLUX, "train on one image (FLUX.1)", "Train SplitFlux on one image: a content "
            "LoRA and a style LoRA on FLUX.1's single blocks, a sample and the loss curve.",
            flux_workflows.splitflux_train),
    Shipped("splitflux_recontextualize", SPLITFLUX, "recontextualize (FLUX.1)", "The content of a SplitFlux file "
            "(its main branch) in a new scene.", flux_workflows.splitflux_recontextualize),
    Shipped("splitflux_style_transfer", SPLITFLUX, "style transfer (FLUX.1)", "The content of image A in the style "
            "of image B, from their two SplitFlux files.", flux_workflows.splitflux_style_transfer),
    Shipped("k-lora_fuse_flux", K_LORA, "fuse two FLUX.1 LoRAs", "Any FLUX.1 subject LoRA with any FLUX.1 style LoRA, "
            "fused per layer and step with no training.", flux_workflows.k_lora_fuse_flux),
)


def pack_nodes() -> set[str]:
    return {node_id for method in methods.METHODS for node_id in method.nodes}


def node_properties(node: Node, versions: dict[str, str]) -> dict:
    """Its pack's registry id and version (the manager installs a missing pack by it) and, for
    a loader, its model's name, download URL and models folder (the editor's missing-models list)."""
    pack = PACK_ID if node.type in pack_nodes() else IPADAPTER_PACK_ID if node.type in IPADAPTER_NODES else "comfy-core"
    properties = {"cnr_id": pack, **({"ver": versions[pack]} if pack in versions else {})}
    models = [{"name": value, "url": MODELS[value][1], "directory": MODELS[value][0]}
              for value in node.inputs.values() if isinstance(value, str) and value in MODELS]
    return {**properties, **({"models": models} if models else {})}


def build(shipped: Shipped, object_info: dict, versions: dict[str, str]) -> dict:
    nodes, notes = shipped.describe()
    notes[0].text = f"{shipped.title}\n{shipped.description}\n\n{notes[0].text}"
    for node in nodes:
        node.properties.update(node_properties(node, versions))
        if node.type not in object_info and node.type in OLDER_HOST_NODES:  # built on an older host
            node.type, names = OLDER_HOST_NODES[node.type]
            node.inputs = {names[name]: value for name, value in node.inputs.items()}
    return build_ui(nodes, notes, object_info, extra={"blora": {"key": shipped.key, "description": shipped.description}})


def thumbnail(shipped: Shipped, workflow: dict, object_info: dict):
    from tools import workflow_thumbnails

    display = {node_type: info["display_name"] for node_type, info in object_info.items()}
    return workflow_thumbnails.draw(workflow, shipped.title, shipped.description, pack_nodes(), display)


def main() -> None:
    import tomllib

    from devkit import host, server as server_harness

    if host.COMFYUI_PATH is None:
        sys.exit(host.NO_HOST_REASON)
    ipadapter = server_harness.ipadapter_pack()
    shipped = [s for s in SHIPPED if ipadapter or not s.ipadapter]
    if not ipadapter:
        print("IPADAPTER_PACK_PATH names no copy of ComfyUI_IPAdapter_plus: the _ipadapter variants are not rebuilt")
    with server_harness.comfy_server(host.COMFYUI_PATH, Path(tempfile.mkdtemp()),
                                     extra_packs=(ipadapter,) if ipadapter else ()) as url:
        object_info = server_harness.get_json(url, "/object_info")
        core_version = server_harness.get_json(url, "/system_stats")["system"]["comfyui_version"]
    versions = {PACK_ID: tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"],
                "comfy-core": core_version}
    folder = ROOT / "workflows"
    for old in folder.glob("*"):
        if old.suffix in (".json", ".jpg") and (ipadapter or "IP-Adapter" not in old.stem):
            old.unlink()
    for item in shipped:
        workflow = build(item, object_info, versions)
        (folder / f"{item.title}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        thumbnail(item, workflow, object_info).save(folder / f"{item.title}.jpg", quality=85)
        print("wrote", item.title)


if __name__ == "__main__":
    main()
