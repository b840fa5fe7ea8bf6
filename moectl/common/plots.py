"""Pictures without a plotting library: heatmaps and error-bar charts as RGB arrays, PNG files via Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Anchor colours of matplotlib's viridis at 0, 0.25, 0.5, 0.75, 1 (dark blue -> yellow).
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB with a trailing axis of 3."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def cell_size(cols: int) -> int:
    """Pixels per heatmap cell: large enough to see, small enough that 64+ experts fit a screen."""
    return max(8, min(48, 768 // max(cols, 1)))


def heatmap(matrix: np.ndarray, vmax: float, gap: int = 1) -> np.ndarray:
    """(rows, cols) -> (rows*cell, cols*cell, 3) uint8 image, value 0 -> dark, vmax -> bright."""
    cell = cell_size(np.shape(matrix)[1])
    rgb = colormap(np.asarray(matrix, dtype=np.float64) / vmax)  # (rows, cols, 3)
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    if gap:
        img[cell - gap :: cell, :, :] = 255  # white grid lines between cells
        img[:, cell - gap :: cell, :] = 255
    return img


def load_heatmap(shares: list[list[float]]) -> np.ndarray:
    """Layers (rows) x experts (columns) of token share, from 0 (dark) to 2 / E, twice uniform, or
    more (bright); a layer with fewer experts than the widest has white cells after its last."""
    width = max(len(row) for row in shares)
    scaled = np.full((len(shares), width), np.nan)
    for i, row in enumerate(shares):
        scaled[i, : len(row)] = np.asarray(row, dtype=np.float64) * len(row) / 2.0
    image = heatmap(scaled, vmax=1.0)
    cell = cell_size(width)
    for i, row in enumerate(shares):
        image[i * cell : (i + 1) * cell, len(row) * cell :] = 255
    return image


def save_png(image: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def error_bars(labels: list[str], means: list[float], halfwidths: list[float], title: str) -> np.ndarray:
    """A point per label with a vertical bar of +- halfwidth (NaN: no bar; a NaN mean: no point), on
    a white RGB canvas."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = max(480, 90 * len(labels) + 120), 360, 70, 20, 40, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    hw = [0.0 if h != h else h for h in halfwidths]  # NaN (one seed): a point without a bar
    shown = [(m, h) for m, h in zip(means, hw) if m == m]  # NaN mean (e.g. no MoE layer): no point
    lo, hi = min(m - h for m, h in shown), max(m + h for m, h in shown)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo))
    y = lambda v: top + (hi - v) / (hi - lo) * (height - top - bottom)  # noqa: E731
    draw.text((left, 12), title, fill="black")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for i in range(5):  # y ticks
        v = lo + (hi - lo) * i / 4
        draw.line([(left - 4, y(v)), (left, y(v))], fill="black")
        draw.text((4, y(v) - 6), f"{v:.4g}", fill="black")
    step = (width - left - right) / len(labels)
    for i, (label, m, h) in enumerate(zip(labels, means, hw)):
        x = left + step * (i + 0.5)
        if m == m:
            draw.line([(x, y(m - h)), (x, y(m + h))], fill=(59, 82, 139), width=2)
            for v in (m - h, m + h):
                draw.line([(x - 6, y(v)), (x + 6, y(v))], fill=(59, 82, 139), width=2)
            draw.ellipse([x - 4, y(m) - 4, x + 4, y(m) + 4], fill=(33, 145, 140))
        for j, part in enumerate(label.split("\n")):
            draw.text((x - 3 * len(part), height - bottom + 8 + 12 * j), part, fill="black")
    return np.asarray(image)
