#!/usr/bin/env python3
"""The pack's command line, on top of ComfyUI used as a library (found at $COMFYUI_PATH, two
levels up, or ~/ComfyUI):

    python cli.py train --tiny --image photo.png          # the whole path on a CPU, ~1 minute
    python cli.py train --checkpoint sd_xl_base_1.0.safetensors --image photo.png
    python cli.py stylize --checkpoint ... --content b-lora/cat --style b-lora/sketch --prompt "A [v18] in [v30] style"
    python cli.py stylize --checkpoint ... --content b-lora/cat --text "A [v18] made of gold"
    python cli.py generate --checkpoint ... --style b-lora/sketch --text "A backpack in [v30] style"
    python cli.py unzip train|recombine ...
    python cli.py run b-lora_train --set "Train B-LoRA.steps=500" ...

``python cli.py COMMAND --help`` lists each command's options.
"""

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent


def _import_pack():
    """The pack's own modules (its ``__init__`` imports no host code)."""
    spec = importlib.util.spec_from_file_location("blora_pack", PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["blora_pack"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("blora_pack.command_line.main")


if __name__ == "__main__":
    sys.exit(_import_pack().main())
