"""The benchmark script keeps working: a smoke run on tiny shapes (its numbers mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--smoke", "--json", "--impls", "moectl", "dense", "loop"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["impl"] for r in rows] == ["moectl", "dense", "loop"]
    for r in rows:
        assert {"impl", "E", "K", "N", "D", "H", "ms_median", "peak_mb", "device", "threads"} <= r.keys()
        assert r["ms_median"] > 0 and r["device"] == "cpu" and r["runs"] >= 2
    assert next(r for r in rows if r["impl"] == "dense")["ratio_to_dense"] == 1.0
