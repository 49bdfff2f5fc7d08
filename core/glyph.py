"""ReChar's structure control image: a glyph's Canny edges, exactly as ReChar computes them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..methods.sdxl import RECHAR

RECHAR_SIZE = RECHAR.defaults["glyph_size"]
CANNY_LOW, CANNY_HIGH = RECHAR.defaults["canny_low"], RECHAR.defaults["canny_high"]


def canny_edges(image: torch.Tensor, size: int = RECHAR_SIZE) -> torch.Tensor:
    """``(H, W, 3)`` float image in [0, 1] -> ``(size, size)`` float edge map in {0, 1}.

    As ReChar's ``inference.py``: the image resized to size x size (Pillow's default resampling,
    aspect not kept), then ``cv2.Canny(image, 100, 200)`` on the 8-bit RGB array.
    """
    import cv2

    pixels = (image.detach().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    resized = np.array(Image.fromarray(pixels).resize((size, size)))
    edges = cv2.Canny(resized, CANNY_LOW, CANNY_HIGH)
    return torch.from_numpy(edges.astype(np.float32) / 255.0)
