"""docs/claims.md and docs/quality.md quote their results tables from the committed sweep records
(experiments/results/*.json) through experiments/render_claims.py: the docs and the records agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_claims", ROOT / "experiments" / "render_claims.py")
render_claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_claims)


def test_every_results_table_in_the_docs_matches_its_record():
    assert render_claims.main(["--check"]) == 0, "run python experiments/render_claims.py"


def test_every_record_is_quoted_and_every_quote_has_its_record():
    quoted = {m.group(2) for doc in render_claims.DOCS for m in render_claims.BLOCK.finditer(doc.read_text())}
    records = {str(p.relative_to(ROOT)) for p in (ROOT / "experiments" / "results").glob("*.json")}
    assert quoted <= records  # a block naming a missing record would not render at all
    assert records == quoted, f"records no doc quotes: {sorted(records - quoted)}"


def _record(tmp_path: Path) -> str:
    cells = [{"cell": f"{v}_seed={s}", "variant": v, "values": {"train.seed": s}, "seed": s, "config_hash": "0" * 16,
              "status": "done", "trained_by": {"version": "0.1.0", "commit": "abcdef0123", "modified": False},
              "metrics": {"eval_loss": loss, "maxvio": vio}}
             for v, s, loss, vio in (("moe", 1, 3.0, 0.5), ("moe", 2, 2.9, 0.25), ("dense", 1, 3.1, None),
                                     ("dense", 2, 3.05, None))]
    record = {
        "sweep": "pair.yaml", "name": "pair", "source": {"version": "0.1.0", "commit": "fedcba9876", "modified": True},
        "machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0+cpu"}, "cells": cells,
        "groups": [{"group": {"variant": "moe"}, "eval_loss": 2.95, "eval_loss_ci95": 0.6353, "maxvio": 0.375,
                    "maxvio_ci95": 1.5883},
                   {"group": {"variant": "dense"}, "eval_loss": 3.075, "eval_loss_ci95": 0.3177, "maxvio": None,
                    "maxvio_ci95": None}],
        "compare": {"baseline": {"variant": "dense"}, "rules": {"eval_loss": {"better": "lower", "margin": 0.02}},
                    "comparisons": [{"group": {"variant": "moe"}, "baseline": {"variant": "dense"}, "differences": {
                        "eval_loss": {"mean": -0.125, "ci95": 0.3177, "n": 2, "diffs": {"2": -0.15, "1": -0.1},
                                      "verdict": "inconclusive"}},
                        "equal_time": {"n": 0}, "speedup": {"per_seed": {"1": 2.0, "2": None}, "not_reached": 1,
                                                            "mean": 2.0, "ci95": None}}]},
    }
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_a_block_shows_every_cell_each_arms_interval_and_the_declared_verdict(tmp_path):
    text = render_claims.render(_record(tmp_path), " metrics=eval_loss,maxvio")
    lines = text.splitlines()
    assert "trained by moectl abcdef0, on Some CPU (2 cores)" in lines[0]
    assert "| moe | 1 | 3.0000 | 0.500 |" in lines and "| moe | 2 | 2.9000 | 0.250 |" in lines
    assert "| dense | 2 | 3.0500 | - |" in lines  # a dense model has no load: no value, not 0
    assert "| **moe** | **mean** | 2.9500 ± 0.6353 | 0.375 ± 1.588 |" in lines
    # Paired rows in seed order, with the rule as declared and its verdict.
    assert ("| moe | eval loss | lower is better, ±0.02 equivalent | -0.1000, -0.1500 | -0.1250 ± 0.3177 | "
            "**inconclusive** |") in lines
    assert "| 2.00, not reached | 2.00 | - |" in lines[-1]
    record = json.loads(Path(_record(tmp_path)).read_text())
    record["compare"]["comparisons"][0]["equal_time"] = {"n": 2, "mean": 0.1, "ci95": 0.5, "diffs": {"1": 0.2, "2": 0.0},
                                                         "verdict": "inconclusive"}
    (tmp_path / "timed.json").write_text(json.dumps(record))
    timed = render_claims.render(str(tmp_path / "timed.json"), " metrics=eval_loss")
    untimed = render_claims.render(str(tmp_path / "timed.json"), " metrics=eval_loss timing=off")
    assert "| moe | eval loss at equal training time |" in timed and "equal training time" not in untimed


def test_a_pivot_shows_each_arms_choice(tmp_path):
    cells = [{"variant": v, "values": {"optim.lr": lr, "train.seed": 1}, "seed": 1, "metrics": {"eval_loss": loss}}
             for v, lr, loss in (("dense", 0.003, 3.34), ("dense", 0.005, 3.31), ("moe", 0.003, 3.30),
                                 ("moe", 0.005, 3.33))]
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"sweep": "tune.yaml", "source": {"commit": "0123456789", "modified": False},
                                "machine": {"cpu": "c", "cores": 2, "torch": "t"}, "cells": cells, "groups": []}))
    lines = render_claims.render(str(path), " metrics=eval_loss pivot=optim.lr").splitlines()
    assert lines[2:] == ["| arm | lr 0.003 | lr 0.005 | chosen |", "|---|---|---|---|",
                         "| dense | 3.3400 | **3.3100** | 0.005 |", "| moe | **3.3000** | 3.3300 | 0.003 |"]


def test_check_mode_finds_a_stale_table(tmp_path, monkeypatch):
    doc = tmp_path / "claims.md"
    record = _record(tmp_path)
    doc.write_text(f"# Claims\n\n<!-- results: {record} metrics=eval_loss -->\nold table\n<!-- /results -->\n\nprose\n")
    monkeypatch.setattr(render_claims, "DOCS", (doc,))
    assert render_claims.main(["--check"]) == 1 and "old table" in doc.read_text()  # --check writes nothing
    assert render_claims.main([]) == 0
    text = doc.read_text()
    assert "old table" not in text and text.endswith("<!-- /results -->\n\nprose\n") and "| moe | 1 | 3.0000 |" in text
    assert render_claims.main(["--check"]) == 0
