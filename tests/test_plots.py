"""The pictures (moectl/common/plots.py): each is a matplotlib figure with a title, labelled axes
and a colour bar or legend; what the cells and points show; the PNG and TensorBoard renderings;
and the sweep report's error-bar charts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from moectl.commands import sweep as sweeping
from moectl.commands import sweep_report
from moectl.common import plots
from test_sweep import sweep_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_the_load_heatmap_has_a_title_labelled_axes_and_a_colour_bar_with_its_unit():
    shares = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]]
    fig = plots.load_heatmap(shares, slots=[1, 3], step=300)
    ax, bar = fig.axes  # the heatmap and its colour bar
    assert ax.get_title() == "Expert load by MoE layer, step 300"
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer"
    assert tick_labels(ax.xaxis) == ["0", "1", "2", "3"]
    assert tick_labels(ax.yaxis) == ["1", "3"]  # the layers' FFN slots, not their order
    image = ax.images[0]
    assert image.colorbar.ax is bar and "uniform" in bar.get_ylabel() and "× E" in bar.get_ylabel()
    assert image.get_clim() == (0.0, plots.LOAD_CAP) and image.colorbar.extend == "neither"
    # Share x E: a balanced layer is 1 everywhere, whatever E is.
    assert np.allclose(image.get_array()[0], 1.0) and np.allclose(image.get_array()[1], [0.4, 0.8, 1.2, 1.6])


def test_a_layer_with_fewer_experts_is_blank_after_its_last_and_overload_gets_an_arrow():
    fig = plots.load_heatmap([[0.5, 0.5], [0.9, 0.05, 0.05, 0.0]])
    image = fig.axes[0].images[0]
    cells = image.get_array()
    assert cells.shape == (2, 4)
    assert cells.mask[0, 2:].all() and not cells.mask[0, :2].any() and not cells.mask[1].any()
    assert tuple(image.get_cmap().get_bad()[:3]) == (1.0, 1.0, 1.0)  # masked cells are drawn white (blank)
    assert tick_labels(fig.axes[0].yaxis) == ["0", "1"]  # without slots: the layers' order
    assert cells[1, 0] == pytest.approx(3.6) and image.colorbar.extend == "max"  # beyond the cap of 2


def test_many_experts_get_thinned_round_integer_ticks():
    fig = plots.load_heatmap([[1 / 64] * 64] * 3)
    labels = tick_labels(fig.axes[0].xaxis)
    assert labels == [str(i) for i in range(0, 64, 4)]
    assert [plots.tick_step(n) for n in (1, 16, 17, 32, 64, 65, 100, 256)] == [1, 1, 2, 2, 4, 5, 8, 16]


def test_the_coselection_figure_blanks_the_diagonal_and_scales_to_the_pairs():
    co = np.array([[0.5, 0.2, 0.1], [0.2, 0.3, 0.05], [0.1, 0.05, 0.2]])  # (E, E), diagonal: each expert's load
    fig = plots.coselection(co, slot=3)
    ax, bar = fig.axes
    assert ax.get_title().startswith("MoE layer 03")
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "expert"
    assert tick_labels(ax.xaxis) == tick_labels(ax.yaxis) == ["0", "1", "2"]
    assert bar.get_ylabel() == "fraction of tokens choosing both"
    image = ax.images[0]
    assert image.get_array().mask.diagonal().all() and not image.get_array().mask[0, 1]
    assert image.get_clim() == (0.0, pytest.approx(0.2))  # the largest pair, not the diagonal's 0.5


def test_top1_routing_has_no_pairs_and_still_draws():
    fig = plots.coselection(np.diag([0.5, 0.5]), slot=0)  # top-1: no two experts share a token
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert plots.rgb_array(fig).shape[2] == 3


def test_error_bars_mark_single_seed_groups_apart_in_the_legend():
    fig = plots.error_bars(["dense", "E8", "E16"], [NAN, 1.3, 1.1], [NAN, 0.1, NAN], "max_over_mean (ratio)", "t")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "max_over_mean (ratio)" and ax.get_title() == "t" and ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["mean ± 95% CI over seeds", plots.SINGLE_SEED]
    (single,) = [line for line in ax.get_lines() if line.get_label() == plots.SINGLE_SEED]
    assert list(single.get_xdata()) == [2] and list(single.get_ydata()) == [1.1]  # E16's lone seed
    assert single.get_marker() == "D"
    # The dense group (no value) gets no point, only a note above its label.
    assert [t.get_text() for t in ax.texts] == ["no value"] and ax.texts[0].get_position()[0] == 0
    assert tick_labels(ax.xaxis) == ["dense", "E8", "E16"]
    assert all(t.get_rotation() == 30 for t in ax.get_xticklabels())


def test_error_bars_without_single_seeds_have_no_single_seed_entry():
    fig = plots.error_bars(["a", "b"], [1.0, 2.0], [0.1, 0.2], "eval_loss (nats/token)", "t")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["mean ± 95% CI over seeds"]


def test_png_and_tensorboard_renderings(tmp_path):
    fig = plots.load_heatmap([[0.5, 0.5]])
    plots.save_png(fig, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
    rgb = plots.rgb_array(fig)
    width, height = fig.get_size_inches() * fig.dpi
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert abs(rgb.shape[0] - height) < 1 and abs(rgb.shape[1] - width) < 1
    assert (rgb != 255).any() and (rgb == 255).any()  # something drawn on white


def test_plots_and_tracking_import_no_matplotlib():
    code = "import sys, moectl.common.plots, moectl.services.tracking; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # `moectl --help` stays fast


# ------------------------------------------------------------------------------- the sweep's charts


def test_the_sweep_report_charts_label_units_and_single_seeds(tmp_path, monkeypatch):
    # Two groups (top_k 1, 2) of two seeds; top_k=2 has one finished seed: a point without an interval.
    sweep = sweeping.load(sweep_file(tmp_path, tiny_config(tmp_path), name="s",
                                     grid={"moe.top_k": [1, 2], "train.seed": [1, 2]}))
    for cell in sweep.cells:
        if (cell.values["moe.top_k"], cell.values["train.seed"]) != (2, 2):
            cell.status = "done"
            cell.metrics = {m: 1.0 + cell.values["train.seed"] / 10 for m in sweep_report.METRICS}
            cell.metrics["max_over_mean"] = NAN  # no figure for a metric no group has
    figures = {}
    save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path: (figures.setdefault(Path(path).name, fig), save(fig, path)))
    written = sweep_report.write_report(sweep, sweep_report.summarize(sweep), [])
    assert sorted(figures) == ["bits_per_byte.png", "eval_loss.png", "tokens_per_sec.png"]
    assert {p.name for p in written} == {"summary.json", "summary.csv", "hparams", *figures}
    assert all(p.exists() for p in written)
    assert (sweep.root / "eval_loss.png").read_bytes()[:8] == PNG_MAGIC
    ax = figures["eval_loss.png"].axes[0]
    assert ax.get_ylabel() == "eval_loss (nats/token)" and ax.get_title() == "s: eval_loss, mean and 95% CI over seeds"
    assert tick_labels(ax.xaxis) == ["top_k=1", "top_k=2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean ± 95% CI over seeds", plots.SINGLE_SEED]
    assert figures["tokens_per_sec.png"].axes[0].get_ylabel() == "tokens_per_sec (tokens/s)"
    (interval,) = [c for c in ax.containers]  # the errorbar of top_k=1: seeds 1.1 and 1.2
    assert interval.lines[0].get_ydata()[0] == pytest.approx(1.15)


def test_a_metric_without_a_unit_is_labelled_by_its_name():
    assert sweep_report.axis_label("bits_per_byte") == "bits_per_byte (bits/byte)"
    assert sweep_report.axis_label("max_over_mean") == "max_over_mean (ratio)"
    assert sweep_report.axis_label("maxvio") == "maxvio"
