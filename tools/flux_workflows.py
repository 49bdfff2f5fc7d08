"""The shipped FLUX.1 workflows (SplitFlux, K-LoRA Fuse on FLUX), described for
``tools.build_workflows`` (which writes them, UI format, into workflows/).

FLUX.1-dev is loaded as its own files (Load Diffusion Model, DualCLIPLoader with CLIP-L and T5-XXL,
the FLUX VAE): the layout of ComfyUI's own FLUX examples. FLUX.1-dev is guidance-distilled: the
guidance goes into the conditioning (FluxGuidance 3.5) and the sampler runs at CFG 1.
"""

from __future__ import annotations

from blora_pack.command_line.workflow_format import Node, Note
from blora_pack.core.blora import STRENGTH_MODES
from blora_pack.methods.flux import SPLITFLUX

UNET = "flux1-dev.safetensors"
CLIP_L, T5XXL = "clip_l.safetensors", "t5xxl_fp16.safetensors"
VAE = "ae.safetensors"
GUIDANCE = 3.5
SAMPLER = {"seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
CONTENT_PROMPT = SPLITFLUX.recipe.settings["content_prompt"]
STYLE_PROMPT = SPLITFLUX.recipe.settings["style_prompt"]
STRENGTH_MODE = STRENGTH_MODES[0]
"""Linear strength: the only mode the loaders take on FLUX (the squared one is B-LoRA's)."""
COLUMN = 380
MODEL, CLIP, VAE_ID = 1, 2, 3
"""Node ids of the three loaders in every FLUX workflow."""


def at(column: float, row: float) -> tuple[int, int]:
    return int(column * COLUMN), int(row * 130)


def loaders() -> list[Node]:
    return [Node(MODEL, "UNETLoader", {"unet_name": UNET, "weight_dtype": "fp8_e4m3fn"}, at(0, 0)),
            Node(CLIP, "DualCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"}, at(0, 1.5)),
            Node(VAE_ID, "VAELoader", {"vae_name": VAE}, at(0, 3.5))]


def text(node_id: int, prompt: str, pos, title: str | None = None) -> Node:
    return Node(node_id, "CLIPTextEncode", {"text": prompt, "clip": (CLIP, 0)}, pos, title)


def sample(first_id: int, model, positive, prefix: str, column: float, row: float, **overrides) -> list[Node]:
    """FluxGuidance on the prompt, an empty negative, a 1024 px latent, KSampler, decode, save: six nodes."""
    return [
        Node(first_id, "FluxGuidance", {"conditioning": positive, "guidance": GUIDANCE}, at(column, row)),
        text(first_id + 1, "", at(column, row + 1.5), "Negative (empty; unused at CFG 1)"),
        Node(first_id + 2, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1},
             at(column, row + 3.5)),
        Node(first_id + 3, "KSampler", {**SAMPLER, **overrides, "model": model, "positive": (first_id, 0),
                                        "negative": (first_id + 1, 0), "latent_image": (first_id + 2, 0)},
             at(column + 1, row)),
        Node(first_id + 4, "VAEDecode", {"samples": (first_id + 3, 0), "vae": (VAE_ID, 0)}, at(column + 1, row + 4)),
        Node(first_id + 5, "SaveImage", {"images": (first_id + 4, 0), "filename_prefix": prefix}, at(column + 2, row)),
    ]


def splitflux_train():
    nodes = [*loaders(),
             Node(4, "LoadImage", {"image": "my_image.png"}, at(1, 0)),
             Node(5, "ImageScale", {"image": (4, 0), "upscale_method": "lanczos", "width": 1024, "height": 1024,
                                    "crop": "center"}, at(1, 3)),
             Node(6, "VAEEncode", {"pixels": (5, 0), "vae": (VAE_ID, 0)}, at(1, 4.5)),
             text(7, CONTENT_PROMPT, at(2, 0), f"Content prompt: {CONTENT_PROMPT}"),
             text(8, STYLE_PROMPT, at(2, 2), f"Style prompt: {STYLE_PROMPT}"),
             Node(9, "SplitFluxTrain", {"model": (MODEL, 0), "latents": (6, 0), "positive": (7, 0),
                                        "style_positive": (8, 0), "lora_name": "splitflux/my_image",
                                        "precision": "bf16", "memory": "auto"}, at(3, 0)),
             Node(10, "PreviewImage", {"images": (9, 3)}, at(4, 4), "Loss curve"),
             *sample(11, (9, 0), (7, 0), "splitflux/reconstruction", 4, 7)]
    notes = [Note(30, f"Train SplitFlux on one image (FLUX.1-dev).\n\n1. Put flux1-dev, clip_l, t5xxl_fp16 and ae "
                      f"in models/diffusion_models, text_encoders and vae; pick your image (it is scaled to 1024 px).\n"
                      f"2. Keep the prompts '{CONTENT_PROMPT}' and '{STYLE_PROMPT}' (the paper's; the two must have "
                      f"the same token length).\n3. Queue. Two files land in models/loras/splitflux/: my_image_content "
                      f"and my_image_style. The sample is the reconstruction (the content prompt with both LoRAs).\n\n"
                      f"Then: splitflux_recontextualize (the subject in new scenes) and splitflux_style_transfer. "
                      f"The paper's settings are the node's defaults ({SPLITFLUX.recipe.steps} steps, learning rate "
                      f"{SPLITFLUX.recipe.learning_rate:g}); memory 'auto' picks gradient checkpointing when the GPU "
                      f"needs it.", at(0, -2.6), (900, 240))]
    return nodes, notes


def content_loader(node_id: int, model, lora_name: str, pos) -> Node:
    return Node(node_id, "BLoRALoadContentLoRA", {"model": model, "lora_name": lora_name, "strength": 1.0,
                                                  "strength_mode": STRENGTH_MODE, "content_branches": "main only"}, pos)


CONTENT_FILE = "splitflux/content_image_content.safetensors"
"""The content file of Train SplitFlux with lora_name splitflux/content_image."""


def splitflux_recontextualize():
    prompt = f"{CONTENT_PROMPT} on the sofa"
    nodes = [*loaders(), content_loader(4, (MODEL, 0), CONTENT_FILE, at(1, 0)),
             text(5, prompt, at(1, 2.5), "Prompt"), *sample(6, (4, 0), (5, 0), "splitflux/recontextualized", 2, 0)]
    notes = [Note(30, "SplitFlux re-contextualisation: the trained subject in a new scene.\n\nLoad Content LoRA takes "
                      "the content file of Train SplitFlux (pick yours, e.g. splitflux/my_image_content) with "
                      "content_branches 'main only': the residual branch "
                      "(which holds the image's own context) is left out, so the prompt can move the subject. Keep "
                      "'<c>' as in training; change the rest of the prompt.", at(0, -2.2), (760, 180))]
    return nodes, notes


def splitflux_style_transfer():
    nodes = [*loaders(), content_loader(4, (MODEL, 0), CONTENT_FILE, at(1, 0)),
             Node(5, "BLoRALoadStyleLoRA", {"model": (4, 0), "lora_name": "splitflux/style_image_style.safetensors",
                                            "strength": 1.0, "strength_mode": STRENGTH_MODE}, at(1, 2.5)),
             text(6, "A <c> object in <s> style", at(1, 5), "Prompt"),
             *sample(7, (5, 0), (6, 0), "splitflux/style_transfer", 2, 0)]
    notes = [Note(30, "SplitFlux style transfer: the subject of image A in the style of image B.\n\nTrain SplitFlux "
                      "on each image (splitflux_train, e.g. lora_name splitflux/content_image and "
                      "splitflux/style_image). Load Content LoRA takes A's content file (main branch only), Load "
                      "Style LoRA B's style file (single blocks 12-37).", at(0, -2.2), (760, 180))]
    return nodes, notes


def k_lora_fuse_flux():
    nodes = [*loaders(),
             Node(4, "KLoRAFuse", {"model": (MODEL, 0), "content_lora": "flux/subject.safetensors",
                                   "style_lora": "flux/style.safetensors"}, at(1, 0)),
             text(5, "A [c] in [s] style", at(1, 3), "Prompt"),
             *sample(6, (4, 0), (5, 0), "k-lora/fused_flux", 2, 0, steps=28)]
    notes = [Note(30, "K-LoRA Fuse on FLUX.1: a subject LoRA and a style LoRA for FLUX.1-dev fused with no training "
                      "(diffusers, kohya or ComfyUI naming). Where both change a layer, each step uses one of them "
                      "by K-LoRA's rule (style first, then content). In the prompt, replace [c] and [s] with each "
                      "LoRA's trigger words. FluxGuidance 3.5, CFG 1, 28 steps.", at(0, -2.2), (760, 180))]
    return nodes, notes
