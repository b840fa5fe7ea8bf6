"""TensorBoard logging. Every tag moectl writes is named here, and only here:

Scalars
  train/{loss, lm_loss, aux_loss, z_loss}  means over the logging window; loss = the objective
                                     (lm_loss, or a mixture head's EM loss) + aux_loss + z_loss
  train/router/{load_balance, importance, load, seq_balance, z}   MoE models: each router loss
                                     unweighted (moe/losses.py), mean over layers and window
  train/grad_norm (pre-clip, window mean), train/lr, train/tokens_per_sec
  eval/loss, eval/ppl                validation cross-entropy (nats/token) and exp of it
  eval/train_seconds                 training seconds before this evaluation, over every session
                                     (the steps alone: no evaluation, logging or checkpoint time)
  routing/layerNN/<column>           per MoE layer over the window, one per stats.COLUMNS name
                                     (cv, max_over_mean, ..., bottom20_share)
  routing/worst_max_over_mean        the most imbalanced layer's max/mean
Histograms
  routing/layerNN/experts            tokens per expert over the window, one bar per expert
                                     (bucket e spans e - 0.5 .. e + 0.5)
Images
  routing/load_heatmap               at each eval: MoE layers (rows) x experts (columns), token
                                     share x E from 0 (dark) to 2, twice uniform (bright); plots.load_heatmap
  routing/layerNN/coselection        route-stats --out: how often experts i and j share a token
                                     (plots.coselection); both are the PNGs' matplotlib figures
Text
  config                             the resolved config
  routing/warnings                   collapse warnings
HParams (moectl sweep, in <sweep>/hparams)
  hparam/<metric>                    each cell's final metrics against its swept values
NN is the FFN slot: the transformer block, or the gap after LSTM layer NN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from moectl.common import plots
from moectl.common.stats import COLUMNS, LayerStats, worst_imbalance


def layer_tag(slot: int) -> str:
    return f"routing/layer{slot:02d}"


class Tracker:
    def __init__(self, log_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(prefix + name, value, step)

    def train(self, means: dict[str, float], step: int) -> None:
        """The window's training scalars by name: loss, ..., router/z, grad_norm, lr, tokens_per_sec."""
        self._scalars("train/", means, step)

    def evaluation(self, loss: float, ppl: float, step: int, train_seconds: float) -> None:
        self._scalars("eval/", {"loss": loss, "ppl": ppl, "train_seconds": train_seconds}, step)

    def routing(self, slots: list[int], layers: list[LayerStats], step: int, histograms: bool) -> None:
        if not self.writer or not layers:
            return
        for slot, s in zip(slots, layers):
            tag = layer_tag(slot)
            self._scalars(f"{tag}/", {c.name: getattr(s, c.name) for c in COLUMNS}, step)
            if histograms:
                self.expert_histogram(f"{tag}/experts", s.load, step)
        self.writer.add_scalar("routing/worst_max_over_mean", worst_imbalance(layers), step)

    def expert_histogram(self, tag: str, load: list[int], step: int) -> None:
        """One bucket per expert with edges e +- 0.5, so each expert is its own bar."""
        counts = np.asarray(load, dtype=np.float64)
        nonzero = np.flatnonzero(counts)
        if not len(nonzero):
            return
        experts = np.arange(len(counts), dtype=np.float64)
        # TensorBoard takes the outer edges from min / max: the first and last non-empty experts.
        self.writer.add_histogram_raw(
            tag,
            min=float(nonzero[0]) - 0.5,
            max=float(nonzero[-1]) + 0.5,
            num=float(counts.sum()),
            sum=float((experts * counts).sum()),
            sum_squares=float((experts**2 * counts).sum()),
            bucket_limits=(experts + 0.5).tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )

    def drift(self, slots: list[int], changed: list[float], step: int) -> None:
        """Per MoE layer, the fraction of evaluated tokens whose top-1 expert differs from the
        starting checkpoint's (train.init_from): `routing/layerNN/top1_changed`."""
        for slot, fraction in zip(slots, changed):
            self._scalars(f"{layer_tag(slot)}/", {"top1_changed": fraction}, step)

    def heatmap(self, layers: list[LayerStats], step: int, slots: Optional[list[int]] = None) -> None:
        """The load heatmap of `layers` (rows labelled by their FFN slots, or 0, 1, ... without)."""
        if not self.writer or not layers:
            return
        figure = plots.load_heatmap([s.share for s in layers], slots, step)
        self.writer.add_image("routing/load_heatmap", plots.rgb_array(figure), step, dataformats="HWC")

    def coselection(self, slot: int, matrix: np.ndarray, step: int) -> None:
        """One layer's (E, E) co-selection matrix, as plots.coselection draws it."""
        if self.writer:
            image = plots.rgb_array(plots.coselection(matrix, slot))
            self.writer.add_image(f"{layer_tag(slot)}/coselection", image, step, dataformats="HWC")

    def config(self, text: str, step: int) -> None:
        """The resolved config YAML, shown as a code block."""
        if self.writer:
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), step)

    def hparams(self, values: dict, metrics: dict[str, float], run_name: str) -> None:
        """One run of a sweep in the HParams dashboard: its swept values and final metrics."""
        if self.writer:
            shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
            self.writer.add_hparams(shown, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=run_name)

    def warning(self, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text("routing/warnings", text, step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
