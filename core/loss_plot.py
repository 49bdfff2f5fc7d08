"""A loss curve as an image: raw per-step losses in grey, a smoothed line on top."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average; NaN steps are carried over, not averaged in."""
    smoothed, average, count = [], 0.0, 0
    for value in values:
        if not math.isnan(value):
            count += 1
            average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** count) if count else math.nan)
    return smoothed


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """``(1, height, width, 3)`` float image in [0, 1], the host's IMAGE layout."""
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    finite = [v for v in losses if math.isfinite(v)]
    margin = 28
    if finite:
        low, high = min(finite), max(finite)
        span = (high - low) or 1.0

        def point(index: int, value: float) -> tuple[float, float]:
            x = margin + (width - 2 * margin) * (index / max(len(losses) - 1, 1))
            y = height - margin - (height - 2 * margin) * ((value - low) / span)
            return x, y

        raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        smoothed = [point(i, v) for i, v in enumerate(smooth(losses)) if math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(110, 110, 120), width=1)
            draw.line(smoothed, fill=(90, 200, 255), width=2)
        else:
            draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill=(90, 200, 255))
        draw.text((margin, 6), f"loss  last {finite[-1]:.4f}  min {low:.4f}  max {high:.4f}", fill=(220, 220, 220))
    draw.text((margin, height - margin + 8), f"{len(losses)} steps", fill=(160, 160, 160))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
