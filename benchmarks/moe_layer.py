"""MoE layer speed and memory: moectl against a dense FFN of the same active FLOPs, the
per-expert loop reference, and Hugging Face transformers' MixtralSparseMoeBlock.

`experts` is the floor under moectl's layer: its expert FFNs alone (the grouped matmuls and the
activation, forward + backward) on N*K rows already sorted by expert, split as moectl's router
splits this batch. moectl minus `experts` is what routing, dispatch and combine cost; `experts`
minus `dense` is what E thin matmuls over E times the weights cost against one wide matmul.

Times forward + backward of one layer on (N, D) tokens, gradients reset to None every
iteration as a training step would. Each case runs in a fresh subprocess, --rounds times, the
implementations interleaved round by round so that a slow spell of a shared machine hits them
all alike; the reported time is the median of all --repeats x --rounds timed runs (after
--warmup in each). Peak memory comes from one more run of each case, in its own process:
  CPU: peak RSS over two forward + backward passes minus the RSS before them (inputs, weights
       and a first pass on 16 tokens to load lazy kernels excluded), with glibc's default
       allocator, which unmaps large freed blocks, so the peak follows live memory (it still
       includes the BLAS library's own workspaces);
  CUDA: torch.cuda.max_memory_allocated minus the memory allocated before them.
For timing, the CPU process tunes glibc malloc as `moectl train` does (moectl/common/runtime.py), for
every implementation alike; --allocator default times without it.

    python benchmarks/moe_layer.py                    # the table
    python benchmarks/moe_layer.py --json             # one JSON object per line
    python benchmarks/moe_layer.py --smoke            # tiny shapes, a few runs: checks it works

JSON keys: impl, E, K, N, D, H, dtype, ms_median, ms_min, peak_mb, ratio_to_dense, device, threads,
allocator, runs, path (moectl's expert kernels: "grouped_mm" or "loop"; null for the others).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("moectl", "moectl_cap1.25", "experts", "dense", "loop", "hf_mixtral_eager", "hf_mixtral_grouped_mm")
HF_IMPLS = ("hf_mixtral_eager", "hf_mixtral_grouped_mm")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(impl: str, e: int, k: int, d: int, h: int, device, dtype):
    """A module mapping (N, D) -> (N, D) for the given implementation."""
    from torch import nn

    if impl == "dense":
        from moectl.moe.experts import FeedForward

        return FeedForward(d, k * h, "swiglu").to(device, dtype)
    if impl.startswith("hf_mixtral"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e, num_experts_per_tok=k)
        if impl == "hf_mixtral_grouped_mm":
            cfg._experts_implementation = "grouped_mm"
        block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            nn.init.normal_(p, std=0.02)

        class Flat(nn.Module):  # MixtralSparseMoeBlock takes (B, T, D)
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                out = self.inner(x[None])
                return (out[0] if isinstance(out, tuple) else out)[0]

        return Flat(block).to(device, dtype)
    from moectl.moe import MoELayer

    if impl == "experts":
        return MoELayer(d, e, k, h, "swiglu").to(device, dtype)
    cf = 1.25 if impl == "moectl_cap1.25" else None
    layer = MoELayer(d, e, k, h, "swiglu", capacity_factor=cf, impl="loop" if impl == "loop" else "sorted")
    return layer.to(device, dtype)


def run_case(args) -> dict:
    import torch

    if args.allocator == "tuned" and args.device == "cpu":
        from moectl.common.runtime import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    module = build(args.impl, args.experts, args.topk, args.d, args.h, device, dtype)
    module.train()
    x = torch.randn(args.n, args.d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(args.n, args.d, device=device, dtype=dtype)
    path = None
    if args.impl in ("moectl", "moectl_cap1.25", "experts"):
        from moectl.moe import dispatch
        from moectl.moe.experts import _grouped_mm_ok

        with torch.no_grad():  # this batch's split over the experts (the layer routes it the same way each time)
            split, _ = dispatch.plan(module.router(x), module.capacity(args.n))
        ex = module.experts
        path = "grouped_mm" if _grouped_mm_ok(x, ex.w_up, ex.w_gate, ex.w_down) else "loop"
    if args.impl == "experts":
        sizes = split.tokens_per_expert
        module = _ExpertsOnly(module.experts, sizes)
        x = torch.randn(sum(sizes), args.d, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(sum(sizes), args.d, device=device, dtype=dtype)
    params = [p for p in module.parameters()]

    def step() -> None:
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad_out)
        x.grad = None
        for p in params:
            p.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # One pass on a few tokens first: lazily loaded kernels and libraries are not the layer's memory.
    tiny = x[:16].detach().clone().requires_grad_(True)
    out = module(tiny)
    (out[0] if isinstance(out, tuple) else out).backward(grad_out[:16])
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else peak_rss_mb() - base
    return {
        "impl": args.impl,
        "E": args.experts,
        "K": args.topk,
        "N": args.n,
        "D": args.d,
        "H": args.h,
        "dtype": args.dtype,
        "times": [round(t, 3) for t in times],
        "peak_mb": round(max(peak, 0.0), 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "allocator": args.allocator,
        "path": path,
    }


class _ExpertsOnly:
    """moectl's expert FFNs on rows already grouped by expert, `sizes` rows per expert."""

    def __init__(self, experts, sizes: list[int]):
        self.experts, self.sizes = experts, sizes

    def __call__(self, x):
        sizes = self.sizes if x.shape[0] == sum(self.sizes) else [x.shape[0]] + [0] * (len(self.sizes) - 1)  # the warm-up pass
        return self.experts(x, sizes)

    def parameters(self):
        return self.experts.parameters()


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens N")
    p.add_argument("--d", type=int, default=256, help="model width D")
    p.add_argument("--h", type=int, default=512, help="expert hidden size H")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="E values")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2], help="K values")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every implementation")
    p.add_argument("--allocator", default="tuned", choices=("tuned", "default"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and few runs, to check the script works (peak memory from the timed run)")
    p.add_argument("--one", nargs=3, metavar=("IMPL", "E", "K"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:  # child process: one case, JSON on stdout
        args.impl, args.experts, args.topk = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_case(args)))
        return
    if args.smoke:
        args.n, args.d, args.h, args.experts, args.topk, args.repeats, args.warmup, args.rounds = 256, 32, 64, [4], [2], 2, 1, 1

    impls = list(args.impls)
    if not have_transformers() and any(i in HF_IMPLS for i in impls):
        print("note: transformers is not installed; skipping hf_mixtral_* (pip install transformers)", file=sys.stderr)
        impls = [i for i in impls if i not in HF_IMPLS]
    passthrough = [
        f"--n={args.n}", f"--d={args.d}", f"--h={args.h}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
        f"--threads={args.threads}", f"--device={args.device}", f"--dtype={args.dtype}", f"--allocator={args.allocator}",
    ]
    memory_passthrough = [p for p in passthrough if not p.startswith(("--repeats", "--warmup", "--allocator"))]
    memory_passthrough += ["--repeats=1", "--warmup=1", "--allocator=default"]

    def run_child(impl: str, e: int, k: int, flags: list[str]) -> dict:
        cmd = [sys.executable, __file__, "--one", impl, str(e), str(k), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"error: {impl} E={e} K={k} failed:\n{done.stderr}", file=sys.stderr)
            sys.exit(1)
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for e in args.experts:
        for k in args.topk:
            if k > e:
                continue
            samples: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    samples[impl].append(run_child(impl, e, k, passthrough))
            group = []
            for impl, runs in samples.items():
                times = [t for r in runs for t in r.pop("times")]
                row = {**runs[0], "ms_median": round(statistics.median(times), 3), "ms_min": round(min(times), 3)}
                if not args.smoke:  # a separate run with the default allocator; smoke keeps the timed run's
                    row["peak_mb"] = run_child(impl, e, k, memory_passthrough)["peak_mb"]
                row["runs"] = len(times)
                group.append(row)
            dense = next((r["ms_median"] for r in group if r["impl"] == "dense"), None)
            for r in group:
                r["ratio_to_dense"] = round(r["ms_median"] / dense, 3) if dense else None
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
    if not args.json:
        print(f"MoE layer forward + backward, N={args.n} D={args.d} H={args.h} {args.dtype}, "
              f"{rows[0]['device'] if rows else args.device}, {args.threads} threads, {args.allocator} allocator, "
              f"median of {args.repeats} x {args.rounds} interleaved rounds")
        print(f"{'impl':<24}{'E':>4}{'K':>3}{'ms':>10}{'x dense':>9}{'peak MB':>10}")
        for r in rows:
            ratio = f"{r['ratio_to_dense']:.2f}" if r["ratio_to_dense"] is not None else "-"
            print(f"{r['impl']:<24}{r['E']:>4}{r['K']:>3}{r['ms_median']:>10.1f}{ratio:>9}{r['peak_mb']:>10.1f}")
        paths = sorted({r["path"] for r in rows if r.get("path")})
        if paths:
            print(f"moectl's expert kernels: {', '.join(paths)}")


if __name__ == "__main__":
    main()
