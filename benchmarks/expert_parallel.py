"""Expert parallelism: what each process holds and how fast the job trains, for each layout.

For every (processes W, expert-parallel size N) it starts W processes (gloo on CPU, NCCL with
--device cuda), builds a Transformer-MoE from a moectl config, shards its experts over groups of
N (`moectl.services.expert_parallel`; N = 1 is plain DDP), and trains it for --steps steps on random
tokens at the same global batch in every layout. Each process reports:

  expert_mb      the expert parameters it holds (must fall as 1/N)
  peak_mb        CPU: peak RSS while training (the high-water mark is reset after setup, so it
                 is training's own peak; it includes the ~0.3 GB of the PyTorch runtime);
                 CUDA: torch.cuda.max_memory_allocated while training
  exchange_ms    per step, the all-to-alls of every MoE layer (counts, tokens out and back,
                 forward and backward), waits for slower ranks included (N > 1 only)
  experts_ms     per step, the local experts' forward and backward (N > 1 only)
                 (neither is measured for the overlapped exchange, whose parts run together)
The table shows the worst rank's memory and the median step over ranks and steps, and tokens/s
of the whole job with its ratio to plain DDP (N = 1) of the same W.

    python benchmarks/expert_parallel.py                   # W in (2, 4), N in (1, 2, 4)
    python benchmarks/expert_parallel.py --json            # one JSON object per layout
    python benchmarks/expert_parallel.py --device cuda --world 8 --ep 1 2 4 8   # on a GPU node
    python benchmarks/expert_parallel.py --world 2 --ep 2 --skew 4 --repeats 5  # a planted hot expert

`--skew B` plants a hot expert: the sigmoid router with its selection bias on expert 0 set to B
(and frozen), so expert 0 takes a share of the assignments that grows with B (`hot_share`, the
busiest expert's share of each MoE layer's assignments, mean over layers and steps; 1/E is
uniform, 1/K the most top-K routing allows). FasterMoE's shadowing is meant for exactly this.

It also prints `moectl plan`'s prediction of each layout's step (moectl/commands/plan.py with the `cpu`
preset of moectl/common/perf_model.py), whether it ranks the layouts as measured, and the factor
between measured and predicted times.

JSON keys: world, ep, skew, hot_share, variant (plain, overlap: train.ep_overlap, shadow1: train.shadow_experts=1), device, threads, steps, global_tokens, expert_mb, params_mb, peak_mb,
step_ms, exchange_ms, experts_ms, tokens_per_sec, ratio_to_ddp, predicted_ms, runs_step_ms (each
run's step_ms with --repeats; the row is the median run).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ["model.d_model=256", "model.n_heads=4", "moe.num_experts=16", "moe.top_k=2", "moe.expert_hidden=1024",
               "data.seq_len=128", "tokenizer.vocab_size=4096"]


def rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_rss_peak() -> None:
    """Free what setup left and start the high-water mark again (Linux: clear_refs 5)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(rank: int, world: int, ep_size: int, variant: str, args: argparse.Namespace, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from moectl import config
    from moectl.services import distributed, expert_parallel
    from moectl.models import build_model, moe_layers
    from moectl.common.runtime import Dist
    from moectl.training.optim import make_optimizer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.device == "cpu" else 1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    dp = Dist(rank=rank, world_size=world, local_rank=rank)
    cfg = config.load(ROOT / args.config, DEFAULT_SET + args.set)
    vocab, seq = cfg.tokenizer.vocab_size, cfg.data.seq_len
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, vocab)
    if args.skew is not None:
        for layer in moe_layers(model):
            layer.router.expert_bias[0] = args.skew
    ep = expert_parallel.shard(model, ep_size, dp, shadow=1 if variant == "shadow1" else "off",
                               overlap=variant == "overlap")
    model = model.to(device)
    ddp = distributed.wrap(model, dp, device, ignore=expert_parallel.parameter_names(model, ep) if ep else ())
    optimizer = make_optimizer(model, cfg.optim)
    experts = [p for layer in moe_layers(model) for p in layer.experts.parameters()]
    timings = expert_parallel.Timings()
    for layer in ep.layers if ep else []:
        layer.timings = timings
    gen = torch.Generator().manual_seed(1000 + rank)
    local = args.batch_size // world
    shares = []

    def step() -> None:
        ids = torch.randint(vocab, (local, seq + 1), generator=gen).to(device)
        out = ddp(ids[:, :-1], ids[:, 1:])
        loads = [r.tokens_per_expert.float() for r in out.routing]
        shares.append(sum(float(x.max() / x.sum().clamp_min(1)) for x in loads) / max(len(loads), 1))
        out.loss.backward()
        if ep is not None:
            ep.reduce_gradients()
            ep.clip_grad_norm_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_rss_peak()
    rows = []
    for _ in range(args.steps):
        before = (timings.exchange, timings.experts)
        dist.barrier()
        started = time.perf_counter()
        step()
        rows.append((time.perf_counter() - started, timings.exchange - before[0], timings.experts - before[1]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_peak_mb()
    report = {
        "rank": rank,
        "expert_mb": sum(p.numel() * p.element_size() for p in experts) / 2**20,
        "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "peak_mb": peak,
        "steps": rows,
        "threads": torch.get_num_threads(),
        "hot_share": sum(shares) / len(shares),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # leave together: gloo aborts a rank whose peer tears the group down first
    dist.destroy_process_group()


def run_layout(world: int, ep_size: int, variant: str, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, ep_size, variant, args, str(Path(tmp) / "store"), tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    steps = [s for r in ranks for s in r["steps"]]
    step_ms = statistics.median(s[0] for s in steps) * 1e3
    return {
        "world": world,
        "ep": ep_size,
        "variant": variant,
        "skew": args.skew,
        "hot_share": round(statistics.mean(r["hot_share"] for r in ranks), 4),
        "device": args.device,
        "threads": ranks[0]["threads"],
        "steps": args.steps,
        "expert_mb": round(max(r["expert_mb"] for r in ranks), 4),
        "params_mb": round(max(r["params_mb"] for r in ranks), 4),
        "peak_mb": round(max(r["peak_mb"] for r in ranks), 1),
        "step_ms": round(step_ms, 1),
        "exchange_ms": round(statistics.median(s[1] for s in steps) * 1e3, 1),
        "experts_ms": round(statistics.median(s[2] for s in steps) * 1e3, 1),
    }


def median_run(runs: list) -> dict:
    """The run whose step time is the median of the runs (the lower middle for an even count),
    with every run's step time beside it."""
    ordered = sorted(runs, key=lambda r: r["step_ms"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_step_ms": [r["step_ms"] for r in runs]}


def _calibrate_worker(rank: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rows = []
    for numel, repeats in ((1, 200), (4 * 2**20, 10)):  # 4 bytes (latency), 16 MB (bandwidth)
        x, y = torch.ones(2 * numel), torch.empty(2 * numel)
        dist.all_to_all_single(y, x)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            dist.all_to_all_single(y, x)
        rows.append((time.perf_counter() - started) / repeats)
    if rank == 0:
        Path(out).write_text(json.dumps({"latency": rows[0], "bandwidth": 4 * 4 * 2**20 / (rows[1] - rows[0])}))
    dist.barrier()
    dist.destroy_process_group()


def calibrate() -> dict:
    """The rates of moectl/common/perf_model.py's `cpu` preset, measured here: one thread's matmul FLOP/s
    on an expert's shapes (d 256 x hidden 1024, 2048 rows), and a 2-process gloo all-to-all's
    latency and bandwidth (bytes each process sends per second)."""
    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    a, b = torch.randn(2048, 256), torch.randn(256, 1024)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    flops = 2 * 2048 * 256 * 1024 / statistics.median(times)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_calibrate_worker, args=(str(Path(tmp) / "store"), str(Path(tmp) / "out.json")), nprocs=2, join=True)
        link = json.loads(Path(tmp, "out.json").read_text())
    return {"flops": flops, **link}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the model (relative to the repository)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"config overrides after the benchmark's own ({' '.join(DEFAULT_SET)})")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="expert-parallel sizes (1: DDP)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step over all processes")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every layout this many times, in interleaved rounds, and report the median run "
                        "(each run's step is itself the median over its steps and ranks)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variants", nargs="*", choices=["overlap", "shadow1"], default=["overlap", "shadow1"],
                        help="also run each EP > 1 layout with the overlapped exchange, and with the hottest expert "
                        "shadowed (train.shadow_experts=1)")
    parser.add_argument("--skew", type=float, default=None, metavar="B",
                        help="plant a hot expert: sigmoid routing with expert 0's selection bias set to B")
    parser.add_argument("--json", action="store_true", help="one JSON object per layout instead of a table")
    parser.add_argument("--calibrate", action="store_true",
                        help="only measure this machine's rates for the perf model's cpu preset (JSON)")
    args = parser.parse_args()
    if args.skew is not None:  # the bias steers selection only, and stays where it was planted
        args.set = ["moe.router=sigmoid", "moe.bias_update_rate=0.0"] + args.set
    sys.path.insert(0, str(ROOT))
    if args.calibrate:
        print(json.dumps(calibrate()))
        return 0
    from moectl import config

    seq = config.load(ROOT / args.config, DEFAULT_SET + args.set).data.seq_len
    layouts = [(w, n, v) for w in args.world for n in args.ep if n <= w and w % n == 0 and args.batch_size % w == 0
               for v in (["plain"] + (args.variants if n > 1 else []))]
    runs: dict = {layout: [] for layout in layouts}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every layout alike
        for layout in layouts:
            runs[layout].append(run_layout(*layout, args))
    results = []
    for layout in layouts:
        row = median_run(runs[layout])
        row["global_tokens"] = args.batch_size * seq
        row["tokens_per_sec"] = round(row["global_tokens"] / (row["step_ms"] / 1e3), 1)
        results.append(row)
    for row in results:
        ddp = next((r for r in results if r["world"] == row["world"] and r["ep"] == 1), None)
        row["ratio_to_ddp"] = round(row["tokens_per_sec"] / ddp["tokens_per_sec"], 3) if ddp else None
        predicted = predicted_step_ms(args, row["world"], row["ep"], row["variant"])
        row["predicted_ms"] = round(predicted, 1) if predicted is not None else None
    if args.json:
        for row in results:
            print(json.dumps(row))
        return 0
    print(f"device {args.device}, {results[0]['threads']} thread(s) per process, global batch {args.batch_size}x{seq} "
          f"tokens, median of {args.steps} steps x all ranks; busiest expert's share of assignments "
          f"{statistics.mean(r['hot_share'] for r in results):.3f}"
          + (f" (planted: expert 0's selection bias {args.skew:g})" if args.skew is not None else "")
          + (f", median of {args.repeats} interleaved runs (step ms range in brackets)" if args.repeats > 1 else ""))
    print(f"{'W':>3}{'EP':>4}{'variant':>9}{'expert MB':>11}{'params MB':>11}{'peak MB':>9}{'step ms':>9}"
          f"{'a2a ms':>8}{'experts ms':>12}{'tokens/s':>10}{'x DDP':>7}{'predicted ms':>14}")
    for r in results:
        ratio = f"{r['ratio_to_ddp']:.2f}" if r["ratio_to_ddp"] is not None else "-"
        timed = r["ep"] > 1 and r["variant"] != "overlap"  # the overlapped exchange is not split into parts
        a2a, experts = (f"{r['exchange_ms']:.1f}", f"{r['experts_ms']:.1f}") if timed else ("-", "-")
        spread = f"  [{min(r['runs_step_ms']):.0f}-{max(r['runs_step_ms']):.0f}]" if args.repeats > 1 else ""
        print(f"{r['world']:>3}{r['ep']:>4}{r['variant']:>9}{r['expert_mb']:>11.1f}{r['params_mb']:>11.1f}{r['peak_mb']:>9.0f}"
              f"{r['step_ms']:>9.0f}{a2a:>8}{experts:>12}{r['tokens_per_sec']:>10.0f}{ratio:>7}"
              f"{r['predicted_ms'] if r['predicted_ms'] is not None else '-':>14}{spread}")
    for world in sorted({r["world"] for r in results}):
        rows = [r for r in results if r["world"] == world and r["predicted_ms"] is not None]
        name = lambda r: f"EP{r['ep']}" + ("" if r["variant"] == "plain" else f"+{r['variant']}")  # noqa: E731
        measured = [name(r) for r in sorted(rows, key=lambda r: r["step_ms"])]
        predicted = [name(r) for r in sorted(rows, key=lambda r: r["predicted_ms"])]
        wrong = misranked(rows)
        verdict = "every pair the plan tells apart is ranked as measured" if not wrong else \
            "measured against predicted: " + ", ".join(f"{name(a)} before {name(b)}" for a, b in wrong)
        factors = ", ".join(f"{name(r)} {r['step_ms'] / r['predicted_ms']:.2f}" for r in rows)
        print(f"W={world}: fastest first, measured {measured}, predicted {predicted}: {verdict}; "
              f"measured / predicted: {factors}")
    return 0


def misranked(rows: list) -> list:
    """The pairs (a, b) the plan predicts a faster than b (by more than 0.1%) and that measured b
    faster than a. Layouts the plan predicts alike impose no order."""
    return [(b, a) for a in rows for b in rows
            if a["predicted_ms"] < b["predicted_ms"] * 0.999 and a["step_ms"] > b["step_ms"]]


def predicted_step_ms(args: argparse.Namespace, world: int, ep: int, variant: str) -> Optional[float]:
    """moectl plan's prediction for this layout with the `cpu` preset (the GPU preset on --device
    cuda), routing taken as uniform (an untrained router on random tokens is close to it)."""
    import dataclasses

    import torch

    from moectl import config
    from moectl.commands import plan
    from moectl.models import build_model
    from moectl.common.perf_model import PRESETS

    cfg = config.load(ROOT / args.config, DEFAULT_SET + args.set + [f"train.batch_size={args.batch_size}"])
    hw = PRESETS["gpu-node" if args.device == "cuda" else "cpu"]
    # One node of `world` processes; on a CPU with fewer cores than processes, they share them.
    share = min(1.0, (os.cpu_count() or 1) / world) if args.device == "cpu" else 1.0
    hw = dataclasses.replace(hw, devices_per_node=world, nodes=1, flops=hw.flops * share)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe, cfg.tokenizer.vocab_size)
    loads = [[1.0] * cfg.moe.num_experts for _ in range(len(plan.moe_layers(model)))]
    if variant == "shadow1" or args.skew is not None:
        return None  # the plan predicts its own shadowing policy, not a forced one; and uniform routing only
    return plan.predict(cfg, hw, plan.dense_parameters(model), loads, world, ep, False, variant == "overlap").step_ms


if __name__ == "__main__":
    sys.exit(main())
