"""LoRA on stacked experts: moectl's grouped low-rank path against PEFT's `target_parameters` on the
same module, full fine-tuning of the experts, and frozen experts.

One MoE layer's experts (GroupedExperts, SwiGLU, E experts of D -> H) on N*K rows sorted by
expert, forward + backward with the input's gradient (as inside a network), gradients reset every
iteration:
  full     every expert weight trains (full fine-tuning)
  frozen   the weights frozen, no adapter: the floor (the input's gradient alone)
  moectl   the weights frozen, a rank-r adapter per expert on each matrix, through moectl's grouped
           path: two more grouped matmuls per matrix through rank r, no weight gradient
  peft     the same adapters through PEFT's ParamWrapper (target_parameters, with the module's
           is_transposed set for moectl's (E, in, out) layout): it adds the delta to each weight in
           a parametrization every call, so the weight's full gradient is formed and then reduced to A, B
Before timing, `peft` is checked to compute moectl's output and adapter gradients (max abs diffs
reported). The cases run interleaved round by round in one process; the time is the median of
--repeats x --rounds runs after --warmup. `trainable` and `state_mib` (the gradients and AdamW's two
moments of what trains, fp32) are counted, not measured.

    python benchmarks/lora.py            # the table
    python benchmarks/lora.py --json     # one JSON object per line
    python benchmarks/lora.py --smoke    # tiny shapes, a few runs: checks it works

JSON keys: impl, E, K, N, D, H, rank, ms_median, ratio_to_full, trainable, state_mib, threads, max_diff.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

IMPLS = ("full", "frozen", "moectl", "peft")
WEIGHTS = ("w_up", "w_gate", "w_down")


def build(impl: str, e: int, d: int, h: int, rank: int, seed: int = 0):
    """(a callable (x, sizes) -> y, the parameters that train) for one implementation."""
    import torch
    from torch import nn

    from moectl.moe.adapter import Adapter
    from moectl.moe.experts import GroupedExperts

    torch.manual_seed(seed)
    experts = GroupedExperts(e, d, h, "swiglu")
    if impl == "full":
        return experts, list(experts.parameters())
    for p in experts.parameters():
        p.requires_grad_(False)
    if impl == "frozen":
        return experts, []
    torch.manual_seed(seed + 1)
    adapters = {n: Adapter(getattr(experts, n).shape[1], getattr(experts, n).shape[2], rank, 2.0, experts=e) for n in WEIGHTS}
    for a in adapters.values():
        nn.init.normal_(a.B, std=0.02)
    if impl == "moectl":
        experts.adapters = nn.ModuleDict(adapters)
        return experts, [p for a in adapters.values() for p in a.parameters()]
    from peft import LoraConfig, inject_adapter_in_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

    experts.is_transposed = True  # PEFT's word for (E, in, out): no swap of in and out
    cfg = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_parameters=[f"experts.{n}" for n in WEIGHTS])
    holder = inject_adapter_in_model(cfg, Holder())
    wrappers = {m.parameter_name: m for m in holder.modules() if hasattr(m, "parameter_name")}
    with torch.no_grad():  # the same adapter values as moectl's: lora_A (r*E, in), lora_B (out, r*E)
        for n, w in wrappers.items():
            a, b = adapters[n].A, adapters[n].B  # (E, in, r), (E, r, out)
            w.lora_A["default"].weight.copy_(a.transpose(1, 2).reshape(e * rank, -1))
            w.lora_B["default"].weight.copy_(b.permute(2, 1, 0).reshape(b.shape[2], rank * e))
    trainable = [p for n, p in holder.named_parameters() if "lora_" in n]
    return holder.experts, trainable


def inputs(e: int, k: int, n: int, d: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, e, (n * k,), generator=g)
    sizes = torch.bincount(choice, minlength=e).tolist()
    x = torch.randn(n * k, d, generator=g)
    return x, sizes


def step(fn, trainable, x, sizes) -> None:
    x = x.detach().requires_grad_(True)
    fn(x, sizes).square().mean().backward()
    for p in trainable:
        p.grad = None


def check(e: int, k: int, n: int, d: int, h: int, rank: int) -> float:
    """Max abs difference of PEFT's output and adapter gradients from moectl's (the gradients are the
    same numbers in other layouts: compared sorted)."""
    import torch

    x, sizes = inputs(e, k, n, d)
    results = []
    for impl in ("moectl", "peft"):
        fn, trainable = build(impl, e, d, h, rank)
        y = fn(x, sizes)
        y.square().mean().backward()
        results.append((y.detach(), torch.cat([p.grad.flatten() for p in trainable]).sort().values))
    (ya, ga), (yb, gb) = results
    return max(float((ya - yb).abs().max()), float((ga - gb).abs().max()))


def run(shapes: list[tuple], impls: list[str], repeats: int, rounds: int, warmup: int) -> list[dict]:
    import torch

    rows = []
    for e, k, n, d, h, rank in shapes:
        x, sizes = inputs(e, k, n, d)
        built = {impl: build(impl, e, d, h, rank) for impl in impls}
        times = {impl: [] for impl in impls}
        for _ in range(rounds):
            for impl in impls:  # interleaved: a slow spell hits every implementation alike
                fn, trainable = built[impl]
                for _ in range(warmup):
                    step(fn, trainable, x, sizes)
                for _ in range(repeats):
                    start = time.perf_counter()
                    step(fn, trainable, x, sizes)
                    times[impl].append(time.perf_counter() - start)
        diff = check(e, k, n, d, h, rank) if "peft" in impls else None
        full = statistics.median(times["full"]) if "full" in times else None
        for impl in impls:
            count = sum(p.numel() for p in built[impl][1])
            ms = statistics.median(times[impl]) * 1e3
            rows.append({"impl": impl, "E": e, "K": k, "N": n, "D": d, "H": h, "rank": rank, "ms_median": ms,
                         "ratio_to_full": ms / (full * 1e3) if full else None, "trainable": count,
                         "state_mib": count * 4 * 3 / 2**20, "threads": torch.get_num_threads(),
                         "max_diff": diff if impl == "peft" else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    import importlib.util

    impls = [i for i in IMPLS if i != "peft" or importlib.util.find_spec("peft") is not None]
    if args.smoke:
        shapes, args.repeats, args.rounds, args.warmup = [(4, 2, 64, 16, 32, 4)], 1, 1, 0
    else:  # the SFT quickstart's layer (2048 tokens a micro-batch), and a wider one
        shapes = [(16, 4, 2048, 128, 128, r) for r in (4, 8, 16)] + [(8, 2, 2048, 512, 1024, 8)]
    rows = run(shapes, impls, args.repeats, args.rounds, args.warmup)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'impl':8} {'E':>3} {'K':>2} {'N':>5} {'D':>4} {'H':>5} {'r':>3} {'ms':>8} {'x full':>7} {'trainable':>10} "
          f"{'state MiB':>9}  check")
    for r in rows:
        ratio = f"{r['ratio_to_full']:.2f}" if r["ratio_to_full"] is not None else "-"
        check_text = f"max diff {r['max_diff']:.1e}" if r["max_diff"] is not None else ""
        print(f"{r['impl']:8} {r['E']:>3} {r['K']:>2} {r['N']:>5} {r['D']:>4} {r['H']:>5} {r['rank']:>3} "
              f"{r['ms_median']:>8.2f} {ratio:>7} {r['trainable']:>10,} {r['state_mib']:>9.2f}  {check_text}")
    print(f"(median of {args.repeats * args.rounds} runs each, {rows[0]['threads']} threads; forward + backward)")


if __name__ == "__main__":
    main()
