"""CPU benchmark: the pack's SplitFlux train step against the reference step, side by side.

Both train SplitFlux's LoRAs (114 q/k/v layers of the 38 single blocks: VGRA content 48 + 16,
RCA 32 at scale 2, style 64; prompt replacement; complementary loss) on the same *narrow FLUX*:
FLUX.1's every block (19 double, 38 single, 24 heads) at 1/16 of its widths, built with
ComfyUI's own classes (``devkit.tiny_flux.NARROW_FLUX_CONFIG``), fp32, one image per step. The
pack trains the job Train SplitFlux trains, through its trainer; the reference is the paper's
equations on diffusers' FLUX transformer holding the same weights (``bench/splitflux_sides.py``
says both). Rounds alternate so both see the same machine state; the median step time of each
is reported with the ratio pack / reference (goal <= 1.0).

    python -m bench.cpu_splitflux_step [--size 16] [--tokens 32] [--steps 10] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import torch

from bench import report, splitflux_sides
from devkit import host as bench_host
from devkit import tiny_flux


def main() -> None:
    parser = report.arguments(__doc__, size=16, steps=10, size_help="latent size (16 = a 128 px image, 64 image tokens)")
    parser.add_argument("--tokens", type=int, default=32, help="text tokens of each prompt")
    args = parser.parse_args()
    host = bench_host.start_found_host()
    torch.manual_seed(0)
    config = tiny_flux.NARROW_FLUX_CONFIG
    model = tiny_flux.build_flux(config)
    latent = torch.randn(1, tiny_flux.LATENT_CHANNELS, args.size, args.size, generator=torch.Generator().manual_seed(0))
    bench = splitflux_sides.SplitFluxBench(host, model, latent, args.tokens, "fp32")
    warmup = 2  # the first steps of a round warm caches up
    sides = {name: (lambda run: lambda: run(args.steps + warmup))(bench.runner(name)) for name in ("pack", "reference")}
    samples = report.alternate(sides, args.rounds, warmup)
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    report.print_ratio(samples, f"narrow FLUX.1 (hidden {config['hidden_size']}, {parameters / 1e6:.1f} M parameters), "
                       f"latent {args.size}x{args.size}, {args.tokens} text tokens, fp32, "
                       f"{args.rounds} x {args.steps} steps each", "goal <= 1.0", args.json)
    print(f"the same computation: the sides' losses at each step differ by at most {bench.loss_difference():.1e} (relative)")


if __name__ == "__main__":
    main()
