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
    for start, end in (frontier.MARKERS, frontier.OFFLOAD_MARKERS):
        assert len(re.findall(re.escape(start) + ".*?" + re.escape(end), frontier.DOC.read_text(), re.S)) == 1


def test_the_doc_quotes_the_committed_record_when_there_is_one():
    if not frontier.OUT.is_file():
        pytest.skip("the frontier has not been measured yet")
    record = json.loads(frontier.OUT.read_text())
    record["seeds"] = {int(k): v for k, v in record["seeds"].items()}
    assert frontier.table(record) in frontier.DOC.read_text(), "run python experiments/frontier.py --report-only"
    if "cache" in record:
        assert frontier.cache_table(record) in frontier.DOC.read_text(), "run python experiments/frontier.py --report-only"


def _cache_record() -> dict:
    cache = {}
    for s in ("1", "2", "3"):
        cache[s] = {}
        for cell, capacities in frontier.SMALL_CACHES.items():
            cache[s][cell] = {str(k): {
                "loss": 4.0, "resident_loss": 4.0, "hit_rate": k / 8, "prefetch_recall": 0.5 + 0.1 * int(s),
                "bytes_per_token": 2048.0, "random_hit_rate": k / 8, "static_hit_rate": k / 8,
                "decode": {p: {"hit_rate": 0.5 + 0.01 * i + 0.1 * int(s), "static_hit_rate": 0.6, "loads_per_token": 1.5}
                           for i, p in enumerate(("lru", "lfu", "lfru"))}} for k in capacities}
    return {**_record(), "cache": cache, "cache_source": "def5678"}


def test_the_small_cache_table_averages_layers_then_seeds():
    table = frontier.cache_table(_cache_record())
    rows = [line for line in table.splitlines() if line.startswith("| E8")]
    assert len(rows) == sum(len(c) for c in frontier.SMALL_CACHES.values())
    first = rows[0].split(" | ")
    # E8 top1 at K = 1: exact, K/E = 12.5%, recall mean of 0.6, 0.7, 0.8 with its t-interval
    assert first[:5] == ["| E8 top1", "1", "0 (every seed)", "12.5 ± 0.0%", f"70.0 ± {100 * mean_ci([0.6, 0.7, 0.8])[1]:.1f}%"]
    assert first[5] == "2.0" and first[6].startswith("70.0 ± ") and first[7].startswith("71.0 ± ") and first[-1] == "1.50 ± 0.00 |"
    record = _cache_record()
    record["cache"]["2"]["E8_top1"]["1"]["loss"] = 4.001  # an offloaded loss that moved is shown, not hidden
    assert "| E8 top1 | 1 | 0.001 |" in frontier.cache_table(record)
