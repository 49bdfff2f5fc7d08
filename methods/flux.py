"""The methods on FLUX.1: SplitFlux.

Each number carries its source. Tags: "paper" = SplitFlux (Yang et al., CVPR 2026, arXiv
2511.15258) as ``../shared/reference/splitflux.md`` quotes it (its [PN-en], [PN-zh], [PP] notes;
the official code could not be read); "diffusers" = ``examples/dreambooth/train_dreambooth_lora_flux.py``
(the FLUX LoRA recipe the paper builds on, used where the paper is silent, per
``/work/notes/flux_recipe.md`` §1); "this pack" = a choice no source makes, said as such.
"""

from __future__ import annotations

from .records import LayerSet, Method, Recipe

FAMILY = "FLUX.1"

QKV_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v")
"""The layers inside each trained single block, in diffusers' names (in ComfyUI the rows
[0:h], [h:2h], [2h:3h] of ``linear1``). DERIVED from the paper's parameter counts (44.83 M for
LoRA-FLUX, 43.65 M for SplitFlux fit q/k/v exactly; ``proj_out`` alone would fit too), so kept
here as a field to correct when the official code can be read."""

CONTENT_BLOCKS = tuple(f"single_blocks.{i}" for i in range(0, 10))
"""The content LoRA (VGRA, two branches): paper blocks B20-29, the blocks whose prompt swap
changed content only in the probe experiment ([PN-en], [PN-zh], [ML] in reference/splitflux.md §1.1)."""
RCA_BLOCKS = ("single_blocks.10", "single_blocks.11")
"""Rank-constrained adaptation (rank 32, output x2): paper blocks B30-31, the "semantic
boundary" ([PP], [PN-en], [ML])."""
STYLE_BLOCKS = tuple(f"single_blocks.{i}" for i in range(12, 38))
"""The style LoRA: paper blocks B32-57. DERIVED, not quoted: the "w/o FT (No B30-31)" ablation
leaves only B30-31 untrained, and the reported 43.65M trainable parameters fit q/k/v LoRAs on
exactly these blocks (reference/splitflux.md §1.1)."""

SPLITFLUX = Method(
    key="splitflux",
    title="SplitFlux",
    paper="Yang et al.: SplitFlux, Learning to Decouple Content and Style from a Single Image (CVPR 2026)",
    family=FAMILY,
    help="content (visual-gated LoRA, single blocks 0-9, plus rank-constrained 10-11) and style (single blocks "
         "12-37) from one image on FLUX.1",
    nodes=("SplitFluxTrain",),
    layers=LayerSet(FAMILY, QKV_PROJECTIONS, CONTENT_BLOCKS + RCA_BLOCKS + STYLE_BLOCKS),
    recipe=Recipe(
        name="SplitFlux (content + style, FLUX.1 single blocks)",
        rank=64, alpha=None, learning_rate=1e-4, steps=1000, weight_decay=1e-4, max_grad_norm=1.0, batch_size=1,
        checkpoint_every=250,
        settings={
            "content_rank": 48, "residual_rank": 16, "rca_rank": 32, "rca_scale": 2.0, "style_rank": 64,
            "complementary_weight": 0.1, "text_token_gate": 1.0, "gate_std_correction": 0,
            "prompt_replacement": True, "guidance": 1.0, "content_prompt": "A <c> object",
            "style_prompt": "A <s> style",
        },
        sources={
            "rank": "paper (total rank 64 per layer: content 48 + residual 16, style 64)",
            "alpha": "diffusers (--lora_alpha = --rank: scale 1); the paper names no alpha but RCA's",
            "learning_rate": "paper (Adam, 1e-4)",
            "steps": "paper (1000 steps)",
            "weight_decay": "diffusers (--adam_weight_decay 1e-4, AdamW); the paper says Adam",
            "max_grad_norm": "diffusers (--max_grad_norm 1.0)",
            "batch_size": "paper (batch size 1)",
            "checkpoint_every": "this pack",
            "resume_may_raise_steps": "constant learning rate (diffusers' default): more steps continue the same run",
            "content_rank": "paper (VGRA main branch r_cnt = 48; Fig. 8 ablation)",
            "residual_rank": "paper (VGRA residual branch r_res = 64 - 48 = 16)",
            "rca_rank": "paper (RCA rank r/alpha = 64/2 = 32)",
            "rca_scale": "paper (RCA delta scaled by alpha = 2)",
            "style_rank": "paper (style LoRA rank 64)",
            "complementary_weight": "paper (lambda = 0.1)",
            "text_token_gate": "this pack (UNCONFIRMED in the paper): text tokens take the main branch only (gate 1), "
                               "so the <c> token trains the branch kept for re-contextualisation",
            "gate_std_correction": "this pack (the paper's sigma: population standard deviation over image tokens)",
            "prompt_replacement": "paper (Fig. 2A: 'A <s> style' enters at the style blocks; how exactly is "
                                  "UNCONFIRMED: here every style block's text tokens are the style prompt's at that "
                                  "block, from a no-grad pass of the style prompt)",
            "guidance": "diffusers README examples (--guidance_scale=1; the script's default is 3.5)",
            "content_prompt": "paper ('A <c> object')",
            "style_prompt": "paper ('A <s> style')",
        },
    ),
    memory_peak_gib={"fastest": 21.87, "8 GB": 13.57},
    fastest_recomputes=26,
    keep_all_peak_gib=39.65,
    block_roles={**{b: "content" for b in CONTENT_BLOCKS}, **{b: "rca" for b in RCA_BLOCKS},
                 **{b: "style" for b in STYLE_BLOCKS}},
    sources={
        "fastest_recomputes": "this pack: the fewest single blocks (from single_blocks.0) to recompute for 1024 px to fit "
                              "a 24 GB card (bench/memory_estimate.py, fewest_recomputed_layers); where more is free "
                              "(keep_all_peak_gib, the same script) fastest recomputes nothing",
        "block_roles": "paper: content B20-29 (single 0-9), RCA B30-31 (single 10-11); style B32-57 (single 12-37) "
                       "DERIVED from the 'w/o FT (No B30-31)' ablation and the 43.65 M parameter count",
    },
    file_label="SplitFlux",
)
"""``block_roles``: the paper's three groups of single blocks (double blocks stay frozen)."""

METHODS = (SPLITFLUX,)
