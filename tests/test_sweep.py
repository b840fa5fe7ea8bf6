"""`moectl sweep`: a grid of ordinary runs, validated before any starts, resumable, compared over
seeds with confidence intervals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from moectl import config
from moectl.services import checkpoint
from moectl.commands import sweep as sweeping
from moectl.common import paired
from moectl.cli import app
from moectl.common.errors import ConfigError

runner = CliRunner()


def sweep_file(tmp_path: Path, base_config: dict, **sweep) -> Path:
    base_file = write_config(tmp_path / "base.yaml", base_config)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(base_file), **sweep}))
    return path


def test_mean_and_confidence_interval_follow_student_t():
    mean, half = paired.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert paired.mean_ci([5.0])[0] == 5.0 and paired.mean_ci([5.0])[1] != paired.mean_ci([5.0])[1]  # NaN


def test_a_router_grid_gets_what_each_router_needs(tmp_path):
    # Every router from the quickstart config: Switch's top-1, GShard's top-2, each router's paper losses.
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    tmp = tmp_path
    spec = tmp / "routers.yaml"
    spec.write_text(yaml.safe_dump({"base": str(quickstart), "grid": {"moe.router": list(config.ROUTERS), "train.seed": [1, 2]}}))
    sweep = sweeping.load(spec, [f"run.dir={tmp}"])
    assert len(sweep.cells) == 2 * len(config.ROUTERS) and sweep.keys == ["moe.router", "train.seed"]
    cells = {c.name: c for c in sweep.cells}
    assert cells["router=switch_seed=1"].cfg.moe.top_k == 1 and cells["router=switch_seed=1"].needs["moe.top_k"] == 1
    assert cells["router=gshard_top2_seed=2"].cfg.moe.top_k == 2
    noisy = cells["router=noisy_topk_seed=1"].cfg.moe
    assert (noisy.importance_loss_coef, noisy.load_loss_coef, noisy.aux_loss_coef) == (0.1, 0.1, 0.0)  # the paper's
    assert cells["router=sigmoid_seed=1"].cfg.moe.seq_aux_loss_coef == 1e-4
    assert all(c.run_dir == tmp / "routers" / c.name for c in sweep.cells)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"grid": {"moe.nope": [1]}}, "unknown key 'moe.nope'"),
        ({"grid": {"moe.top_k": [2, 99]}}, "cell top_k=99: "),
        ({"grid": {}}, "the grid is empty"),
        ({"grid": {"train.seed": []}}, "non-empty list"),
        ({"base": "missing.yaml"}, "base: missing.yaml: no such config file"),
        ({"grid": {"train.seed": [1]}, "sett": {}}, "unknown key 'sett'"),
    ],
)
def test_bad_sweeps_are_refused_before_any_cell_starts(tmp_path, change, message):
    path = sweep_file(tmp_path, tiny_config(tmp_path), **{"grid": {"train.seed": [1]}, **change})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweeping.load(path)
    assert not (tmp_path / "runs").exists()


def test_a_sweep_runs_reports_keeps_going_past_a_failure_and_skips_what_is_done(tmp_path):
    # Two one-step cells over seeds, and a variant whose batch cannot be filled: it fails, the rest finish.
    raw = tiny_config(tmp_path, train={"max_steps": 1, "eval_every": 1})
    path = sweep_file(tmp_path, raw, name="seeds", grid={"train.seed": [1, 2]},
                      variants=[{"name": "moe"}, {"name": "broken", "train.batch_size": 100000}])
    res = runner.invoke(app, ["sweep", str(path), "--jobs", "2"])
    assert res.exit_code == 1, res.output
    said = " ".join(res.output.split())
    assert "cell broken_seed=1 failed" in said and "fewer than train.batch_size=100000" in said
    root = tmp_path / "runs" / "seeds"
    for seed in (1, 2):
        assert checkpoint.read_meta(checkpoint.latest(root / f"moe_seed={seed}"))["step"] == 1
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert [(r["variant"], r["finished"], r["cells"]) for r in rows] == [("moe", "2", "2"), ("broken", "0", "2")]
    assert "broken_seed=1" in rows[1]["errors"]
    summary = json.loads((root / "summary.json").read_text())
    assert {c["cell"]: c["status"] for c in summary["cells"]} == {
        "moe_seed=1": "done", "moe_seed=2": "done", "broken_seed=1": "failed", "broken_seed=2": "failed"}
    losses = [c["metrics"]["eval_loss"] for c in summary["cells"] if c["metrics"]]
    mean, half = paired.mean_ci(losses)
    assert float(rows[0]["eval_loss"]) == pytest.approx(mean) and float(rows[0]["eval_loss_ci95"]) == pytest.approx(half)
    assert losses[0] != losses[1] and half > 0  # the seeds differ
    assert (root / "eval_loss.png").is_file() and any((root / "hparams").iterdir())
    assert "mean ± 95% CI over seeds" in res.output and f"{mean:.4f}±" in res.output  # the table (cells may fold)
    stamp = (checkpoint.latest(root / "moe_seed=1") / "meta.json").stat().st_mtime
    report = runner.invoke(app, ["sweep", str(path), "--report"])  # trains nothing, reports the same
    assert report.exit_code == 0, report.output
    assert "training" not in report.output and f"{mean:.4f}±" in report.output
    again = runner.invoke(app, ["sweep", str(path), "--jobs", "2"])
    assert "cell moe_seed=1: training" not in again.output and "cell broken_seed=1: training" in again.output
    assert (checkpoint.latest(root / "moe_seed=1") / "meta.json").stat().st_mtime == stamp  # finished cells skipped


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_stops_the_sweep_and_a_rerun_continues(tmp_path, signum):
    raw = tiny_config(tmp_path, train={"max_steps": 60, "eval_every": 1000}, checkpoint={"every": 5})
    path = sweep_file(tmp_path, raw, name="long", grid={"train.seed": [1]})
    cell = tmp_path / "runs" / "long" / "seed=1"
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "sweep", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while checkpoint.latest(cell) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signum)  # the cells run in sessions of their own: the sweep passes it on
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    stopped_at = checkpoint.read_meta(checkpoint.latest(cell))["step"]
    assert 5 <= stopped_at < 60 and "Traceback" not in output
    if signum == signal.SIGTERM:
        return  # what follows does not depend on the signal
    res = runner.invoke(app, ["sweep", str(path)])
    assert res.exit_code == 0, res.output
    assert checkpoint.read_meta(checkpoint.latest(cell))["step"] == 60
    assert "resuming" in (tmp_path / "runs" / "long" / "logs" / "seed=1.log").read_text()
    # A cell whose config changed since its run is refused, naming the change; a longer run is fine.
    with pytest.raises(ConfigError, match=r"cell seed=1: .* holds a run of another config \(optim.lr: 0.003 -> 1e-05\)"):
        sweeping.load(path, ["optim.lr=1e-5"])
    assert sweeping.load(path, ["train.max_steps=300"]).cells[0].cfg.train.max_steps == 300


def test_a_failed_cell_reports_its_last_attempts_error(tmp_path):
    sweep = sweeping.Sweep(tmp_path / "s.yaml", "s", tmp_path / "base.yaml", tmp_path, [], [])
    cell = sweeping.Cell("c", None, {}, {}, [], config.from_dict({}), tmp_path / "c")
    log = sweeping.log_path(sweep, cell)
    log.parent.mkdir(parents=True)
    log.write_text(f"{sweeping.ATTEMPT} 1\nerror: the first attempt's error\n{sweeping.ATTEMPT} 2\nstep 3/9\n")
    assert sweeping._error_line(sweep, cell, -9) == "killed by signal 9"  # not the first attempt's line
    log.write_text(log.read_text() + "error: out of memory\n")
    assert sweeping._error_line(sweep, cell, 2) == "error: out of memory"


def test_student_t_beyond_the_table():
    # Exact 97.5% quantiles: 2.1199 (16), 2.0423 (30), 2.0003 (60).
    assert [round(paired.t975(d), 3) for d in (15, 16, 30, 60)] == [2.131, 2.119, 2.042, 2.0]


def test_a_router_set_for_the_whole_sweep_gets_what_it_needs(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), set={"moe.router": "switch"}, grid={"train.seed": [1, 2]})
    res = runner.invoke(app, ["sweep", str(path), "--report"])  # nothing trains: the report of no cells
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert said.count("moe.router=switch brings moe.top_k=1") == 1 and "(2 cells;" in said  # once, not per cell


def test_what_a_router_brings_is_said_once_per_router_where_it_changes_something(tmp_path):
    grid = {"moe.router": ["topk", "switch", "gshard_top2"], "train.seed": [1, 2]}
    sweep = sweeping.load(sweep_file(tmp_path, tiny_config(tmp_path), grid=grid))  # tiny_config: topk, top_k 2
    lines = sweeping.router_fills(sweep)
    assert len(lines) == 2 and lines[0].startswith("moe.router=switch brings moe.top_k=1")
    assert lines[1].startswith("moe.router=gshard_top2 brings") and "moe.top_k=" not in lines[1]  # already 2
    assert not any("None" in line or "null" in line for line in lines)  # resolved values


def test_a_dry_run_lists_the_cells_and_writes_nothing(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), name="dry", set={"train.max_steps": 2},
                      grid={"moe.router": ["topk", "switch"], "train.seed": [1, 2]})
    before = sorted(tmp_path.rglob("*"))
    res = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    cells = res.stdout.splitlines()
    assert [line.split()[0] for line in cells] == ["router=topk_seed=1", "router=switch_seed=1",
                                                    "router=topk_seed=2", "router=switch_seed=2"]
    assert cells[0].endswith("moe.router=topk, train.seed=1")
    assert "moe.router=switch, train.seed=1; for its router: moe.top_k=1" in cells[1]
    said = " ".join(res.stderr.split())
    assert "4 cells" in said and "with train.max_steps=2" in said and "nothing trained or written" in said
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, no log, no report
    refused = runner.invoke(app, ["sweep", str(path), "--dry-run", "--report"])
    assert refused.exit_code == 2 and "choose one" in refused.output


def test_a_value_may_name_the_cells_other_keys(tmp_path):
    variants = [{"name": "tuned", "train.init_from": "{run.dir}/pre/moe_seed={train.seed}"}]
    raw = tiny_config(tmp_path)
    path = sweep_file(tmp_path, raw, grid={"train.seed": [1, 2]}, variants=variants,
                      set={"run.dir": raw["run"]["dir"]})
    with pytest.raises(ConfigError, match=r"names \{run.dir\}, which is not another key of the cell \(its keys: train.seed\)"):
        sweeping.load(path)  # `set:` keys are the sweep's, not the cell's
    variants = [{"name": "tuned", "train.init_from": "pre/moe_seed={train.seed}", "run.name": "x_{train.seed}"}]
    sweep = sweeping.load(sweep_file(tmp_path, raw, grid={"train.seed": [1, 2]}, variants=variants))
    assert [c.values["train.init_from"] for c in sweep.cells] == ["pre/moe_seed=1", "pre/moe_seed=2"]
    assert [c.cfg.train.init_from for c in sweep.cells] == ["pre/moe_seed=1", "pre/moe_seed=2"]


def test_every_shipped_experiment_validates(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "experiments").glob("*.yaml"))
    assert len(files) >= 6
    monkeypatch.chdir(root)  # sweep files name their base relative to the repository
    for path in files:
        if "base" not in yaml.safe_load(path.read_text()):
            config.load(path)  # a base config of the others (base.yaml)
        else:
            assert len(sweeping.load(path).cells) >= 6, path


def test_the_error_bar_chart_draws_groups_without_a_value():
    # A dense model has no MoE layer, so no max/mean load: its group is drawn without a point.
    from moectl.common import plots

    fig = plots.error_bars(["dense", "E8"], [float("nan"), 1.3], [float("nan"), 0.1], "max_over_mean (ratio)", "t")
    (points,) = fig.axes[0].containers  # the error bar of E8 alone
    assert list(points.lines[0].get_xdata()) == [1] and list(points.lines[0].get_ydata()) == [1.3]


def test_a_report_of_no_finished_cells_writes_nothing_and_says_so(tmp_path):
    path = sweep_file(tmp_path, tiny_config(tmp_path), name="empty", grid={"train.seed": [1, 2]})
    res = runner.invoke(app, ["sweep", str(path), "--report"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "no cell has finished yet: nothing written" in said and "wrote" not in said and ".png" not in said
    assert not (tmp_path / "runs" / "empty").exists()
