"""CPU benchmark: the pack's UnZipLoRA train step against the reference computation.

Both sides run the same masked, overlap-penalised period step of UnZipLoRA (two rank-64 LoRAs,
mergers and column masks on every attention projection) on the same tiny SDXL-architecture UNet:
the pack on ComfyUI (object-patched layers, its trainer), the reference on diffusers' UNet with
forward hooks, written from the method's equations (devkit/unziplora_reference.py). The pack
runs as ``fastest`` (``pack``) and as the node's ``memory`` = ``8 GB`` (``pack-8gb``: gradient
checkpointing of every layer backward runs through). Rounds alternate; the median step time of
each side is reported with the ratios.

    python -m bench.cpu_unzip_step [--size 16] [--steps 12] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import time

import torch

from devkit import host as bench_host
from bench import report
from devkit import tiny_models


def main() -> None:
    args = report.arguments(__doc__, size=16, steps=12).parse_args()
    host = bench_host.start_found_host()
    from devkit import unziplora_reference as fidelity

    sdxl = host.pack("methods.sdxl")
    host_training = host.pack("host.training")
    diffusion = host.pack("training.diffusion")
    trainer = host.pack("training.trainer")
    sdxl_unet = host.pack("core.sdxl_unet")
    unziplora = host.pack("training.unziplora")

    model = tiny_models.build_tiny_sdxl()
    latents, positive = tiny_models.image_and_prompt(0, size=args.size)
    _, content_prompt = tiny_models.image_and_prompt(100)
    _, style_prompt = tiny_models.image_and_prompt(200)
    contexts = {"content": content_prompt[0][0], "style": style_prompt[0][0]}
    settings = unziplora.UnZipConfig(sample_times=1, column_ratio=0.1, cone_threshold=fidelity.THRESHOLD)
    shapes = host_training.target_shapes(model, sdxl.ALL_ATTENTION)
    layers = unziplora.make_layers(shapes, 64, settings, 0)
    initial = fidelity.initial_parameters(layers)
    steps_planned = 10_000
    method = unziplora.UnZipMethod(layers, steps_planned, 5e-5, settings)
    x0 = host_training.training_latents(model, latents)
    conditionings = host_training.conditioning_per_image(model, positive, 1)

    unet = tiny_models.diffusers_unet_from(model)
    unet.requires_grad_(False)
    reference = fidelity.Reference(unet, initial, sdxl_unet.ldm_to_diffusers, contexts, period=steps_planned)
    y_inputs = {"text_embeds": positive[0][1]["pooled_output"],
                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])}

    wrappers = unziplora.module_wrappers(layers, contexts, settings)

    def pack_side(recomputed_layers: int | None):
        def run() -> list[float]:
            times = []
            with host_training.training_model(model, method.modules, module_wrappers=wrappers,
                                              recomputed_layers=recomputed_layers) as (clone, device):
                predict = host_training.unet_predict(clone, conditionings, device)
                trainer.train(method.modules, predict, x0, host_training.noise_schedule(clone),
                              trainer.TrainConfig(steps=args.steps + 2, learning_rate=5e-5),
                              trainer.TrainingHooks(on_step=lambda s, t, l, seconds: times.append(seconds)),
                              method=method)
            return times[2:]  # the first steps of a round warm caches up

        return run

    def reference_side() -> list[float]:
        draws = [diffusion.draw_step(0, s, 1, x0.shape) for s in range(args.steps)]
        start = time.perf_counter()
        reference.train(x0, draws, y_inputs, positive[0][0], args.steps)
        return [(time.perf_counter() - start) / args.steps]

    sides = {"pack": pack_side(0), "pack-8gb": pack_side(None), "reference": reference_side}
    samples = report.alternate(sides, args.rounds)
    report.print_ratio(samples, f"tiny SDXL UNet, latent {args.size}x{args.size}, two rank-64 LoRAs on {len(layers)} layers, fp32",
                       "", args.json)


if __name__ == "__main__":
    main()
