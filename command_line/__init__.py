"""The pack's command line: the seeds' entry points (train, stylize, generate, unzip) and any
shipped workflow (run), on top of ComfyUI used as a library. See ``cli.py``."""
