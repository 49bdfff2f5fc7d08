"""The library's contact sheet: each image's thumbnail beside its loss curve, one cell per image
(host-free; the curves are ``core.loss_plot``'s, the same the train node shows)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core import files, loss_plot
from . import library_files as library

THUMBNAIL = 128
CURVE_WIDTH = 384
PAD = 8
CAPTION = 18
HEADER = 30
BACKGROUND, PANEL = (14, 14, 18), (24, 24, 28)
TEXT, DIM, ERROR = (225, 225, 225), (150, 150, 160), (255, 110, 100)
STATUS_COLOURS = {library.DONE: (120, 220, 140), library.FAILED: ERROR, library.UNFINISHED: (240, 200, 90)}


@dataclass(frozen=True)
class Layout:
    """Where each entry's cell, thumbnail and curve sit: cells in a grid of about three times as
    many rows as columns, in manifest order, row by row."""

    count: int

    @property
    def columns(self) -> int:
        return max(1, round(math.sqrt(self.count / 3)))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.count / self.columns))

    cell_width = PAD + THUMBNAIL + PAD + CURVE_WIDTH + PAD
    cell_height = PAD + THUMBNAIL + CAPTION + PAD

    @property
    def size(self) -> tuple[int, int]:
        return self.columns * self.cell_width, HEADER + self.rows * self.cell_height

    def cell(self, index: int) -> tuple[int, int]:
        row, column = divmod(index, self.columns)
        return column * self.cell_width, HEADER + row * self.cell_height

    def thumbnail_box(self, index: int, size: tuple[int, int] = (THUMBNAIL, THUMBNAIL)) -> tuple[int, int, int, int]:
        """The box a thumbnail of ``size`` is pasted into, centred in its square."""
        x, y = self.cell(index)
        left, top = x + PAD + (THUMBNAIL - size[0]) // 2, y + PAD + (THUMBNAIL - size[1]) // 2
        return left, top, left + size[0], top + size[1]

    def curve_box(self, index: int) -> tuple[int, int, int, int]:
        x, y = self.cell(index)
        left, top = x + PAD + THUMBNAIL + PAD, y + PAD
        return left, top, left + CURVE_WIDTH, top + THUMBNAIL


def curve_picture(losses: list[float]) -> Image.Image:
    """``core.loss_plot``'s curve at the sheet's size, as a picture."""
    pixels = loss_plot.loss_curve_image(losses, CURVE_WIDTH, THUMBNAIL)[0].numpy()
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def caption(entry: dict) -> str:
    parts = [entry["image"] or entry["entry"], entry["status"]]
    if entry.get("final_loss") is not None:
        parts.append(f"loss {entry['final_loss']:.4f}")
    if entry.get("steps"):
        parts.append(f"{entry['steps']} steps")
    if entry.get("seconds") is not None:
        parts.append(f"{entry['seconds']:.0f} s")
    if entry.get("resumed_from"):
        parts.append(f"resumed at step {entry['resumed_from']}")
    return "  ·  ".join(parts)


def draw_contact_sheet(library_dir: Path, manifest: dict) -> Image.Image:
    entries = manifest["images"]
    layout = Layout(len(entries))
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    counts = manifest["counts"]
    draw.text((PAD, 9), f"B-LoRA library: {len(entries)} images, {counts[library.DONE]} done, "
                        f"{counts[library.FAILED]} failed, {counts[library.UNFINISHED]} unfinished", fill=TEXT)
    for index, entry in enumerate(entries):
        square = layout.thumbnail_box(index)
        draw.rectangle([square[0], square[1], square[2] - 1, square[3] - 1], fill=PANEL)
        if entry.get("thumbnail"):
            with Image.open(Path(library_dir) / entry["thumbnail"]) as thumbnail:
                thumbnail = thumbnail.convert("RGB")
            sheet.paste(thumbnail, layout.thumbnail_box(index, thumbnail.size)[:2])
        else:
            draw.text((square[0] + 34, square[1] + 58), "no image", fill=DIM)
        curve = layout.curve_box(index)
        if entry["status"] == library.DONE:
            sheet.paste(curve_picture(library.losses_of(library_dir, entry)), curve[:2])
        else:
            draw.rectangle([curve[0], curve[1], curve[2] - 1, curve[3] - 1], fill=PANEL)
            lines = textwrap.wrap(entry.get("error") or entry["status"], width=60)[:8]
            for number, line in enumerate(lines):
                draw.text((curve[0] + 8, curve[1] + 8 + 14 * number), line, fill=ERROR)
        x, y = layout.cell(index)
        draw.text((x + PAD, y + PAD + THUMBNAIL + 4), caption(entry),
                  fill=STATUS_COLOURS.get(entry["status"], TEXT))
    return sheet


def write_contact_sheet(library_dir: Path, manifest: dict) -> Path:
    """Saved beside the manifest, atomically."""
    sheet = draw_contact_sheet(library_dir, manifest)
    return files.write_atomic(Path(library_dir) / library.CONTACT_SHEET,
                              lambda temporary: sheet.save(temporary, format="PNG"))
