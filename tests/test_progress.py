"""Progress on every wait: a rich bar in a terminal, otherwise plain lines on stderr (done / total,
elapsed, ETA) at a bounded rate and one at the end; stdout is left alone, so `--json` still parses.
The commands run here with their output captured, as in a log file: not a terminal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from moectl.cli import app
from moectl.common import console

runner = CliRunner()
ELAPSED = r"elapsed \d+(\.\d)?s"  # a short wait's elapsed time: 0.4s, 12s


def plain() -> Console:
    """A console writing where a log file would: not a terminal."""
    return Console(file=io.StringIO(), force_terminal=False, width=80)


def lines(out: Console) -> list[str]:
    return out.file.getvalue().splitlines()


# ---------------------------------------------------------------------------------- the helper


def test_a_short_wait_gets_one_plain_line_at_its_end():
    out = plain()
    with console.progress("evaluating", 3, "batches", console=out) as bar:
        for _ in range(3):
            bar.advance()
    assert len(lines(out)) == 1 and re.fullmatch(rf"evaluating: 3/3 batches \| {ELAPSED}", lines(out)[0])


def test_a_long_wait_gets_a_line_every_few_seconds_with_its_eta(monkeypatch):
    monkeypatch.setattr(console, "PLAIN_EVERY", 0.0)  # every advance is "a few seconds later"
    out = plain()
    with console.progress("routing", 4, "batches", console=out) as bar:
        bar.advance()
        bar.advance(2)
    got = lines(out)
    assert re.fullmatch(rf"routing: 1/4 batches \| {ELAPSED} \| eta \d+(\.\d)?s", got[0])
    assert re.fullmatch(rf"routing: 3/4 batches \| {ELAPSED} \| eta \d+(\.\d)?s", got[1])
    assert re.fullmatch(rf"routing: 3/4 batches \| {ELAPSED}", got[2]) and len(got) == 3  # the end: no ETA


def test_an_unknown_total_says_done_and_a_failed_wait_says_nothing():
    out = plain()
    with console.progress("checking the export's logits in transformers", None, console=out):
        pass
    assert re.fullmatch(rf"checking the export's logits in transformers: done \| {ELAPSED}", lines(out)[0])
    out = plain()
    with pytest.raises(ValueError), console.progress("evaluating", 3, "batches", console=out) as bar:
        bar.advance()
        raise ValueError("the work failed")
    assert lines(out) == []  # the error says what happened


def test_the_eta_leaves_out_work_done_before_and_durations_read_well(monkeypatch):
    assert console.eta(elapsed=60.0, done=2, left=8) == 240.0  # 30 s per unit done
    assert console.eta(60.0, 0, 8) is None and console.eta(60.0, 2, None) is None
    assert [console.duration(s) for s in (0.42, 12.4, 65, 710, 7380)] == ["0.4s", "12s", "1m05s", "11m50s", "2h03m"]
    now = [1000.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    out = plain()
    with console.progress("sweep s", 10, "cells", completed=8, console=out) as bar:  # 8 finished before
        now[0] += 60
        bar.advance()  # one cell in a minute, one to go: a minute left (not 60 s / 9 cells)
    assert lines(out) == ["sweep s: 9/10 cells | elapsed 1m00s | eta 1m00s", "sweep s: 9/10 cells | elapsed 1m00s"]


def test_a_terminal_gets_a_rich_bar_and_a_second_bar_inside_it_stays_quiet():
    out = Console(file=io.StringIO(), force_terminal=True, width=120)
    with console.progress("evaluating", 3, "batches", console=out) as bar:
        with console.progress("tokenising validation", 5, "documents", console=out) as inner:
            inner.advance(5)  # rich shows one live display at a time: this one is silent
        bar.advance(3)
    text = out.file.getvalue()
    assert "evaluating" in text and "3/3 batches" in text
    assert "tokenising" not in text and " | elapsed" not in text


def test_the_plain_training_line_gains_elapsed_time_and_eta():
    out = plain()
    with console.TrainProgress(600, 0, console=out) as bar:
        bar.update(50, 4.1, 3e-3, 7320.0, 1.2)
        bar.window_line(50)
    (line,) = lines(out)  # one line, however long
    assert re.fullmatch(r"step 50/600 \| loss 4\.1000 \| lr 3\.00e-03 \| 7\.32k tok/s \| imbalance 1\.20 "
                        rf"\| {ELAPSED} \| eta \d+(\.\d)?s", line)


# ---------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, trained by `moectl train` with a cache of its own (so it trains its tokenizer
    and tokenises both splits); the result of the command, and the run directory."""
    tmp = tmp_path_factory.mktemp("progress")
    raw = tiny_config(tmp, train={"max_steps": 4, "eval_every": 4}, model={"n_heads": 4},
                      data={"cache_dir": str(tmp / "cache")})
    res = runner.invoke(app, ["train", str(write_config(tmp / "tiny.yaml", raw))])
    assert res.exit_code == 0, res.output
    return res, tmp / "runs" / "tiny"


def test_training_reports_the_tokenizer_the_tokenising_and_its_time(trained):
    res, _ = trained
    err = res.stderr
    assert re.search(rf"^training the tokenizer: (\d+)/\1 documents read \| {ELAPSED}$", err, re.M), err
    for split in ("training", "validation"):
        assert re.search(rf"^tokenising {split}: (\d+)/\1 documents \| {ELAPSED}$", err, re.M), err
    assert re.search(r"^step 4/4 \| loss .* tok/s \| imbalance \S+ \| elapsed \S+ \| eta \S+$", err, re.M), err
    assert "documents" not in res.stdout and "elapsed" not in res.stdout


def test_eval_reports_its_batches_and_json_stays_clean(trained):
    _, run_dir = trained
    res = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["batches"] == 2
    assert re.search(rf"^evaluating: 2/2 batches \| {ELAPSED}$", res.stderr, re.M), res.stderr
    res = runner.invoke(app, ["eval", str(run_dir), "--stride", "16", "--json"])
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)
    assert re.search(rf"^evaluating: (\d+)/\1 windows \| {ELAPSED}$", res.stderr, re.M), res.stderr


def test_route_stats_and_plan_report_the_routing_pass(trained):
    _, run_dir = trained
    for args in (["route-stats", str(run_dir), "--json"],
                 ["plan", str(run_dir), "--hardware", "cpu", "--max-batches", "2", "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        json.loads(res.stdout)
        assert re.search(rf"^routing: 2/2 batches \| {ELAPSED}$", res.stderr, re.M), (args, res.stderr)


def test_export_reports_its_evaluation_and_its_logit_check(trained, tmp_path):
    _, run_dir = trained
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^evaluating: 2/2 batches \| {ELAPSED}$", res.stderr, re.M), res.stderr
    pytest.importorskip("transformers")
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^checking the export's logits in transformers: done \| {ELAPSED}$", res.stderr, re.M)


def test_a_sweep_counts_its_cells_with_an_overall_eta(tmp_path, monkeypatch, capsys):
    from moectl.commands import sweep as sweeping

    base = write_config(tmp_path / "base.yaml", tiny_config(tmp_path))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "grid": {"train.seed": [1, 2, 3]}}))
    sweep = sweeping.load(path)
    # Each cell a process that does nothing: the runner's counting, not training, is under test.
    monkeypatch.setattr(sweeping, "_start", lambda *args: subprocess.Popen([sys.executable, "-c", "pass"]))
    monkeypatch.setattr(console, "PLAIN_EVERY", 0.0)
    assert sweeping.run(sweep)
    err = capsys.readouterr().err
    assert re.search(rf"^sweep s: 1/3 cells \| {ELAPSED} \| eta \d+(\.\d)?s$", err, re.M), err
    assert re.search(rf"^sweep s: 3/3 cells \| {ELAPSED}$", err, re.M), err
