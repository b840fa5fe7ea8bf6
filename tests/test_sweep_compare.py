"""`moectl sweep` with a `compare:` block: every group against its baseline group, paired by seed,
with the verdict of the declared rule; the eval loss at equal training seconds; the baseline's
steps to reach an arm's final loss. The arithmetic is pinned on hand-made metrics and curves;
one small sweep runs end to end."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from moectl.cli import app
from moectl.commands import sweep as sweeping
from moectl.commands import sweep_report
from moectl.common.errors import ConfigError
from moectl.common.paired import Rule
from test_sweep import sweep_file

runner = CliRunner()


GRID = {"train.seed": [1, 2, 3], "moe.top_k": [1, 2]}
VARIANTS = [{"name": "moe"}, {"name": "dense", "model.arch": "transformer_dense"}]


@pytest.mark.parametrize("compare, message", [
    ({"metric": "eval_loss"}, "give a mapping with baseline"),
    ({"baseline": "dnse"}, "compare.baseline='dnse' names no variant (variants: moe, dense)"),
    ({"baseline": {"train.seed": 1}}, "'train.seed' is not a swept key other than train.seed (swept: moe.top_k)"),
    ({"baseline": {"moe.top_k": 3}}, "moe.top_k=3 is not one of its values [1, 2]"),
    ({"baseline": "dense", "metric": "loss"}, "compare.metric='loss': choose one of eval_loss"),
    ({"baseline": "dense", "better": "less"}, "better='less' must be lower or higher"),
    ({"baseline": "dense", "margin": -1}, "margin=-1.0 must be >= 0"),
    ({"baseline": "dense", "rule": "x"}, "unknown key 'rule'; compare has baseline, metric, better, margin, metrics"),
    ({"baseline": "dense", "metric": "eval_loss", "metrics": {"maxvio": None}}, "give either metrics:"),
    ({"baseline": "dense", "metrics": ["maxvio"]}, "compare.metrics: give a mapping of metric names"),
    ({"baseline": "dense", "metrics": {"maxvio": {"bettr": "lower"}}}, "compare.metrics.maxvio: give {better"),
])
def test_a_bad_compare_block_is_refused_with_the_key_named(tmp_path, compare, message):
    path = sweep_file(tmp_path, tiny_config(tmp_path), grid=GRID, variants=VARIANTS, compare=compare)
    with pytest.raises(ConfigError, match="compare") as info:
        sweeping.load(path)
    assert message in str(info.value), str(info.value)


def _finished(sweep, metrics: dict, curves: dict) -> None:
    """Mark every cell done with the given eval loss and curve, by (variant, top_k, seed)."""
    for cell in sweep.cells:
        key = (cell.variant, cell.values["moe.top_k"], cell.values["train.seed"])
        cell.status, cell.metrics = "done", {m: float("nan") for m in sweep_report.METRICS}
        cell.metrics["eval_loss"] = metrics[key]
        cell.curve = curves[key]


def test_each_group_is_paired_by_seed_with_its_baseline_and_judged_by_the_rule(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), grid=GRID, variants=VARIANTS,
                      compare={"baseline": "dense", "margin": 0.05})
    sweep = sweeping.load(path)
    assert sweep.compare.baseline == {"variant": "dense"} and sweep.compare.rules == {"eval_loss": Rule("lower", 0.05)}
    arm_loss = {1: 2.90, 2: 2.88, 3: 2.89}  # moe, top_k=2: 0.10, 0.12, 0.11 below dense
    metrics, curves = {}, {}
    for seed in (1, 2, 3):
        for k in (1, 2):
            metrics[("dense", k, seed)] = 3.0
            metrics[("moe", k, seed)] = arm_loss[seed] if k == 2 else 3.0 + 0.01 * (seed - 2)  # k=1: -0.01, 0, 0.01
            # dense: 3 evaluations 5 s apart; moe: slower per step (10 s apart), lower at the end.
            curves[("dense", k, seed)] = {"steps": [0, 100, 200, 300], "seconds": [0, 5, 10, 15], "loss": [5, 4, 3.5, 3.0]}
            curves[("moe", k, seed)] = {"steps": [0, 100, 200], "seconds": [0, 10, 20], "loss": [5, 3, 2 + seed / 10]}
    _finished(sweep, metrics, curves)
    found = {json.dumps(c["group"], sort_keys=True): c for c in sweep_report.compare(sweep)}
    assert len(found) == 2  # the two moe groups; dense groups are baselines
    top2 = found[json.dumps({"variant": "moe", "moe.top_k": 2}, sort_keys=True)]
    assert top2["baseline"] == {"variant": "dense", "moe.top_k": 2}
    d = top2["differences"]["eval_loss"]
    assert d["diffs"] == pytest.approx({1: -0.10, 2: -0.12, 3: -0.11}) and d["n"] == 3
    assert d["mean"] == pytest.approx(-0.11) and d["ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert d["verdict"] == "better"
    top1 = found[json.dumps({"variant": "moe", "moe.top_k": 1}, sort_keys=True)]
    assert top1["differences"]["eval_loss"]["mean"] == pytest.approx(0.0)
    assert top1["differences"]["eval_loss"]["verdict"] == "equivalent within ±0.05"  # ±4.303 * 0.01 / sqrt(3) = ±0.025
    # Equal time: both read at 15 s (the dense runs' end). moe at 15 s: 3 + (2 + s/10 - 3) / 2.
    t = top2["equal_time"]
    assert t["seconds"] == {1: 15, 2: 15, 3: 15}
    assert t["diffs"] == pytest.approx({s: (3 + (2 + s / 10 - 3) / 2) - 3.0 for s in (1, 2, 3)})
    assert t["verdict"] == "better"
    # Speed-up: dense never gets below 3.0 within its 300 steps, so it never reaches moe's 2.1-2.3.
    assert top2["speedup"]["not_reached"] == 3 and top2["speedup"]["per_seed"] == {1: None, 2: None, 3: None}


def test_equal_time_reads_constant_schedules_before_their_cool_down():
    spec = sweep_report.Compare({"variant": "dense"})
    # The arm cools down after step 200 (20 s), the baseline after step 300 (15 s): the evaluations
    # in a cool-down are left out, and both are read at 15 s, the baseline's last constant point.
    arm = {"steps": [0, 100, 200, 300], "seconds": [0, 10, 20, 30], "loss": [5.0, 4.0, 3.0, 2.0], "stable_until": 200}
    base = {"steps": [0, 100, 200, 300, 400], "seconds": [0, 5, 10, 15, 20], "loss": [5.0, 4.5, 4.0, 3.5, 1.0],
            "stable_until": 300}
    out = sweep_report._curves_compared({1: (arm, base)}, spec)["equal_time"]
    assert out["seconds"] == {1: 15} and out["diffs"] == {1: pytest.approx(3.5 - 3.5)}
    # A cosine schedule (stable_until None) is read over its whole curve: at the baseline's 20 s.
    cosine = {**base, "stable_until": None}
    out = sweep_report._curves_compared({1: (arm, cosine)}, spec)["equal_time"]
    assert out["seconds"] == {1: 20} and out["diffs"] == {1: pytest.approx(3.0 - 1.0)}


def test_several_metrics_each_follow_their_own_rule(tmp_path):
    compare = {"baseline": "dense", "metrics": {"eval_loss": {"better": "lower", "margin": 0.05},
                                                "maxvio": {"better": "lower"}}}
    sweep = sweeping.load(sweep_file(tmp_path, tiny_config(tmp_path), grid=GRID, variants=VARIANTS, compare=compare))
    assert list(sweep.compare.rules) == ["eval_loss", "maxvio"]  # the file's order: the first is the headline
    curve = {"steps": [0, 1], "seconds": [0, 1], "loss": [5.0, 3.0]}
    losses = {(v, k, s): 3.0 + (0.01 * (s - 2) if v == "moe" else 0) for v in ("moe", "dense") for k in (1, 2)
              for s in (1, 2, 3)}
    _finished(sweep, losses, {key: curve for key in losses})
    for cell in sweep.cells:  # moe: MaxVio 0.5, 0.6, 0.7 against dense's 1.0 on every seed
        cell.metrics["maxvio"] = 1.0 if cell.variant == "dense" else 0.4 + cell.values["train.seed"] / 10
    (top1, _) = sweep_report.compare(sweep)
    assert list(top1["differences"]) == ["eval_loss", "maxvio"]
    vio, loss = top1["differences"]["maxvio"], top1["differences"]["eval_loss"]
    assert vio["mean"] == pytest.approx(-0.4) and vio["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert vio["verdict"] == "better"  # -0.4 ± 0.248: below 0; maxvio declared no margin
    assert loss["verdict"] == "equivalent within ±0.05"
    sweep_report.write_report(sweep, sweep_report.summarize(sweep), [top1])
    rows = list(csv.DictReader(open(sweep.root / "paired.csv")))
    assert [(r["metric"], r["verdict"]) for r in rows] == [("eval_loss", "equivalent within ±0.05"), ("maxvio", "better")]


def test_speed_up_is_the_baselines_steps_to_the_arms_final_loss_over_the_arms_steps():
    spec = sweep_report.Compare({"variant": "dense"})
    arm = {"steps": [0, 100], "seconds": [0, 10], "loss": [5.0, 3.5]}
    base = {"steps": [0, 100, 200, 300], "seconds": [0, 4, 8, 12], "loss": [5.0, 4.0, 3.0, 2.5]}
    out = sweep_report._curves_compared({7: (arm, base)}, spec)
    assert out["speedup"]["per_seed"] == {7: pytest.approx(1.5)}  # dense reaches 3.5 at step 150; moe took 100
    assert out["equal_time"]["seconds"] == {7: 10}  # moe ran 10 s, dense 12 s: both read at 10 s
    assert out["equal_time"]["diffs"] == {7: pytest.approx(3.5 - 2.75)}  # dense at 10 s: 3.0 + (2.5 - 3.0) / 2
    no_time = sweep_report._curves_compared({7: ({**arm, "seconds": []}, base)}, spec)
    assert no_time["equal_time"]["n"] == 0 and no_time["speedup"]["per_seed"] == {7: pytest.approx(1.5)}


def test_a_sweep_with_a_baseline_reports_paired_differences_end_to_end(tmp_path):
    raw = tiny_config(tmp_path, train={"max_steps": 2, "eval_every": 1})
    path = sweep_file(tmp_path, raw, name="pairs", grid={"train.seed": [1, 2]},
                      variants=[{"name": "moe", "moe.capacity_factor": 0.5},
                                {"name": "dense", "model.arch": "transformer_dense"}],
                      compare={"baseline": "dense", "margin": 0.5}, record="results/pairs.json")
    res = runner.invoke(app, ["sweep", str(path), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "runs" / "pairs"
    summary = json.loads((root / "summary.json").read_text())
    losses = {c["cell"]: c["metrics"]["eval_loss"] for c in summary["cells"]}
    (comparison,) = summary["compare"]["comparisons"]
    expected = {s: losses[f"moe_seed={s}"] - losses[f"dense_seed={s}"] for s in (1, 2)}
    assert comparison["differences"]["eval_loss"]["diffs"] == {str(s): pytest.approx(v) for s, v in expected.items()}
    assert comparison["differences"]["eval_loss"]["verdict"] in ("better", "worse", "equivalent within ±0.5", "inconclusive")
    assert comparison["equal_time"]["n"] == 2 and all(v > 0 for v in comparison["equal_time"]["seconds"].values())
    (row,) = list(csv.DictReader(open(root / "paired.csv")))
    assert row["variant"] == "moe" and row["seeds"] == "2"
    assert float(row["difference"]) == pytest.approx(sum(expected.values()) / 2)
    # The routing metrics: training windows with the router's noise, the validation batches, and the
    # loss evaluated again without capacity (the MoE cells drop tokens at capacity factor 0.5).
    from moectl.commands import evaluate
    from moectl.services import loaded_model

    by_name = {c["cell"]: c["metrics"] for c in summary["cells"]}
    assert list(by_name) == ["moe_seed=1", "dense_seed=1", "moe_seed=2", "dense_seed=2"]  # seed by seed: pairs
    moe = by_name["moe_seed=1"]
    assert moe["drop_fraction"] > 0 and moe["train_max_over_mean"] >= 1 and moe["train_batch_max_over_mean"] >= 1
    assert 0 < moe["router_entropy"] <= 1 and moe["logit_spread"] > 0 and moe["val_router_z"] > 0
    assert moe["maxvio_batch"] >= 0
    curve = json.loads((root / "moe_seed=1" / "sweep_eval.json").read_text())["curve"]
    assert curve["steps"][0] == 0 and moe["eval_loss_gain"] == pytest.approx(curve["loss"][0] - moe["eval_loss"])
    dropless = evaluate.run(loaded_model.load(root / "moe_seed=1", ["moe.eval_capacity_factor=dropless"])).loss
    assert moe["eval_loss_dropless"] == pytest.approx(dropless) and dropless != moe["eval_loss"]
    dense = by_name["dense_seed=1"]
    assert dense["eval_loss_dropless"] == dense["eval_loss"] and dense["router_entropy"] is None
    said = " ".join(res.output.split())
    assert "against variant=dense, paired by seed: eval_loss, lower is better, equivalent within ±0.5" in said
    assert comparison["differences"]["eval_loss"]["verdict"] in said
    # The record to commit: beside the sweep file, every cell's seed, config hash and metrics,
    # the same comparison, and what ran it.
    record = json.loads((tmp_path / "results" / "pairs.json").read_text())
    assert {c["cell"]: c["metrics"]["eval_loss"] for c in record["cells"]} == losses
    assert {c["cell"]: c["seed"] for c in record["cells"]} == {"moe_seed=1": 1, "moe_seed=2": 2, "dense_seed=1": 1,
                                                                 "dense_seed=2": 2}
    assert all(len(c["config_hash"]) == 16 for c in record["cells"])
    assert all(c["curve"]["steps"] == [0, 1, 2] and len(c["curve"]["seconds"]) == 3 for c in record["cells"])
    assert record["compare"]["comparisons"] == summary["compare"]["comparisons"]
    assert record["machine"]["cores"] == os.cpu_count() and "torch" in record["machine"]
    assert set(record["source"]) == {"version", "commit", "modified"}
    # Each cell's training code, from its checkpoint's meta (the children's own reading of the tree).
    assert all(set(c["trained_by"]) == {"version", "commit", "modified"} for c in record["cells"])
    assert {c["trained_by"]["commit"] for c in record["cells"]} == {record["source"]["commit"]}


def test_a_record_must_be_a_path(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), grid={"train.seed": [1]}, record=["x"])
    with pytest.raises(ConfigError, match="record: give a file path"):
        sweeping.load(path)


def test_a_report_of_unfinished_cells_leaves_the_committed_record_alone(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), grid={"train.seed": [1, 2]}, record="results/r.json")
    committed = tmp_path / "results" / "r.json"
    committed.parent.mkdir()
    committed.write_text('{"cells": "measured earlier"}\n')
    res = runner.invoke(app, ["sweep", str(path), "--report"])  # nothing trained here
    assert res.exit_code == 0, res.output
    assert committed.read_text() == '{"cells": "measured earlier"}\n'
    assert "left as it is: 2 of 2 cells have no results" in " ".join(res.output.split())
