"""The pack's command line: the seeds' entry points (train, stylize, generate, unzip), any
shipped workflow (run) and a library of B-LoRAs trained on Ray (library), on top of ComfyUI used
as a library. See ``cli.py``."""
