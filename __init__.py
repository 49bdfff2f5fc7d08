"""ComfyUI custom nodes: separate content and style from a single image on SDXL.

The host imports this file; nodes load lazily in ``comfy_entrypoint`` so that the host-free
``core`` package can be imported (by tests and the command line) without ComfyUI.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import BLoRAExtension

    return BLoRAExtension()
