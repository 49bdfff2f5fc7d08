"""The methods on SDXL: B-LoRA, the style-LoRA recipe, UnZipLoRA, K-LoRA and ReChar.

Each number carries its source (``../shared/reference/`` has the details of each method).
"""

from __future__ import annotations

from .records import LayerSet, Method, Recipe

FAMILY = "SDXL"

CONTENT_BLOCK = "output_blocks.0.1"
"""B-LoRA's content block: diffusers ``up_blocks.0.attentions.0``."""
STYLE_BLOCK = "output_blocks.1.1"
"""B-LoRA's style block: diffusers ``up_blocks.0.attentions.1``."""

ATTENTION_PROJECTIONS = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
"""Self- and cross-attention's projections in every transformer block: what B-LoRA, UnZipLoRA,
K-LoRA and the style-LoRA recipe put LoRA on."""
ALL_ATTENTION = LayerSet(FAMILY, ATTENTION_PROJECTIONS)

B_LORA = Method(
    key="b-lora",
    title="B-LoRA",
    paper="Frenkel, Vinker, Shamir, Cohen-Or: Implicit Style-Content Separation using B-LoRA (ECCV 2024)",
    family=FAMILY,
    help="the two B-LoRA blocks of one image: its content in output_blocks.0.1, its style in output_blocks.1.1",
    nodes=("BLoRATrain", "BLoRALoadContentLoRA", "BLoRALoadStyleLoRA"),
    layers=LayerSet(FAMILY, ATTENTION_PROJECTIONS, (CONTENT_BLOCK, STYLE_BLOCK)),
    recipe=Recipe(
        name="B-LoRA blocks (content + style)",
        rank=64, alpha=None, learning_rate=5e-5, steps=1000, weight_decay=1e-4, max_grad_norm=1.0, batch_size=1,
        checkpoint_every=250,
        sources={
            "rank": "official README command (--rank 64)",
            "alpha": "official train_dreambooth_b-lora_sdxl.py: diffusers LoRALinearLayer, no network alpha (scale 1)",
            "learning_rate": "official README command (--learning_rate 5e-5, constant)",
            "steps": "official README command (--max_train_steps 1000)",
            "weight_decay": "official script's AdamW default (--adam_weight_decay 1e-4)",
            "max_grad_norm": "official script's default (--max_grad_norm 1.0)",
            "batch_size": "official README command (--train_batch_size 1)",
            "checkpoint_every": "this pack (the official script saves every 500 steps)",
            "resume_may_raise_steps": "constant learning rate: more steps continue the same run",
        },
    ),
    memory_peak_gib={"fastest": 9.24, "8 GB": 6.23},
    block_roles={CONTENT_BLOCK: "content", STYLE_BLOCK: "style"},
    fuses=True,
)

STYLE_LORA = Method(
    key="style",
    title="LoRA style transfer",
    paper="Diffusion-LoRA-Style-Transfer: a style LoRA on every attention layer, applied by partial denoising",
    family=FAMILY,
    help="a style LoRA on every attention layer from one or more images (rank 8, alpha 16, lr 1e-5)",
    nodes=("BLoRATrain",),
    layers=ALL_ATTENTION,
    recipe=Recipe(
        name="all attention layers (style LoRA)",
        rank=8, alpha=16.0, learning_rate=1e-5, steps=1000, weight_decay=0.01, max_grad_norm=None, batch_size=2,
        checkpoint_every=250,
        sources={
            "rank": "Diffusion-LoRA-Style-Transfer train.sh (r 8)",
            "alpha": "Diffusion-LoRA-Style-Transfer train.sh (alpha 16)",
            "learning_rate": "Diffusion-LoRA-Style-Transfer train.sh (lr 1e-5)",
            "steps": "this pack (train.sh trains by epochs over its image set)",
            "weight_decay": "Diffusion-LoRA-Style-Transfer lit_module.py (AdamW, weight decay 0.01)",
            "max_grad_norm": "Diffusion-LoRA-Style-Transfer trainer.py (no gradient clipping)",
            "batch_size": "Diffusion-LoRA-Style-Transfer train.sh (batch 2)",
            "checkpoint_every": "this pack",
            "resume_may_raise_steps": "constant learning rate: more steps continue the same run",
        },
    ),
    memory_peak_gib={"fastest": 12.83, "8 GB": 6.02},
    file_label="LoRA",
)

UNZIPLORA = Method(
    key="unziplora",
    title="UnZipLoRA",
    paper="Liu et al.: UnZipLoRA, Separating Content and Style from a Single Image (ICCV 2025)",
    family=FAMILY,
    help="a content LoRA and a style LoRA trained jointly, kept apart by prompts, column masks and blocks",
    nodes=("UnZipLoRATrain", "UnZipColumnMaskMerge"),
    layers=ALL_ATTENTION,
    recipe=Recipe(
        name="UnZipLoRA (content + style, all attention layers)",
        rank=64, alpha=None, learning_rate=5e-5, steps=600, weight_decay=1e-4, max_grad_norm=1.0, batch_size=1,
        checkpoint_every=200,
        settings={"style_learning_rate": 5e-5, "merger_learning_rate": 5e-3, "sample_times": 3, "column_ratio": 0.1,
                  "overlap_weight": 0.5, "cone_threshold": 1e-5},
        sources={
            "rank": "official train.sh (--rank 64)",
            "alpha": "official unziplora_linear_layer.py: no alpha (scale 1)",
            "learning_rate": "official train.sh (--content_learning_rate 5e-5)",
            "steps": "official train.sh (--max_train_steps 600)",
            "weight_decay": "official train_unziplora.py AdamW (weight_decay 1e-4)",
            "max_grad_norm": "official train_unziplora.py (max_grad_norm 1.0)",
            "batch_size": "official train.sh (--train_batch_size 1)",
            "checkpoint_every": "this pack (the official script saves every 500 steps)",
            "resume_may_raise_steps": "the column periods are steps / sample_times: a run of other length is another run",
            "style_learning_rate": "official train.sh (--style_learning_rate 5e-5)",
            "merger_learning_rate": "official train.sh (--weight_learning_rate 5e-3)",
            "sample_times": "official train.sh (--sample_times 3)",
            "column_ratio": "official train.sh (--column_ratio 0.1)",
            "overlap_weight": "official train.sh (--similarity_lambda 0.5, commit 0dc1800)",
            "cone_threshold": "official unziplora_linear_layer.py get_unziplora_cone (|w g| > 1e-5, on fp16 gradients "
                              "scaled by the initial loss scale 2^16)",
        },
        resume_may_raise_steps=False,
    ),
    memory_peak_gib={"fastest": 21.27, "8 GB": 9.53},
    block_roles={
        # blocks only in the official style dictionary: style sparse, content uses every column
        "output_blocks.0.1": "style", "output_blocks.2.1": "style",
        # blocks only in the official content dictionary: content sparse, style uses every column
        "output_blocks.1.1": "content", "output_blocks.3.1": "content", "output_blocks.4.1": "content",
        "output_blocks.5.1": "content",
    },
)
"""``block_roles``: block separation (the official ``--with_freeze_unet``, on by default), the
LoRA that gets a sparse mask in each block; blocks not listed (down path, middle) are shared:
both sparse."""

K_LORA = Method(
    key="k-lora",
    title="K-LoRA",
    paper="Ouyang, Li, Hou: K-LoRA, Unlocking Training-Free Fusion of Any Subject and Style LoRAs (CVPR 2025)",
    family=FAMILY,
    help="any content LoRA and any style LoRA fused with no training: per layer and step, the one that matters more",
    nodes=("KLoRAFuse",),
    layers=ALL_ATTENTION,
    defaults={"pattern": "s*", "alpha": 1.5, "beta_s*": 0.85, "beta_s": 0.5, "sum_timesteps": 28000,
              "outlier_factor": 3.0},
    sources={
        "pattern": "official inference_sd.py (pattern s*)",
        "alpha": "official inference_sd.py (alpha 1.5)",
        "beta_s*": "official inference_sd.py (beta = 0.85 alpha for s*)",
        "beta_s": "official inference_sd.py, newest (beta = 0.5 for s; an earlier one 0.5 alpha)",
        "sum_timesteps": "official inference_sd.py (sum_timesteps 28000 = 560 SDXL attention projections x 50 steps)",
        "outlier_factor": "official utils.py get_ratio_between_content_and_style (ratios >= 3x the mean dropped)",
    },
    fuses=True,
)

RECHAR = Method(
    key="rechar",
    title="ReChar",
    paper="ReChar: a glyph's structure, text-specified decoration and a reference image's style",
    family=FAMILY,
    help="a character's structure from one B-LoRA's content block, a style from another's style block",
    nodes=("ReCharStructureFuse",),
    block_roles={CONTENT_BLOCK: "structure", STYLE_BLOCK: "style"},
    defaults={"glyph_size": 1024, "canny_low": 100, "canny_high": 200},
    sources={
        "glyph_size": "ReChar's code: the glyph resized to 1024 before its Canny edges",
        "canny_low": "ReChar's code: OpenCV Canny(100, 200)",
        "canny_high": "ReChar's code: OpenCV Canny(100, 200)",
    },
)

METHODS = (B_LORA, STYLE_LORA, UNZIPLORA, K_LORA, RECHAR)
