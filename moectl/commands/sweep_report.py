"""`moectl sweep`'s report: each finished cell's final metrics and eval curve, the groups of cells
that differ only in their seed (each metric's mean and 95% Student-t interval), and, when the sweep
file has a `compare:` block, every group against its baseline group, seed by seed
(moectl/common/paired.py):

- each declared metric: the paired difference (arm - baseline), its 95% interval, and the verdict
  of the rule declared for it (better, worse, equivalent within the margin, inconclusive);
- the eval loss at equal training seconds: each pair read, on its eval curves, at the seconds of
  the run that trained for less (eval/train_seconds: the steps alone). On a constant schedule
  with a cool-down (optim.cooldown_steps) only the evaluations before the cool-down count, so
  both arms are read at their constant learning rate, where a curve means the same at any time;
- the speed-up: the steps the baseline needs to reach the arm's final eval loss, over the arm's
  steps (Switch Transformer's measure; none where the baseline never gets there).

Written as tables, summary.json, summary.csv, paired.csv, TensorBoard's HParams dashboard and an
error-bar PNG per PLOTTED metric (nothing while no cell has finished); and with `record:` a results
file to commit beside the sweep file: every cell's metrics and config hash, the groups, the
comparisons, the machine and the source version.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moectl import config
from moectl.commands import evaluate
from moectl.common import console, plots, runtime
from moectl.common.errors import ConfigError
from moectl.common.fileio import atomic_write_text
from moectl.common.paired import Rule, first_reach, mean_ci, paired, value_at
from moectl.config import Config
from moectl.services import checkpoint, loaded_model, tracking
from moectl.services.tracking import Tracker

SEED = "train.seed"
METRICS = {  # the report's columns: name -> what it is
    "eval_loss": "final validation loss, nats per token",
    "bits_per_byte": "final validation bits per byte",
    "tokens_per_sec": "training throughput of the cell's last session",
    "max_over_mean": "the most imbalanced MoE layer's max/mean expert load on the validation batches",
    "maxvio": "MaxVio (Wang et al. 2024): max/mean load - 1 on the validation batches, mean over MoE layers",
    "drop_fraction": "assignments dropped by capacity on the validation batches, mean over MoE layers",
    "router_z": "router z-loss mean_x logsumexp(logits)^2, unweighted, over the last training window",
    "train_max_over_mean": "the most imbalanced MoE layer's max/mean load over the last training window (training "
    "batches, with the router's noise)",
    "train_batch_max_over_mean": "the same per training batch: the most imbalanced layer's mean over the last window's "
    "forward passes of each pass's max/mean load",
    "maxvio_batch": "MaxVio per batch on the validation batches: each batch's max/mean load - 1, mean over batches and "
    "MoE layers",
    "router_entropy": "the router's normalised entropy H(p(x)) / log E on the validation batches, mean over MoE layers",
    "val_router_z": "mean_x logsumexp(logits)^2 on the validation batches, mean over MoE layers",
    "logit_spread": "the std of the router logits over experts on the validation batches, mean over tokens and MoE "
    "layers (a shift of every logit lowers z and leaves it)",
    "eval_loss_dropless": "final validation loss evaluated without capacity (the eval loss when the run is dropless)",
    "eval_loss_gain": "the eval loss at step 0 (the starting weights: train.init_from's, when fine-tuning) minus the "
    "final one: what the run's training gained",
    "trainable_params": "parameters the run trains (with train.lora: the adapters, and the routers when targeted)",
    "optimizer_state_mib": "the optimizer's state at the last checkpoint, MiB (AdamW: two moments per trainable parameter)",
    "peak_rss_mib": "the training process's peak resident memory, MiB (its last session; rank 0 under torchrun)",
    "step_seconds": "seconds per optimizer step in the cell's last session",
}
UNITS = {"eval_loss": "nats/token", "bits_per_byte": "bits/byte", "tokens_per_sec": "tokens/s",
         "max_over_mean": "ratio"}  # the error-bar charts' y-axis units; a metric not here is labelled by its name
PLOTTED = ("eval_loss", "bits_per_byte", "tokens_per_sec", "max_over_mean")  # one error-bar PNG each
COMPARE_KEYS = ("baseline", "metric", "better", "margin", "metrics")


@dataclass(frozen=True)
class Compare:
    """A sweep file's `compare:` block: what makes a group the baseline, and the metrics compared,
    each with the rule its verdict follows (declared before the run); the first is the headline."""

    baseline: dict  # {"variant": name} or {swept key: value}
    rules: dict = field(default_factory=lambda: {"eval_loss": Rule()})  # metric -> Rule, in the file's order

    def describe(self) -> str:
        base = ", ".join(f"{k}={v}" for k, v in self.baseline.items())
        rules = "; ".join(f"{m}, {r.better} is better" + (f", equivalent within ±{r.margin:g}" if r.margin else "")
                          for m, r in self.rules.items())
        return f"against {base}, paired by seed: {rules}"


@dataclass
class Cell:
    name: str
    variant: Optional[str]  # its variant's name
    values: dict[str, Any]  # what the grid and its variant set
    needs: dict[str, Any]  # what the runner set for the cell's router
    overrides: list[str]  # every --set of the cell
    cfg: Config
    run_dir: Path
    status: str = "pending"  # pending, done, skipped, failed, stopped
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curve: dict[str, list] = field(default_factory=dict)  # the eval curve: steps, loss, training seconds


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    root: Path
    keys: list[str]  # the swept keys, in grid order (variant first, if any)
    cells: list[Cell]
    compare: Optional[Compare] = None  # the compare: block: every group against its baseline, by seed
    record: Optional[Path] = None  # the record: file, the sweep's results to commit


def parse_compare(raw: Any, where: str, grid: dict, variant_names: list[str]) -> Optional[Compare]:
    """The sweep file's `compare:` block, checked against the grid and the variants it may name."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or "baseline" not in raw:
        raise ConfigError(f"{where}: give a mapping with baseline (a variant's name, or {{key: value}} of the grid) "
                          "and optionally metric, better, margin")
    unknown = [k for k in raw if k not in COMPARE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; compare has {', '.join(COMPARE_KEYS)}")
    base = raw["baseline"]
    if isinstance(base, str):
        if base not in variant_names:
            raise ConfigError(f"{where}.baseline={base!r} names no variant (variants: {', '.join(variant_names) or 'none'})")
        selector = {"variant": base}
    elif isinstance(base, dict) and base:
        for key, value in base.items():
            if key == SEED or key not in grid:
                swept = ", ".join(k for k in grid if k != SEED) or "none"
                raise ConfigError(f"{where}.baseline: {key!r} is not a swept key other than {SEED} (swept: {swept})")
            if value not in grid[key]:
                raise ConfigError(f"{where}.baseline: {key}={value!r} is not one of its values {grid[key]}")
        selector = dict(base)
    else:
        raise ConfigError(f"{where}.baseline: give a variant's name or a mapping of grid keys to values")
    if "metrics" in raw:
        single = [k for k in ("metric", "better", "margin") if k in raw]
        if single:
            raise ConfigError(f"{where}: give either metrics: {{name: {{better, margin}}}} or metric, better and "
                              f"margin, not both ({single[0]!r} beside metrics)")
        metrics = raw["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            raise ConfigError(f"{where}.metrics: give a mapping of metric names to {{better, margin}}, e.g. "
                              "{eval_loss: {better: lower, margin: 0.02}}")
    else:
        metrics = {raw.get("metric", "eval_loss"): {k: raw[k] for k in ("better", "margin") if k in raw}}
    rules = {}
    for metric, rule in metrics.items():
        if metric not in METRICS:
            raise ConfigError(f"{where}.metric={metric!r}: choose one of {', '.join(METRICS)}")
        rule = rule or {}
        if not isinstance(rule, dict) or set(rule) - {"better", "margin"}:
            raise ConfigError(f"{where}.metrics.{metric}: give {{better: lower|higher, margin: number}}")
        try:
            rules[metric] = Rule(better=rule.get("better", "higher" if metric == "tokens_per_sec" else "lower"),
                                 margin=float(rule.get("margin", 0.0)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return Compare(selector, rules)


def finished(cell: Cell) -> bool:
    ckpt = checkpoint.latest(cell.run_dir)
    return ckpt is not None and checkpoint.read_meta(ckpt)["step"] >= cell.cfg.train.max_steps


# ------------------------------------------------------------------------------------- measuring


def measure(cell: Cell) -> None:
    """A finished cell's final metrics and eval curve, measured once per checkpoint (cached in
    sweep_eval.json; a cache that lacks a metric is measured again)."""
    ckpt = checkpoint.latest(cell.run_dir)
    cache = cell.run_dir / "sweep_eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint") == str(ckpt) and "curve" in cached and set(METRICS) <= set(cached["metrics"]):
            cell.metrics, cell.curve = cached["metrics"], cached["curve"]
            return
    meta = checkpoint.read_meta(ckpt)
    result = evaluate.run(loaded_model.load(cell.run_dir))
    layers = result.layers
    dropless = result.loss
    if result.eval_capacity_factor is not None:
        dropless = evaluate.run(loaded_model.load(cell.run_dir, ["moe.eval_capacity_factor=dropless"])).loss
    slots = [s["slot"] for s in layers]
    per_layer = {(c, slot): f"{tracking.layer_tag(slot)}/{c}" for c in ("max_over_mean", "batch_max_over_mean")
                 for slot in slots}  # each MoE layer's training windows
    windows = _scalars(cell.run_dir, ("train/router/z", "eval/loss", "eval/train_seconds", *per_layer.values()))
    last = {c: [windows[tag][-1][1] for (col, _), tag in per_layer.items() if col == c and windows[tag]]
            for c in ("max_over_mean", "batch_max_over_mean")}  # the last window of each layer
    cell.metrics = {
        "eval_loss": result.loss,
        "bits_per_byte": result.bits_per_byte,
        "tokens_per_sec": meta.get("tokens_per_sec") or float("nan"),
        "max_over_mean": max((s["max_over_mean"] for s in layers), default=float("nan")),
        "maxvio": _mean([s["max_over_mean"] - 1 for s in layers]),
        "drop_fraction": _mean([s["drop_fraction"] for s in layers]),
        "router_z": windows["train/router/z"][-1][1] if windows["train/router/z"] else float("nan"),
        "train_max_over_mean": max(last["max_over_mean"], default=float("nan")),
        "train_batch_max_over_mean": max(last["batch_max_over_mean"], default=float("nan")),
        "maxvio_batch": _mean([s["batch_max_over_mean"] - 1 for s in layers]),
        "router_entropy": _mean([s["router_entropy"] for s in layers]),
        "val_router_z": _mean([s["router_z"] for s in layers]),
        "logit_spread": _mean([s["logit_spread"] for s in layers]),
        "eval_loss_dropless": dropless,
        "trainable_params": meta.get("trainable_params", float("nan")),
        "optimizer_state_mib": meta.get("optimizer_state_bytes", float("nan")) / 2**20,
        "peak_rss_mib": meta.get("peak_rss_bytes", float("nan")) / 2**20,
        "step_seconds": cell.cfg.train.batch_size * cell.cfg.data.seq_len / (meta.get("tokens_per_sec") or float("nan")),
    }
    seconds = dict(windows["eval/train_seconds"])
    points = [(step, seconds.get(step), loss) for step, loss in windows["eval/loss"]]
    start = points[0][2] if points and points[0][0] == 0 else float("nan")
    cell.metrics["eval_loss_gain"] = start - result.loss
    optim = cell.cfg.optim
    stable = cell.cfg.train.max_steps - optim.cooldown_steps if optim.schedule == "constant" else None
    cell.curve = {"steps": [p[0] for p in points], "loss": [p[2] for p in points],
                  "seconds": [p[1] for p in points] if points and all(p[1] is not None for p in points) else [],
                  "stable_until": stable}
    cache.write_text(json.dumps({"checkpoint": str(ckpt), "metrics": cell.metrics, "curve": cell.curve}, indent=2) + "\n")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each tag in the run's TensorBoard events, in step order ([] if absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) if tag in have else [] for tag in tags}


def groups(sweep: Sweep) -> list[tuple[dict, list[Cell]]]:
    """The cells by group (the swept values but the seed), finished ones measured."""
    found: dict[str, tuple[dict, list[Cell]]] = {}
    for cell in sweep.cells:
        if cell.status in ("pending", "stopped") and finished(cell):
            cell.status = "done"
        if cell.status in ("done", "skipped") and not cell.metrics:
            measure(cell)
        group = ({"variant": cell.variant} if cell.variant else {}) | {
            k: v for k, v in cell.values.items() if k != SEED and k in sweep.keys}
        found.setdefault(json.dumps(group, sort_keys=True), (group, []))[1].append(cell)  # 1 and 1.0 stay apart
    return list(found.values())


def summarize(sweep: Sweep) -> list[dict]:
    """One row per group of cells that differ only in their seed."""
    rows = []
    for group, cells in groups(sweep):
        done = [c for c in cells if c.metrics]
        row = {"group": group, "cells": len(cells), "finished": len(done),
               "errors": [f"{c.name}: {c.error}" for c in cells if c.status == "failed"]}
        for metric in METRICS:
            row[metric], row[f"{metric}_ci95"] = mean_ci([c.metrics[metric] for c in done])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- comparing


def compare(sweep: Sweep) -> list[dict]:
    """Every group that is not a baseline against its baseline group (its swept values, with what
    compare.baseline sets), over the seeds both finished; see the module docstring."""
    spec = sweep.compare
    if spec is None:
        return []
    found = {json.dumps(group, sort_keys=True): (group, cells) for group, cells in groups(sweep)}
    out = []
    for group, cells in found.values():
        base_group = {**group, **spec.baseline}
        key = json.dumps(base_group, sort_keys=True)
        if base_group == group or key not in found:
            continue
        arm, base = _by_seed(cells), _by_seed(found[key][1])
        seeds = [s for s in arm if s in base]
        differences = {metric: paired({s: arm[s].metrics[metric] for s in seeds},
                                      {s: base[s].metrics[metric] for s in seeds}, rule).to_dict()
                       for metric, rule in spec.rules.items()}
        out.append({"group": group, "baseline": base_group, "differences": differences,
                    **_curves_compared({s: (arm[s].curve, base[s].curve) for s in seeds}, spec)})
    return out


def _by_seed(cells: list[Cell]) -> dict:
    return {c.values.get(SEED, c.cfg.train.seed): c for c in cells if c.metrics}


def _curves_compared(pairs: dict, spec: Compare) -> dict:
    """The eval loss at equal training seconds, and the baseline's steps to the arm's final loss
    over the arm's steps, per seed; `pairs`: seed -> (arm's curve, baseline's curve)."""
    at_time, seconds, speedups = {}, {}, {}
    for seed, (a, b) in pairs.items():
        if not a.get("loss") or not b.get("loss"):
            continue
        reach = first_reach(b["steps"], b["loss"], a["loss"][-1])
        speedups[seed] = None if reach is None else reach / a["steps"][-1]
        a_s, a_loss = _before_cooldown(a)
        b_s, b_loss = _before_cooldown(b)
        if a_s and b_s:
            seconds[seed] = t = min(a_s[-1], b_s[-1])
            at_time[seed] = value_at(a_s, a_loss, t) - value_at(b_s, b_loss, t)
    # The eval loss is lower-is-better whatever the declared metrics; its margin is the one declared
    # for the eval loss, if any.
    rule = Rule("lower", spec.rules["eval_loss"].margin if "eval_loss" in spec.rules else 0.0)
    equal_time = paired(at_time, {s: 0.0 for s in at_time}, rule)
    reached = [v for v in speedups.values() if v is not None]
    mean, half = mean_ci(reached)
    return {"equal_time": {**equal_time.to_dict(), "seconds": seconds},
            "speedup": {"mean": mean, "ci95": half, "per_seed": speedups, "not_reached": len(speedups) - len(reached)}}


def _before_cooldown(curve: dict) -> tuple[list, list]:
    """A curve's (seconds, loss) points up to the end of its constant learning rate (all of them
    on a schedule without a cool-down); ([], []) without logged seconds."""
    if not curve.get("seconds"):
        return [], []
    last = curve.get("stable_until")
    keep = [i for i, step in enumerate(curve["steps"]) if last is None or step <= last]
    return [curve["seconds"][i] for i in keep], [curve["loss"][i] for i in keep]


# --------------------------------------------------------------------------------------- writing


def _shown(mean: float, half: float, spec: str) -> str:
    if mean != mean:
        return "-"
    return format(mean, spec) + ("" if half != half else "±" + format(half, spec.lstrip("+")))


def axis_label(metric: str) -> str:
    """A chart's y-axis label: the metric and its unit, or the metric alone when UNITS has none."""
    return f"{metric} ({UNITS[metric]})" if metric in UNITS else metric


def write_report(sweep: Sweep, rows: list[dict], comparisons: list[dict]) -> list[Path]:
    """summary.json, summary.csv, paired.csv (with a compare: block), HParams events and one PNG
    per PLOTTED metric that some group has, in the sweep directory; the paths written. Nothing at
    all while no cell has finished: a report of no results must not replace one of some."""
    if not any(c.metrics for c in sweep.cells):
        return []
    root = sweep.root
    root.mkdir(parents=True, exist_ok=True)
    cells = [{"cell": c.name, "values": c.values, "router_needs": c.needs, "status": c.status, "error": c.error,
              "metrics": c.metrics} for c in sweep.cells]
    summary = {"sweep": str(sweep.path), "metrics": METRICS, "groups": rows, "cells": cells}
    if sweep.compare is not None:
        summary["compare"] = _compare_summary(sweep.compare, comparisons)
    (root / "summary.json").write_text(json.dumps(_strict(summary), indent=2, default=str) + "\n")
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        columns = [m for metric in METRICS for m in (metric, f"{metric}_ci95")]
        writer.writerow([*sweep.keys, "cells", "finished", *columns, "errors"])
        for row in rows:
            writer.writerow([_csv_value(row["group"], k) for k in sweep.keys] + [row["cells"], row["finished"]]
                            + [row[c] for c in columns] + [" | ".join(row["errors"])])
    written = [root / "summary.json", root / "summary.csv"]
    if comparisons:
        _write_paired_csv(sweep, comparisons)
        written.append(root / "paired.csv")
    tracker = Tracker(root / "hparams")
    for c in sweep.cells:
        if c.metrics:
            values = {**({"variant": c.variant} if c.variant else {}), **c.needs, **c.values}
            tracker.hparams(values, {k: v for k, v in c.metrics.items() if v == v}, c.name)
    tracker.close()
    written.append(root / "hparams")
    labels = ["\n".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["group"].items()) or "all" for row in rows]
    for metric in PLOTTED:
        if any(row[metric] == row[metric] for row in rows):
            figure = plots.error_bars(labels, [row[metric] for row in rows], [row[f"{metric}_ci95"] for row in rows],
                                      axis_label(metric), f"{sweep.name}: {metric}, mean and 95% CI over seeds")
            plots.save_png(figure, root / f"{metric}.png")
            written.append(root / f"{metric}.png")
    return written


def write_record(sweep: Sweep, rows: list[dict], comparisons: list[dict]) -> None:
    """The sweep's results, small enough to commit (sweep file's `record:`): per cell its seed,
    config hash, final metrics, eval curve (steps, loss, training seconds) and the code that
    trained it; the groups; the comparisons; what reported it and on which code.
    Only a complete sweep writes it: a report of unfinished cells (a fresh clone has no runs/) must
    not replace results committed earlier."""
    missing = [c.name for c in sweep.cells if not c.metrics]
    if missing:
        console.warn(f"record: {sweep.record} left as it is: {len(missing)} of {len(sweep.cells)} cells have no "
                     f"results (first: {missing[0]}); it is written when every cell has finished")
        return
    cells = [{"cell": c.name, "variant": c.variant, "values": c.values, "seed": c.values.get(SEED, c.cfg.train.seed),
              "config_hash": config.config_hash(c.cfg), "status": c.status, "metrics": c.metrics, "curve": c.curve,
              "trained_by": checkpoint.read_meta(checkpoint.latest(c.run_dir)).get("source")} for c in sweep.cells]
    record = {"sweep": sweep.path.name, "name": sweep.name, "source": runtime.source_version(),  # the report's code
              "machine": runtime.machine(), "metrics": METRICS, "cells": cells, "groups": rows}
    if sweep.compare is not None:
        record["compare"] = _compare_summary(sweep.compare, comparisons)
    sweep.record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.record, json.dumps(_strict(record), indent=2, default=str) + "\n")
    console.status(f"wrote the sweep's record to {sweep.record}")


def _compare_summary(spec: Compare, comparisons: list[dict]) -> dict:
    return {"baseline": spec.baseline,
            "rules": {m: {"better": r.better, "margin": r.margin} for m, r in spec.rules.items()},
            "comparisons": comparisons}


def _csv_value(group: dict, key: str) -> Any:
    return json.dumps(group[key]) if key in group and group[key] is None else group.get(key, "")


def _write_paired_csv(sweep: Sweep, comparisons: list[dict]) -> None:
    """One row per arm and compared metric; the equal-time and speed-up columns repeat per arm."""
    with open(sweep.root / "paired.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(k for k in sweep.keys if k != SEED), "metric", "seeds", "difference", "ci95", "verdict",
                         "equal_time_difference", "equal_time_ci95", "equal_time_verdict", "speedup", "speedup_ci95",
                         "speedup_not_reached"])
        for c in comparisons:
            t, s = c["equal_time"], c["speedup"]
            for metric, d in c["differences"].items():
                writer.writerow([_csv_value(c["group"], k) for k in sweep.keys if k != SEED]
                                + [metric, d["n"], d["mean"], d["ci95"], d["verdict"], t["mean"], t["ci95"], t["verdict"],
                                   s["mean"], s["ci95"], s["not_reached"]])


def _strict(obj: Any) -> Any:
    """NaN (a metric a cell does not have, e.g. load for a dense model) as JSON null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    return [_strict(v) for v in obj] if isinstance(obj, list) else obj


def show(sweep: Sweep, rows: list[dict], comparisons: list[dict], written: list[Path]) -> None:
    """The report for people: one row per group of seeds, then each group against its baseline,
    then the files `written` (write_report's)."""
    from rich.table import Table

    table = Table(title=f"sweep {sweep.name}: mean ± 95% CI over seeds", title_justify="left", box=None,
                  pad_edge=False, header_style="bold underline")
    for key in sweep.keys:
        if key != SEED:
            table.add_column(key.rsplit(".", 1)[-1], overflow="fold")
    for name in ("seeds", "eval loss", "bits/byte", "tok/s", "max/mean", "drop", "router z"):
        table.add_column(name, justify="right", overflow="fold")  # a narrow terminal wraps, never hides, a figure
    for row in rows:
        table.add_row(
            *(str(row["group"].get(k, "")) for k in sweep.keys if k != SEED),
            f"{row['finished']}/{row['cells']}",
            _shown(row["eval_loss"], row["eval_loss_ci95"], ".4f"),
            _shown(row["bits_per_byte"], row["bits_per_byte_ci95"], ".4f"),
            _shown(row["tokens_per_sec"], row["tokens_per_sec_ci95"], ".0f"),
            _shown(row["max_over_mean"], row["max_over_mean_ci95"], ".2f"),
            _shown(row["drop_fraction"], row["drop_fraction_ci95"], ".3f"),
            _shown(row["router_z"], row["router_z_ci95"], ".2f"),
        )
    console.out.print(table)
    if comparisons:
        _show_comparisons(sweep, comparisons)
    for row in rows:
        for error in row["errors"]:
            console.error(f"cell {error}")
    if written:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in written)
        console.status(f"wrote {names} in {sweep.root}")
    else:
        console.warn(f"no cell has finished yet: nothing written to {sweep.root}")


def _show_comparisons(sweep: Sweep, comparisons: list[dict]) -> None:
    from rich.table import Table

    spec = sweep.compare
    table = Table(title=f"{sweep.name}: each arm {spec.describe()}; 95% t-intervals of the mean difference",
                  title_justify="left", box=None, pad_edge=False, header_style="bold underline")
    for key in sweep.keys:
        if key != SEED:
            table.add_column(key.rsplit(".", 1)[-1], overflow="fold")
    for name in ("metric", "seeds", "Δ", "verdict", "Δ eval loss at equal time", "verdict", "speed-up"):
        table.add_column(name, justify="right", overflow="fold")
    for c in comparisons:
        t, s = c["equal_time"], c["speedup"]
        missed = f" ({s['not_reached']} not reached)" if s["not_reached"] else ""
        for i, (metric, d) in enumerate(c["differences"].items()):
            curves = [_shown(t["mean"], t["ci95"], "+.4f"), t["verdict"] if t["n"] else "-",
                      _shown(s["mean"], s["ci95"], ".2f") + missed] if i == 0 else ["", "", ""]
            table.add_row(*(str(c["group"].get(k, "")) if i == 0 else "" for k in sweep.keys if k != SEED), metric,
                          str(d["n"]), _shown(d["mean"], d["ci95"], "+.4f"), d["verdict"], *curves)
    console.out.print(table)
