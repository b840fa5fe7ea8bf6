"""experiments/frontier.py's report: each setting against the unmodified run, paired by seed, with
the bytes as stored; docs/memory.md quotes the table the record gives."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from moectl.common.paired import mean_ci

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("frontier", ROOT / "experiments" / "frontier.py")
frontier = importlib.util.module_from_spec(spec)
spec.loader.exec_module(frontier)


def _record() -> dict:
    seeds = {}
    for s, base in ((1, 4.00), (2, 4.10), (3, 4.05)):
        seeds[s] = {
            "unmodified": {"loss": base, "bits_per_byte": base / 2, "experts_bytes": 1000, "rest_bytes": 500,
                           "generate": {"tokens_per_sec": 100.0 + s, "peak_rss_bytes": 2**30}},
            "prune 50% reap": {"loss": base + 0.01 * s, "bits_per_byte": base / 2 + 0.005 * s, "experts_bytes": 500,
                               "rest_bytes": 500},
        }
    return {"machine": "test CPU (2 cores)", "source": "abc1234", "seeds": seeds}


def test_each_setting_is_paired_by_seed_against_the_unmodified_run():
    rows = {r["setting"]: r for r in frontier.summarise(_record())}
    pruned = rows["prune 50% reap"]
    assert pruned["per_seed_d_loss"] == pytest.approx([0.01, 0.02, 0.03])
    assert pruned["d_loss"] == pytest.approx(mean_ci([0.01, 0.02, 0.03]))
    assert pruned["d_bpb"] == pytest.approx(mean_ci([0.005, 0.010, 0.015]))
    assert pruned["experts_bytes"] == 500 and "tokens_per_sec" not in pruned
    assert rows["unmodified"]["d_loss"] == (0.0, 0.0)
    assert rows["unmodified"]["tokens_per_sec"] == pytest.approx(mean_ci([101.0, 102.0, 103.0]))
    table = frontier.table(_record())
    assert "| prune 50% reap | 0.00 | 0.00 | 4.0700 ± " in table and "+0.0200 ± 0.0248" in table


def test_the_figure_is_drawn_and_the_doc_has_its_block(tmp_path):
    frontier.figure(_record(), tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    start, end = frontier.MARKERS
    assert len(re.findall(re.escape(start) + ".*?" + re.escape(end), frontier.DOC.read_text(), re.S)) == 1


def test_the_doc_quotes_the_committed_record_when_there_is_one():
    if not frontier.OUT.is_file():
        pytest.skip("the frontier has not been measured yet")
    record = json.loads(frontier.OUT.read_text())
    record["seeds"] = {int(k): v for k, v in record["seeds"].items()}
    assert frontier.table(record) in frontier.DOC.read_text(), "run python experiments/frontier.py --report-only"
