"""The benchmark script keeps working: a smoke run on tiny shapes (its numbers mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_expert_parallel_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), "--json", "--world", "2", "--ep", "1", "2",
         "--steps", "1", "--warmup", "1", "--batch-size", "4", "--variants", "overlap", "--set", "model.d_model=32", "model.n_heads=2",
         "moe.expert_hidden=32", "model.n_layers=2", "data.seq_len=16", "tokenizer.vocab_size=300"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    ddp, ep, overlap = (json.loads(line) for line in out.stdout.splitlines())
    assert [(r["world"], r["ep"], r["variant"]) for r in (ddp, ep, overlap)] == [(2, 1, "plain"), (2, 2, "plain"),
                                                                                 (2, 2, "overlap")]
    assert ep["predicted_ms"] > 0 and overlap["predicted_ms"] > 0
    assert ep["expert_mb"] == pytest.approx(ddp["expert_mb"] / 2, rel=0.02)  # each process holds half the experts
    assert ep["exchange_ms"] > 0 and ep["experts_ms"] > 0 and ddp["ratio_to_ddp"] == 1.0
    assert ep["tokens_per_sec"] > 0 and ep["global_tokens"] == 4 * 16
    assert ep["skew"] is None and ep["hot_share"] < 0.4
    # A planted hot expert: expert 0's selection bias of 10 puts it in every token's top-2, so it
    # takes half the assignments (1/K), and the shadowed layout runs on it.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), "--json", "--world", "2", "--ep", "2",
         "--steps", "1", "--warmup", "1", "--batch-size", "4", "--variants", "shadow1", "--skew", "10", "--set",
         "model.d_model=32", "model.n_heads=2", "moe.expert_hidden=32", "model.n_layers=2", "data.seq_len=16",
         "tokenizer.vocab_size=300"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    plain, shadow = (json.loads(line) for line in out.stdout.splitlines())
    assert (plain["variant"], shadow["variant"]) == ("plain", "shadow1") and plain["skew"] == 10
    assert plain["hot_share"] == pytest.approx(0.5) and shadow["hot_share"] == pytest.approx(0.5)
    assert plain["predicted_ms"] is None  # the plan models uniform routing only


def test_quality_benchmark_smoke(tmp_path):
    """Both budgets and both protocols on a written corpus with a tiny LSTM pair and 2 seeds."""
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus", 6)
    tiny = ["model.d_model=32", "moe.expert_hidden=32", "tokenizer.vocab_size=300", "data.seq_len=32",
            "train.batch_size=4", "train.eval_batches=1", "train.device=cpu", "log.tensorboard=false",
            "data.sample_by=document", f"data.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--pairs", "lstm", "--seeds", "1", "2", "--steps", "3",
         "--seconds", "0.5", "--corpus", str(corpus / "*.txt"), "--out", str(tmp_path / "runs"), "--json", "--set", *tiny],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["budget"], r["protocol"]) for r in rows] == [("steps", "block"), ("steps", "stateful"),
                                                            ("0.5 s", "block"), ("0.5 s", "stateful")]
    for r in rows:
        assert r["seeds"] == 2 and r["pair"] == "lstm"
        assert r["diff_bpb"] == pytest.approx(r["moe_bpb"] - r["dense_bpb"], abs=1e-9)
        assert r["moe_bpb"] > 0 and r["dense_bpb"] > 0 and r["moe_ci"] >= 0
    assert rows[0]["steps_moe"] == rows[0]["steps_dense"] == 3
    for label in ("moe", "dense"):  # the time budget buys steps of the batch as run (--set), not as in the YAML
        assert rows[2][f"steps_{label}"] == max(1, round(0.5 * rows[0][f"{label}_tokens_per_sec"] / (4 * 32)))
    assert rows[0]["eval_tokens"] == rows[1]["eval_tokens"] or abs(rows[0]["eval_tokens"] - rows[1]["eval_tokens"]) < 4 * 32


def test_each_quickstart_has_a_dense_twin_of_equal_active_ffn_compute():
    """benchmarks/quality.py compares these pairs: the dense config must be the MoE config with a
    dense FFN of hidden top_k * expert_hidden, and nothing else changed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import PAIRS

    from moectl import config

    for moe_file, dense_file in PAIRS.values():
        moe, dense = config.load(ROOT / moe_file), config.load(ROOT / dense_file)
        assert moe.model.is_moe and not dense.model.is_moe and moe.model.backbone == dense.model.backbone
        assert dense.model.ffn_hidden == moe.moe.top_k * moe.moe.expert_hidden
        changed = set(config.changed(moe, dense))
        assert changed <= {"model.arch", "model.ffn_hidden", "run.name"} | {k for k in changed if k.startswith("moe.")}, changed


def test_train_throughput_benchmark_smoke(tmp_path):
    """A tiny MoE / dense pair through `moectl train`, and one layer's time shares."""
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus", 6)
    tiny = ["model.d_model=32", "model.n_heads=2", "data.seq_len=16", "train.batch_size=4", "tokenizer.vocab_size=300",
            "data.source=files", f"data.data_files={corpus / '*.txt'}", "data.sample_by=document",
            f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--json", "--pairs", "transformer",
         "--steps", "3", "--rounds", "1", "--repeats", "2", "--warmup", "1", "--no-cache-run", "--set", *tiny],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    moe, dense, layer = (json.loads(line) for line in out.stdout.splitlines())
    assert [moe["model"], dense["model"]] == ["transformer_moe", "transformer_dense"]
    for row in (moe, dense):
        assert {"model", "tokens_per_sec", "peak_rss_mb", "ratio_to_dense"} <= set(row)
        assert row["tokens_per_sec"] > 0 and 100 < row["peak_rss_mb"] < 4000
    assert dense["ratio_to_dense"] == 1.0
    assert moe["ratio_to_dense"] == pytest.approx(moe["tokens_per_sec"] / dense["tokens_per_sec"], rel=1e-2)
    parts = layer["layer"]
    assert list(parts) == ["routing", "dispatch", "experts", "combine"]
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=0.01)
    # Each part is a difference of medians: at this tiny size, on a busy machine, the experts'
    # can come out as 0 (clamped), never negative.
    assert all(p["ms"] >= 0 and p["share"] >= 0 for p in parts.values())


def test_lora_benchmark_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora.py"), "--smoke", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["impl"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert list(rows) == ["full", "frozen", "moectl", "peft"]
    assert rows["full"]["ratio_to_full"] == 1.0 and rows["frozen"]["trainable"] == 0
    assert rows["moectl"]["trainable"] == rows["peft"]["trainable"] == 3 * 4 * 4 * (16 + 32)  # 3 matrices x E x r (D + H)
    assert rows["peft"]["max_diff"] < 1e-6  # PEFT on moectl's experts computes moectl's output and gradients
