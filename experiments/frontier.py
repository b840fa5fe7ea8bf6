"""The memory-quality frontier: what each way of saving an MoE's memory costs in quality.

    python experiments/frontier.py                 # train the cells, measure every setting, report
    python experiments/frontier.py --report-only   # the table and figure again from frontier.json

`moectl sweep experiments/frontier.yaml` trains the quickstart MoE (E16) on seeds 21-23, and two
smaller MoEs from scratch on the same tokens (E12, E8: the experts' bytes after pruning 25% and
50%). On each seed's E16 run this script then applies, through moectl's own commands:

  prune    25% and 50% of each layer's experts by frequency, reap, naee and random
  int8     the experts quantised to int8, the rest bf16;  int4: likewise to int4
  prune+4  prune 50% by REAP, then the experts to int4
  offload  the experts left in the file, K = 4 or 8 of 16 resident per layer (LRU)

Offloading with K = 1 or 2 needs a model that routes each token to at most K experts, so the sweep
also trains the quickstart with 8 experts at top-1 and at top-2 (seeds 21-23). On each, for every
K of 1, 2, 4 that its top_k allows: `moectl eval --offload-experts --expert-cache K --prefetch`
(the loss must equal the resident model's; hit rate, prefetch recall and bytes read per token of
a 2,048-token pass), and the same routing replayed one token at a time, as decoding asks for
experts, through an LRU, LFU and LFRU cache of K (route-stats' --cache-sim), against K/E and the
best fixed set of K.

and evaluates each on the same validation batches, dropless, against the unmodified run: the
difference in eval loss and in bits per byte, paired by seed, with its 95% t-interval. Bytes are
the experts' and the rest's as stored (a quantised model's integers and scales; offloading: the
K resident experts; quantised weights are dequantised when loaded, so this is what a kernel
reading them would hold). The unmodified, offloaded, pruned and quantised runs are also timed in
`generate` in a fresh process each: tokens per second after loading, and the process's peak RSS.

Writes experiments/frontier/frontier.json (every seed's numbers), docs/frontier.png, and the
table between the `frontier` markers of docs/memory.md. Machine time: about 10 minutes of
training (two cells at a time) and 15 of measuring on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "frontier.yaml"
OUT = ROOT / "experiments" / "frontier" / "frontier.json"
PNG = ROOT / "docs" / "frontier.png"
DOC = ROOT / "docs" / "memory.md"
MARKERS = ("<!-- frontier: experiments/frontier/frontier.json -->", "<!-- /frontier -->")
CRITERIA = ("frequency", "reap", "naee", "random")
RATIOS = (0.25, 0.5)
CACHES = (4, 8)
SMALL_CACHES = {"E8_top1": (1, 2, 4), "E8_top2": (2, 4)}  # the 8-expert cells offloaded, and their K
OFFLOAD_MARKERS = ("<!-- offload: experiments/frontier/frontier.json -->", "<!-- /offload -->")
NAEE_CALIB_BATCHES = 2  # NAEE tries C(16, 8) = 12,870 subsets per layer at 50%: two batches keep it to minutes
GENERATE_TOKENS = 48


def moectl(*args: object, json_out: bool = True) -> dict:
    """Run a moectl command in a fresh process; its JSON output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "moectl", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"moectl {' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(done.stdout) if json_out else {}


def stored_bytes(path: Path) -> tuple[int, int]:
    """(experts, rest): bytes of a model.safetensors as stored (tied tensors are stored once)."""
    from moectl.services import checkpoint
    from moectl.services.offload import SafetensorsFile

    ckpt, _ = checkpoint.resolve(path)
    header = SafetensorsFile(ckpt / "model.safetensors").header
    experts = rest = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if ".experts." in name:
            experts += size
        else:
            rest += size
    return experts, rest


def evaluate(path: Path, *extra: object) -> dict:
    rep = moectl("eval", path, "--json", "--capacity-factor", "dropless", *extra)
    return {"loss": rep["loss"], "bits_per_byte": rep["bits_per_byte"], "tokens": rep["tokens"],
            **({"offload": rep["offload"]} if "offload" in rep else {})}


def time_generate(path: Path, cache: int | None = None) -> dict:
    """Load and generate in a fresh process: tokens/s of the generation, the process's peak RSS."""
    args = [sys.executable, __file__, "--time-generate", str(path)] + (["--cache", str(cache)] if cache else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"timing {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_generate_here(path: str, cache: int | None) -> None:
    import torch

    from moectl.commands import generate
    from moectl.services import loaded_model
    from moectl.common.runtime import peak_rss_bytes
    from moectl.services.offload import Offload

    torch.set_num_threads(1)
    model = loaded_model.load(Path(path), offload=Offload(cache) if cache else None)
    start = time.perf_counter()
    result = generate.generate(model, "def ", GENERATE_TOKENS, temperature=1.0, seed=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": len(result.token_ids), "seconds": seconds,
                      "tokens_per_sec": len(result.token_ids) / seconds, "peak_rss_bytes": peak_rss_bytes()}))


def measure_seed(seed: int, runs: Path, work: Path) -> dict:
    """Every setting on one seed's runs (bundles kept in `work`, so a rerun skips what is done)."""
    from moectl import config

    base = runs / f"E16_seed={seed}"
    work.mkdir(parents=True, exist_ok=True)
    found = {}

    def bundle(name: str, *command: object) -> Path:
        out = work / name
        if not (out / "meta.json").is_file():
            moectl(*command, "--out", out, "--overwrite", json_out=False)
        return out

    def record(name: str, path: Path, timed: bool = False, **extra) -> None:
        experts, rest = stored_bytes(path)
        found[name] = {**evaluate(path), "experts_bytes": experts, "rest_bytes": rest, **extra}
        if timed:
            found[name]["generate"] = time_generate(path)
        print(f"seed {seed}: {name}: loss {found[name]['loss']:.4f}", flush=True)

    record("unmodified", base, timed=True)
    for ratio in RATIOS:
        for crit in CRITERIA:
            calib = ["--calib-batches", NAEE_CALIB_BATCHES] if crit == "naee" else []
            path = bundle(f"prune_{crit}_{ratio}", "prune", base, "--ratio", ratio, "--criterion", crit, *calib)
            record(f"prune {int(ratio * 100)}% {crit}", path, timed=(crit, ratio) == ("reap", 0.5))
    for bits in ("int8", "int4"):
        record(f"{bits} experts", bundle(f"q_{bits}", "quantize", base, "--experts", bits), timed=bits == "int4")
    pruned = work / "prune_reap_0.5"
    record("prune 50% reap + int4", bundle("prune_reap_0.5_int4", "quantize", pruned, "--experts", "int4"))
    experts, rest = found["unmodified"]["experts_bytes"], found["unmodified"]["rest_bytes"]
    num_experts = config.load(base / "config.yaml", saved=True).moe.num_experts
    for k in CACHES:
        ev = evaluate(base, "--offload-experts", "--expert-cache", k)
        found[f"offload K={k}"] = {**ev, "experts_bytes": experts * k // num_experts, "rest_bytes": rest,
                                   "generate": time_generate(base, k)}
        print(f"seed {seed}: offload K={k}: loss {ev['loss']:.4f}", flush=True)
    for e in (12, 8):
        record(f"E{e} from scratch", runs / f"E{e}_scratch_seed={seed}")
    return found


def measure_small_caches(seed: int, runs: Path) -> dict:
    """Offloading the 8-expert cells at K = 1, 2, 4: a real offloaded eval with prefetch, and the
    token-by-token replay of the same routing through each cache policy."""
    from moectl.commands import route_stats
    from moectl.moe.cache import POLICIES
    from moectl.services import loaded_model

    found = {}
    for cell, capacities in SMALL_CACHES.items():
        path = runs / f"{cell}_seed={seed}"
        resident = evaluate(path)
        loaded = loaded_model.load(path)
        trace = [[] for _ in loaded.slots]
        route_stats.profile(loaded, "validation", None, None, trace)
        rows = {}
        for k in capacities:
            ev = evaluate(path, "--offload-experts", "--expert-cache", k, "--prefetch")
            layers = ev["offload"]["layers"]
            predicted = [x["prefetch_recall"] for x in layers if x["prefetch_recall"] is not None]  # not layer 0
            rows[k] = {"loss": ev["loss"], "resident_loss": resident["loss"],
                       **{key: sum(x[key] for x in layers) / len(layers)
                          for key in ("hit_rate", "bytes_per_token", "random_hit_rate", "static_hit_rate")},
                       "prefetch_recall": sum(predicted) / len(predicted), "decode": {}}
            for policy in POLICIES:
                sim = route_stats.simulate_caches(loaded, trace, k, policy)["layers"]
                rows[k]["decode"][policy] = {key: sum(x[key] for x in sim) / len(sim)
                                             for key in ("hit_rate", "static_hit_rate", "loads_per_token")}
            print(f"seed {seed}: {cell} K={k}: eval hit {rows[k]['hit_rate']:.3f}, decode LRU hit "
                  f"{rows[k]['decode']['lru']['hit_rate']:.3f}", flush=True)
        found[cell] = rows
    return found


# ------------------------------------------------------------------------------------------ report


def summarise(record: dict) -> list[dict]:
    """One row per setting: bytes, and the differences against the unmodified run paired by seed."""
    from moectl.common.paired import mean_ci

    seeds = sorted(record["seeds"])
    names = list(record["seeds"][seeds[0]])
    rows = []
    for name in names:
        per = [record["seeds"][s][name] for s in seeds]
        base = [record["seeds"][s]["unmodified"] for s in seeds]
        d_loss = mean_ci([p["loss"] - b["loss"] for p, b in zip(per, base)])
        d_bpb = mean_ci([p["bits_per_byte"] - b["bits_per_byte"] for p, b in zip(per, base)])
        row = {"setting": name, "experts_bytes": per[0]["experts_bytes"], "rest_bytes": per[0]["rest_bytes"],
               "loss": mean_ci([p["loss"] for p in per]), "d_loss": d_loss, "d_bpb": d_bpb,
               "per_seed_d_loss": [p["loss"] - b["loss"] for p, b in zip(per, base)]}
        if all("generate" in p for p in per):
            row["tokens_per_sec"] = mean_ci([p["generate"]["tokens_per_sec"] for p in per])
            row["peak_rss_bytes"] = mean_ci([p["generate"]["peak_rss_bytes"] for p in per])
        if all("offload" in p for p in per):
            row["hit_rate"] = mean_ci([sum(x["hit_rate"] for x in p["offload"]["layers"]) / len(p["offload"]["layers"])
                                       for p in per])
        rows.append(row)
    return rows


def _pm(value: tuple[float, float], spec: str) -> str:
    mean, half = value
    return format(mean, spec) if half != half else f"{format(mean, spec)} ± {format(half, spec.lstrip('+'))}"


def table(record: dict) -> str:
    rows = summarise(record)
    lines = [f"Seeds {', '.join(map(str, sorted(record['seeds'])))}; {record['machine']}; moectl {record['source']}. "
             "Differences are against the unmodified run on the same validation tokens, paired by seed "
             "(mean ± half-width of the 95% t-interval).", "",
             "| setting | experts MiB | rest MiB | eval loss | Δ loss (nats) | Δ bits/byte | generate tokens/s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = _pm(r["tokens_per_sec"], ".1f") if "tokens_per_sec" in r else "-"
        rss = f"{r['peak_rss_bytes'][0] / 2**20:.0f}" if "peak_rss_bytes" in r else "-"
        lines.append(f"| {r['setting']} | {r['experts_bytes'] / 2**20:.2f} | {r['rest_bytes'] / 2**20:.2f} | "
                     f"{_pm(r['loss'], '.4f')} | {_pm(r['d_loss'], '+.4f')} | {_pm(r['d_bpb'], '+.4f')} | {tps} | {rss} |")
    return "\n".join(lines)


def cache_table(record: dict) -> str:
    """The 8-expert cells offloaded at small K: means over seeds (± the 95% t-interval)."""
    from moectl.common.paired import mean_ci

    cache = {int(s): v for s, v in record["cache"].items()}
    seeds = sorted(cache)
    lines = [f"Seeds {', '.join(map(str, seeds))}; {record['machine']}; moectl {record['cache_source']}. Hit rates are "
             "means over the MoE layers, then over seeds (± the 95% t-interval). *Eval pass*: "
             "`moectl eval --offload-experts --expert-cache K --prefetch`, 2,048 tokens a pass; *decode*: the same "
             "routing replayed one token at a time (`route-stats --cache-sim K`).", "",
             "| model | K of 8 | Δ loss offloaded | eval pass hit | prefetch recall | KiB read/token | decode hit LRU "
             "| LFU | LFRU | random K/E | best fixed K | decode loads/token (LRU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, capacities in SMALL_CACHES.items():
        for k in capacities:
            per = [cache[s][cell][str(k)] for s in seeds]

            def pct(values: list[float]) -> str:
                return _pm(tuple(100 * x for x in mean_ci(values)), ".1f") + "%"

            d_loss = max(abs(p["loss"] - p["resident_loss"]) for p in per)
            lines.append(" | ".join([
                f"| {cell.replace('_', ' ')}", str(k), f"{d_loss:.1g}" if d_loss else "0 (every seed)",
                pct([p["hit_rate"] for p in per]), pct([p["prefetch_recall"] for p in per]),
                f"{mean_ci([p['bytes_per_token'] for p in per])[0] / 2**10:.1f}",
                *(pct([p["decode"][policy]["hit_rate"] for p in per]) for policy in ("lru", "lfu", "lfru")),
                f"{100 * per[0]['random_hit_rate']:.1f}%", pct([p["decode"]["lru"]["static_hit_rate"] for p in per]),
                _pm(mean_ci([p["decode"]["lru"]["loads_per_token"] for p in per]), ".2f")]) + " |")
    return "\n".join(lines)


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(record)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    families = [("+ int4", "", "tab:red", "D"), ("prune", "frequency", "tab:blue", "o"), ("prune", "reap", "tab:orange", "o"),
                ("prune", "naee", "tab:green", "o"), ("prune", "random", "tab:gray", "o"), ("int", "", "tab:purple", "s"),
                ("offload", "", "tab:olive", "^"), ("scratch", "", "black", "*"), ("unmodified", "", "black", "x")]
    for r in rows:
        family = next(f for f in families if f[0] in r["setting"] and f[1] in r["setting"])
        mib = (r["experts_bytes"] + r["rest_bytes"]) / 2**20
        half = r["d_loss"][1] if r["d_loss"][1] == r["d_loss"][1] else 0.0
        ax.errorbar(mib, r["d_loss"][0], yerr=half, fmt=family[3], color=family[2], capsize=3, markersize=7)
        below = family[0] in ("scratch", "int")  # these sit on the zero line beside others: label them underneath
        ax.annotate(r["setting"], (mib, r["d_loss"][0]), textcoords="offset points", xytext=(5, -11 if below else 4),
                    fontsize=7)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("model bytes as stored (MiB): experts + the rest")
    ax.set_ylabel("Δ eval loss against the unmodified model (nats/token)")
    ax.set_title(f"Memory against quality, quickstart MoE (16 experts, top-4), seeds {', '.join(map(str, sorted(record['seeds'])))}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_doc(record: dict) -> None:
    text = DOC.read_text()
    blocks = [(MARKERS, table(record))] + ([(OFFLOAD_MARKERS, cache_table(record))] if "cache" in record else [])
    for (start, end), body in blocks:
        block = f"{start}\n{body}\n{end}"
        text, n = re.subn(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        if n != 1:
            raise SystemExit(f"{DOC}: no {start} ... {end} block to fill")
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and figure from the record")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at a time")
    parser.add_argument("--time-generate", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_generate:
        _time_generate_here(args.time_generate, args.cache)
        return
    if not args.report_only:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "moectl", "sweep", str(SWEEP), "--jobs", str(args.jobs)], check=True,
                       env=env, cwd=ROOT)
        from moectl.commands import sweep
        from moectl.common import runtime

        loaded = sweep.load(SWEEP)
        source = (runtime.source_version()["commit"] or "?")[:7]
        # A rerun keeps what the record already has (delete it to measure everything again).
        record = json.loads(OUT.read_text()) if OUT.is_file() else {
            "machine": f"{runtime.machine()['cpu']} ({runtime.machine()['cores']} cores)", "source": source, "seeds": {}}
        for seed in sorted({c.values["train.seed"] for c in loaded.cells}):
            if str(seed) not in record["seeds"]:
                record["seeds"][str(seed)] = measure_seed(seed, ROOT / loaded.root,
                                                          ROOT / "runs" / "frontier_work" / f"seed={seed}")
            if str(seed) not in record.setdefault("cache", {}):
                record["cache"][str(seed)] = measure_small_caches(seed, ROOT / loaded.root)
                record["cache_source"] = source
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(OUT.read_text())
    record["seeds"] = {int(k): v for k, v in record["seeds"].items()}
    figure(record, PNG)
    write_doc(record)
    print(table(record))


if __name__ == "__main__":
    main()
