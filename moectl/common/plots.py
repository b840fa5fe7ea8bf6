"""Pictures for people, drawn with matplotlib: the expert-load heatmap (MoE layers x experts), one
layer's co-selection matrix and a sweep's error bars. Each builder returns a matplotlib Figure with
a title, labelled axes and a colour bar or legend; `save_png` writes it to a file and `rgb_array`
renders it for TensorBoard.

The figures are plain `matplotlib.figure.Figure`s on the Agg canvas, never pyplot's: no display, no
global figure registry to close, and no backend switch behind the caller's back. matplotlib is
imported inside the builders so that `moectl --help` does not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

MOST_TICKS = 16  # index ticks per axis; more experts or layers than this get every 2nd, 4th, ... index
NICE_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 250, 256, 500, 512, 1000)
LOAD_CAP = 2.0  # the load heatmap's colour scale ends at twice the uniform share
SINGLE_SEED = "one seed: no interval"  # the legend entry of a group with one finished seed


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def tick_step(n: int, most: int = MOST_TICKS) -> int:
    """The smallest round step that labels at most `most` of `n` indices."""
    return next((s for s in NICE_STEPS if n <= s * most), -(-n // most))


def _index_ticks(axis: "Axis", n: int, labels: Optional[Sequence[int]] = None) -> None:
    """Integer ticks at the cell centres 0 .. n-1, thinned to a round step; `labels` renames them."""
    positions = list(range(0, n, tick_step(n)))
    axis.set_ticks(positions, [str(labels[p] if labels is not None else p) for p in positions])


def _cell_grid(ax, rows: int, cols: int) -> None:
    """Thin white lines between cells, where the cells are large enough to show them."""
    if max(rows, cols) > 32:
        return
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)


def _cell_inches(n: int, span: float) -> float:
    """Inches per heatmap cell: `span` inches over n cells, kept between readable and a screen's worth."""
    return min(0.45, max(0.12, span / max(n, 1)))


def load_heatmap(shares: list[list[float]], slots: Optional[Sequence[int]] = None, step: Optional[int] = None) -> "Figure":
    """MoE layers (rows, labelled by their FFN slot, or 0, 1, ... without `slots`) x experts (columns):
    each expert's share of its layer's tokens times the layer's E, so 1 is uniform whatever E is.
    The colours run from 0 to 2 (twice uniform); more is drawn as 2 and the colour bar gets an arrow.
    A layer with fewer experts than the widest has blank (masked) cells after its last expert."""
    import matplotlib

    width = max((len(row) for row in shares), default=0)
    scaled = np.full((len(shares), width), np.nan)  # (layers, widest E)
    for i, row in enumerate(shares):
        scaled[i, : len(row)] = np.asarray(row, dtype=np.float64) * len(row)
    values = np.ma.masked_invalid(scaled)
    cell = _cell_inches(width, 8.0)
    fig = _figure(width * cell + 2.6, max(3.2, len(shares) * cell + 1.6))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=LOAD_CAP, aspect="auto", interpolation="nearest")
    over = bool(values.count()) and float(values.max()) > LOAD_CAP
    fig.colorbar(image, ax=ax, extend="max" if over else "neither",
                 label="share of the layer's tokens × E\n(1 = uniform: 1/E each)")
    ax.set_title("Expert load by MoE layer" + ("" if step is None else f", step {step}"))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    _index_ticks(ax.xaxis, width)
    _index_ticks(ax.yaxis, len(shares), slots)
    _cell_grid(ax, len(shares), width)
    return fig


def coselection(matrix: np.ndarray, slot: int) -> "Figure":
    """One MoE layer's (E, E) top-k co-selection: the fraction of tokens that chose both experts i
    and j. The diagonal (the fraction that chose i, its load) is left blank so that it does not set
    the colour scale: load_heatmap shows it."""
    import matplotlib

    co = np.asarray(matrix, dtype=np.float64)  # (E, E), symmetric
    e = co.shape[0]
    values = np.ma.masked_array(co, mask=np.eye(e, dtype=bool))
    top = float(values.max()) if e > 1 else 0.0
    cell = _cell_inches(e, 6.0)
    fig = _figure(e * cell + 2.4, e * cell + 1.8)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of tokens choosing both")
    ax.set_title(f"MoE layer {slot:02d}: experts chosen for the same token\n(diagonal blank: see the load heatmap)",
                 fontsize="medium")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    _index_ticks(ax.xaxis, e)
    _index_ticks(ax.yaxis, e)
    _cell_grid(ax, e, e)
    return fig


def error_bars(labels: list[str], means: list[float], halfwidths: list[float], ylabel: str, title: str) -> "Figure":
    """A point per label with a bar of ± halfwidth. A NaN halfwidth (one seed) gets a hollow diamond
    of its own and a legend entry saying it has no interval; a NaN mean (e.g. the max/mean load of a
    dense model) gets no point, only a grey "no value" above its label."""
    m = np.asarray(means, dtype=np.float64)
    h = np.asarray(halfwidths, dtype=np.float64)
    x = np.arange(len(labels))
    interval, single = ~np.isnan(m) & ~np.isnan(h), ~np.isnan(m) & np.isnan(h)
    fig = _figure(min(20.0, max(6.0, 0.9 * len(labels) + 2.5)), 5.0)
    ax = fig.add_subplot()
    shown = []  # the legend's entries, in this order
    if interval.any():
        shown.append(ax.errorbar(x[interval], m[interval], yerr=h[interval], fmt="o", color="tab:blue", capsize=5,
                                 label="mean ± 95% CI over seeds"))
    if single.any():
        shown += ax.plot(x[single], m[single], linestyle="none", marker="D", markersize=7, markerfacecolor="white",
                         markeredgecolor="tab:orange", markeredgewidth=1.5, label=SINGLE_SEED)
    for i in np.flatnonzero(np.isnan(m)):
        ax.text(i, 0.02, "no value", transform=ax.get_xaxis_transform(), ha="center", va="bottom", color="gray")
    ax.set_xticks(x, labels, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel("group of cells")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if shown:
        ax.legend(handles=shown, loc="best")
    return fig


def save_png(fig: "Figure", path: str | Path) -> None:
    fig.savefig(path, format="png")


def rgb_array(fig: "Figure") -> np.ndarray:
    """The figure rendered: (H, W, 3) uint8, for TensorBoard's add_image(dataformats="HWC")."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
