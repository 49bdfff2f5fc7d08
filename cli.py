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

import sys

import devkit  # noqa: F401  (the pack importable as blora_pack)
from blora_pack.command_line.main import main

if __name__ == "__main__":
    sys.exit(main())
