"""The sample image the ``--tiny`` demo trains on when no ``--image`` is given: drawn here in code
(a red cup with a handle on a blue table before a sunset gradient), so the demo needs no file
from the user and ships no picture under anyone else's licence."""

from __future__ import annotations

from pathlib import Path

SIZE = 256
FILE_NAME = "blora_sample_cup.png"


def draw_sample():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for row in range(SIZE):
        fade = row / SIZE
        draw.line([(0, row), (SIZE, row)], fill=(int(250 - 60 * fade), int(170 - 90 * fade), int(90 + 80 * fade)))
    draw.rectangle([0, 180, SIZE, SIZE], fill=(40, 70, 150))
    draw.ellipse([150, 95, 205, 150], outline=(190, 30, 40), width=12)
    draw.rectangle([70, 80, 165, 185], fill=(200, 40, 50))
    draw.ellipse([70, 70, 165, 92], fill=(150, 20, 30))
    draw.ellipse([192, 40, 232, 80], fill=(255, 235, 150))
    return image


def write_sample(folder: Path) -> Path:
    """The sample image saved in ``folder``; returns its path."""
    path = Path(folder) / FILE_NAME
    draw_sample().save(path)
    return path
