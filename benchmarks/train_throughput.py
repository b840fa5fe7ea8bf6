"""End-to-end training throughput: each quickstart MoE against its dense twin of equal active
parameters, and where one MoE layer's time goes.

Part 1. Each model trains with `moectl train` (the real loop: data, forward, backward, clipping,
AdamW, logging) for --steps steps in a process of its own, the models interleaved round by
round (--rounds), so a slow spell of a shared machine hits them all alike. A run's tokens/s is
what the loop measured over its training steps (the checkpoint's meta.json `tokens_per_sec`:
evaluation and start-up excluded); the table shows the median over rounds and the ratio to the
dense twin's median. Peak RSS is the training process's high-water mark (os.wait4), start-up,
data and a checkpoint included.

Part 2. One MoE layer of the quickstart's shape (tokens of one batch, 16 x 128; D 128; 16
experts of 128, top-4), forward + backward, timed by differences: the router alone (fixed
gradients into its combine weights), plus the dispatch plan and the gather (fixed gradients
into the gathered rows), plus the experts (into their outputs), plus the combine (into the
layer's output). Each share is the median of --repeats timings of its prefix minus the one
before.

    python benchmarks/train_throughput.py                  # the table (about 10 minutes here)
    python benchmarks/train_throughput.py --json           # one JSON object per line
    python benchmarks/train_throughput.py --pairs transformer --steps 30 --rounds 3

JSON keys: part 1: model, config, steps, rounds, tokens_per_sec, ratio_to_dense, peak_rss_mb,
runs_tokens_per_sec; part 2: layer (routing, dispatch, experts, combine as ms and share),
N, D, E, K, H, threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {
    "transformer": (("moe", "configs/quickstart.yaml"), ("dense", "configs/quickstart_dense.yaml")),
    "lstm": (("moe", "configs/lstm_moe_quickstart.yaml"), ("dense", "configs/lstm_dense_quickstart.yaml")),
}


def train_once(config: str, steps: int, out: Path, sets: list[str]) -> dict:
    """One `moectl train` run in its own process: (tokens/s of its training steps, peak RSS MB)."""
    name = Path(config).stem
    overrides = [f"run.dir={out}", f"train.max_steps={steps}", f"train.eval_every={10 * steps}", "train.eval_batches=1",
                 f"checkpoint.every={10 * steps}", "log.tensorboard=false", f"log.every={steps}", "optim.warmup_steps=1",
                 *sets]
    args = [sys.executable, "-m", "moectl", "train", str(ROOT / config), "--run-name", name, "--overwrite",
            *(a for kv in overrides for a in ("--set", kv))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"moectl train {config} failed ({proc.returncode}):\n{output[-2000:]}")
    ckpt = sorted((out / name / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    return {"tokens_per_sec": meta["tokens_per_sec"], "peak_rss_mb": usage.ru_maxrss / 1024}


def throughput(args: argparse.Namespace) -> list[dict]:
    models = [(pair, kind, config) for pair in args.pairs for kind, config in PAIRS[pair]]
    runs: dict = {m: [] for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_cache_run:  # data and tokenizer into the cache first, so no round pays for them
            for _, _, config in models:
                train_once(config, 1, Path(tmp), args.set)
        for _ in range(args.rounds):
            for m in models:
                runs[m].append(train_once(m[2], args.steps, Path(tmp), args.set))
    rows = []
    for pair, kind, config in models:
        tps = [r["tokens_per_sec"] for r in runs[(pair, kind, config)]]
        rows.append({"model": f"{pair}_{kind}", "config": config, "steps": args.steps, "rounds": args.rounds,
                     "tokens_per_sec": round(statistics.median(tps), 1),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[(pair, kind, config)]), 1),
                     "runs_tokens_per_sec": [round(t, 1) for t in tps]})
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"].rsplit("_", 1)[0] + "_dense")
        row["ratio_to_dense"] = round(row["tokens_per_sec"] / dense["tokens_per_sec"], 3)
    return rows


def layer_shares(args: argparse.Namespace) -> dict:
    """Where one quickstart MoE layer's forward + backward time goes, by differences of prefixes."""
    import torch

    sys.path.insert(0, str(ROOT))
    from moectl.moe import MoELayer, dispatch
    from moectl.common.runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d, e, k, h = 16 * 128, 128, 16, 4, 128
    layer = MoELayer(d, e, k, h, "swiglu")
    x = torch.randn(n, d, requires_grad=True)
    g_rows, g_out, g_w = torch.randn(n * k, d), torch.randn(n, d), torch.randn(n, k)  # fixed upstream gradients
    positions = torch.arange(n)

    def prefix(stage: int) -> None:
        """Forward and backward of the layer's first `stage` + 1 parts, with fixed gradients
        flowing into each part's outputs (dropless top-k: always N x K rows), so that no timed
        step holds work of the others'."""
        record = layer.router(x)
        outputs, grads = [record.weights], [g_w]
        if stage >= 1:
            plan, record = dispatch.plan(record, None, positions)
            rows = dispatch.gather(x, plan)
            outputs, grads = [rows, record.weights], [g_rows, g_w]
            if stage >= 2:
                y = layer.experts(rows, plan.tokens_per_expert)
                outputs[0] = y
                if stage == 3:
                    outputs, grads = [dispatch.combine(y, plan, record)], [g_out]
        torch.autograd.backward(outputs, grads)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    medians = []
    for stage in range(4):
        for _ in range(args.warmup):
            prefix(stage)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            prefix(stage)
            times.append((time.perf_counter() - started) * 1e3)
        medians.append(statistics.median(times))
    parts = dict(zip(("routing", "dispatch", "experts", "combine"),
                     [medians[0]] + [max(b - a, 0.0) for a, b in zip(medians, medians[1:])]))
    total = sum(parts.values())
    return {"layer": {name: {"ms": round(ms, 3), "share": round(ms / total, 3)} for name, ms in parts.items()},
            "N": n, "D": d, "E": e, "K": k, "H": h, "threads": args.threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="*", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every model")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every model")
    parser.add_argument("--no-cache-run", action="store_true",
                        help="skip the one-step run per model that fills the data cache before the timed rounds")
    parser.add_argument("--repeats", type=int, default=30, help="timings of each layer prefix")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for the layer timings")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of tables")
    args = parser.parse_args()
    rows = throughput(args) if args.pairs else []
    shares = layer_shares(args)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps(shares))
        return 0
    if rows:
        print(f"moectl train, {args.steps} steps x {args.rounds} interleaved rounds; median tokens/s of the training steps")
        print(f"{'model':<18}{'tokens/s':>10}{'x dense':>9}{'peak RSS MB':>13}  runs")
        for r in rows:
            print(f"{r['model']:<18}{r['tokens_per_sec']:>10.0f}{r['ratio_to_dense']:>9.2f}{r['peak_rss_mb']:>13.0f}  "
                  f"{', '.join(f'{t:.0f}' for t in r['runs_tokens_per_sec'])}")
        print()
    layer = shares["layer"]
    print(f"one MoE layer, forward + backward (N {shares['N']}, D {shares['D']}, E {shares['E']}, K {shares['K']}, "
          f"H {shares['H']}, {shares['threads']} threads), median of {args.repeats}:")
    for name, part in layer.items():
        print(f"  {name:<9}{part['ms']:>8.2f} ms  {part['share']:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
