#!/usr/bin/env python3
"""The pack's command line, on top of ComfyUI used as a library (found at $COMFYUI_PATH, two
levels up, or ~/ComfyUI):

    python cli.py train --tiny                             # the whole path on a CPU, ~1 minute
    python cli.py train --checkpoint sd_xl_base_1.0.safetensors --image photo.png
    python cli.py stylize --checkpoint ... --content b-lora/cat --style b-lora/sketch --prompt "A [v18] in [v30] style"
    python cli.py stylize --checkpoint ... --content b-lora/cat --text "A [v18] made of gold"
    python cli.py generate --checkpoint ... --style b-lora/sketch --text "A backpack in [v30] style"
    python cli.py unzip train|recombine ...
    python cli.py run b-lora_train --set "Train B-LoRA.steps=500" ...
    python cli.py library train --images photos/ --checkpoint ... --out my_library [--ray HEAD:6379]

``python cli.py COMMAND --help`` lists each command's options.
"""

import os
import sys

# Before torch loads its OpenMP runtime: threads that wait for work sleep instead of spinning. On
# a CPU shared with other processes a spinning thread burns the core its partner needs, and the
# 200 steps of `train --tiny` took 4 minutes and 191 s of CPU instead of 49 s and 27 s (2 cores,
# load 4). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import devkit  # noqa: E402,F401  (the pack importable as blora_pack)
from blora_pack.command_line.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
