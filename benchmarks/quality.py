"""Model quality: each MoE quickstart against its dense twin (the same active FFN compute per
token), over seeds, at equal steps and at equal CPU time, in held-out bits per byte.

For each pair of configs (default: configs/quickstart.yaml with configs/quickstart_dense.yaml,
and configs/lstm_moe_quickstart.yaml with configs/lstm_dense_quickstart.yaml) it trains every
config with every seed through `moectl sweep` (the cells land in OUT/<pair>_<budget>_<model>/),
then scores the whole validation split of each run with two evaluation protocols:
  block:   every block of seq_len tokens from a fresh start (what training reports);
  context: the Transformer in sliding windows (stride seq_len / 2: each token sees at least
           half a block of context); the LSTM with its state carried across consecutive blocks.
Budgets:
  steps:   the configs' own train.max_steps (or --steps);
  time:    --seconds of training each, the steps it buys computed from the tokens/s that model
           reached in its step-budget runs (the median over seeds), so both get the same CPU time.
The report gives each group's mean and 95% Student-t interval over the seeds, and the MoE - dense
difference, paired by seed (its interval, too: a difference whose interval excludes 0 is real at
these seeds).

    python benchmarks/quality.py                          # built-in corpus, 3 seeds, both budgets
    python benchmarks/quality.py --corpus 'texts/*.txt'   # your corpus (local files)
    python benchmarks/quality.py --seconds 0 --json       # equal steps only, JSON lines

JSON keys (one object per pair, budget and protocol): pair, budget, steps_moe, steps_dense,
protocol, moe_bpb, moe_ci, dense_bpb, dense_ci, diff_bpb, diff_ci, moe_loss, dense_loss,
moe_tokens_per_sec, dense_tokens_per_sec, seeds, eval_tokens.
Runs already finished in OUT are reused (delete OUT to start again); OUT/quality.json keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {
    "transformer": ("configs/quickstart.yaml", "configs/quickstart_dense.yaml"),
    "lstm": ("configs/lstm_moe_quickstart.yaml", "configs/lstm_dense_quickstart.yaml"),
}


def sweep_cells(name: str, base: Path, seeds: list[int], sets: dict, out: Path, jobs: int):
    """Train `base` once per seed with `sets` through moectl's sweep runner; its finished cells."""
    from moectl.commands import sweep

    out.mkdir(parents=True, exist_ok=True)
    spec = {"base": str(base.resolve()), "name": name, "set": {"run.dir": str(out), **sets}, "grid": {"train.seed": seeds}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    plan = sweep.load(path)
    if not sweep.run(plan, jobs):
        raise SystemExit(f"quality: some runs of {name} failed; see {out / name / 'logs'}")
    return plan.cells


def score(run_dir: Path, context: bool) -> dict:
    """Whole-split validation loss and bits per byte of a run, block or with context."""
    from moectl.commands import evaluate
    from moectl.services import loaded_model

    loaded = loaded_model.load(run_dir)
    cfg = loaded.cfg
    if not context:
        protocol = dict(stride=None, stateful=False)
    elif cfg.model.backbone == "lstm":
        protocol = dict(stride=None, stateful=True)
    else:
        protocol = dict(stride=cfg.data.seq_len // 2, stateful=False)
    result = evaluate.run(loaded, "validation", max_batches=10**9, **protocol)  # every block of the split
    return {"loss": result.loss, "bpb": result.bits_per_byte, "tokens": result.tokens, "context": result.context}


def tokens_per_sec(run_dir: Path) -> float:
    from moectl.services import checkpoint

    return float(checkpoint.read_meta(checkpoint.latest(run_dir)).get("tokens_per_sec") or 0.0)


def run_pair(pair: str, files: tuple[str, str], args, out: Path) -> list[dict]:
    from moectl.common.paired import mean_ci

    moe_file, dense_file = (ROOT / f for f in files)
    common = dict(args.extra)
    if args.corpus:
        common.update({"data.source": "files", "data.data_files": args.corpus})
    budgets = [("steps", {} if args.steps is None else {"train.max_steps": args.steps})]
    cells = {}
    for label, file in (("moe", moe_file), ("dense", dense_file)):
        cells[("steps", label)] = sweep_cells(f"{pair}_steps_{label}", file, args.seeds, {**common, **budgets[0][1]}, out,
                                              args.jobs)
    if args.seconds:
        for label, file in (("moe", moe_file), ("dense", dense_file)):
            speed = statistics.median(tokens_per_sec(c.run_dir) for c in cells[("steps", label)])
            resolved = cells[("steps", label)][0].cfg  # the config as run: the YAML with every --set applied
            per_step = resolved.train.batch_size * resolved.data.seq_len
            steps = max(1, round(args.seconds * speed / per_step))
            cells[("time", label)] = sweep_cells(f"{pair}_time_{label}", file, args.seeds,
                                                 {**common, "train.max_steps": steps}, out, args.jobs)
        budgets.append(("time", {}))
    rows = []
    for budget, _ in budgets:
        for context in (False, True):
            scored = {label: [score(c.run_dir, context) for c in cells[(budget, label)]] for label in ("moe", "dense")}
            moe, dense = ([s["bpb"] for s in scored[label]] for label in ("moe", "dense"))
            (m, m_ci), (d, d_ci), (diff, diff_ci) = mean_ci(moe), mean_ci(dense), mean_ci([a - b for a, b in zip(moe, dense)])
            steps = {label: _max_steps(cells[(budget, label)][0].run_dir) for label in ("moe", "dense")}
            rows.append({
                "pair": pair, "budget": "steps" if budget == "steps" else f"{args.seconds:g} s",
                "steps_moe": steps["moe"], "steps_dense": steps["dense"],
                "protocol": "block" if not context else scored["moe"][0]["context"],
                "moe_bpb": m, "moe_ci": m_ci, "dense_bpb": d, "dense_ci": d_ci, "diff_bpb": diff, "diff_ci": diff_ci,
                "moe_loss": statistics.mean(s["loss"] for s in scored["moe"]),
                "dense_loss": statistics.mean(s["loss"] for s in scored["dense"]),
                "moe_tokens_per_sec": statistics.median(tokens_per_sec(c.run_dir) for c in cells[(budget, "moe")]),
                "dense_tokens_per_sec": statistics.median(tokens_per_sec(c.run_dir) for c in cells[(budget, "dense")]),
                "seeds": len(moe), "eval_tokens": scored["moe"][0]["tokens"],
            })
    return rows


def _max_steps(run_dir: Path) -> int:
    from moectl.services import checkpoint

    return int(checkpoint.read_meta(checkpoint.latest(run_dir))["step"])


def show(rows: list[dict]) -> None:
    head = ("pair", "budget", "steps moe/dense", "eval", "MoE bits/byte", "dense bits/byte", "MoE - dense", "tok/s moe/dense")
    table = [head]
    for r in rows:
        table.append((
            r["pair"], r["budget"], f"{r['steps_moe']}/{r['steps_dense']}", r["protocol"],
            f"{r['moe_bpb']:.4f} ± {r['moe_ci']:.4f}", f"{r['dense_bpb']:.4f} ± {r['dense_ci']:.4f}",
            f"{r['diff_bpb']:+.4f} ± {r['diff_ci']:.4f}",
            f"{r['moe_tokens_per_sec'] / 1e3:.1f}k/{r['dense_tokens_per_sec'] / 1e3:.1f}k",
        ))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"{rows[0]['seeds']} seeds; ± is the 95% Student-t interval; the difference is paired by seed", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--corpus", help="local text files (a path or glob) instead of the built-in corpus")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, help="steps of the equal-steps budget (default: each config's max_steps)")
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds of the equal-time budget (0: skip it)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time, each with its share of the cores")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality", help="where the runs go")
    p.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (e.g. for a quick check)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.sets)}
    rows = []
    for pair in args.pairs:
        rows += run_pair(pair, PAIRS[pair], args, args.out)
    (args.out / "quality.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        show(rows)


if __name__ == "__main__":
    main()
