"""`moectl route-stats`: what a trained model's routers do, per layer and per expert.

It runs the model over a split and accumulates a `stats.RoutingProfile` from the routing
records: load and token share, importance (summed router probabilities), drops, the layer's
balance statistics (the same `summarize` training logs with), top-k co-selection, load by
position, and each expert's specialisation: the input tokens most over-represented in its
assignments (lift against all routed tokens). `--compare` runs a second checkpoint over the
same tokens and reports routing drift.

Outputs: a terminal report (80 columns), a JSON dict with the documented `JSON_KEYS`, and in
an output directory stats.json, one CSV per layer, PNG heatmaps and TensorBoard events.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moectl.commands.evaluate import split_batches
from moectl.common import console, plots
from moectl.common.errors import ConfigError
from moectl.common.stats import COLUMNS, LayerStats, RoutingProfile
from moectl.models import moe_layers
from moectl.moe.cache import POLICIES, simulate
from moectl.services.loaded_model import LoadedModel
from moectl.services.tracking import Tracker

POSITION_BINS = 8

JSON_KEYS = {
    "checkpoint": "the checkpoint directory analysed",
    "step": "its training step",
    "split": "the split routed (`validation` or `train`)",
    "batches": "batches routed (of train.micro_batch_size sequences of data.seq_len tokens)",
    "tokens": "tokens routed through each MoE layer",
    "collapse_threshold": "max/mean load above which a layer is flagged as collapsed (log.collapse_threshold)",
    "layers": "one entry per MoE layer, keys below",
    "layers[].slot": "FFN slot of the layer (the transformer block, or the gap after LSTM layer N)",
    "layers[].stats": "the layer's balance statistics: load, share, tokens, "
    + ", ".join(c.name for c in COLUMNS) + " (moectl/common/stats.py)",
    "layers[].collapsed": "max_over_mean > collapse_threshold",
    "layers[].experts": "per expert: expert, load (assignments processed), share, importance (share of summed router "
    "probability), drop_fraction (chosen but dropped by capacity), top10_share (share of its assignments taken by its "
    "10 most frequent input tokens), top_tokens (id, text, count, lift = P(token | expert) / P(token))",
    "layers[].coselection": "(E, E) fraction of tokens that chose both experts i and j among their top-k (diagonal: i)",
    "layers[].by_position": "bins (first position of each of the sequence's position bins) and share ((bins, E) "
    "each bin's load split over experts)",
    "cache_sim": "with --cache-sim K: capacity, policy, and layers[] of slot, requests (expert uses, one pass per token "
    "in decoding order), hit_rate, random_hit_rate (K/E), static_hit_rate (the K most used experts pinned, chosen in "
    "hindsight), loads_per_token and bytes_per_token (expert weights read per token)",
    "compare": "with --compare: other (its checkpoint) and layers[] of slot, js_divergence (Jensen-Shannon divergence "
    "of the two expert-share vectors, bits, 0-1) and top1_changed (fraction of tokens whose top-1 expert differs)",
}


def _check_moe(loaded: LoadedModel) -> None:
    if not loaded.slots:
        raise ConfigError(f"{loaded.run_dir} is a dense model: it has no MoE layers, so no routing to report")


def profile(loaded: LoadedModel, split: str, max_batches: Optional[int], other: Optional[LoadedModel] = None,
            trace: Optional[list[list]] = None):
    """Route the split's batches; returns (profile, batches, drift) where drift is per layer
    [top-1 changed count, tokens, then the other model's load per expert] against `other`, or None.
    `trace`, one list per MoE layer: gets each real token's computed experts, sequence by sequence
    in position order (the order a decoder would ask for them)."""
    _check_moe(loaded)
    cfg = loaded.cfg
    blocks, _, batches = split_batches(loaded, split, max_batches)
    prof = RoutingProfile(len(loaded.slots), loaded.experts, cfg.data.seq_len, loaded.tokenizer.get_vocab_size(), loaded.device)
    drift = np.zeros((len(loaded.slots), 2 + prof.num_experts)) if other is not None else None
    with torch.no_grad(), console.progress("routing", len(batches), "batches") as bar:
        for ids in batches:
            x, _ = blocks.batch(ids)
            layout = blocks.layout(ids)  # instruction-tuning rows: packed examples each on its own, no padding routed
            records = loaded.model(x.to(loaded.device), **_on(layout, loaded.device)).routing
            prof.update(records, x)
            for layer_trace, r in zip(trace or [], records):
                kept = torch.where(r.kept, r.expert_idx, -1)[r.token_mask()].tolist()  # (tokens, K), -1: not computed
                layer_trace.extend([e for e in row if e >= 0] for row in kept)
            if other is not None:
                theirs = other.model(x.to(other.device), **_on(layout, other.device)).routing
                for i, (a, b) in enumerate(zip(records, theirs)):
                    top_a, top_b = a.dense_weights().argmax(-1), b.dense_weights().to(a.probs.device).argmax(-1)
                    real = a.token_mask()  # padding has no top-1 expert
                    drift[i, :2] += [float((top_a != top_b)[real].sum()), float(real.sum())]
                    drift[i, 2 : 2 + b.num_experts] += b.tokens_per_expert.cpu().numpy()
            bar.advance()
    return prof, batches, drift


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def token_text(loaded: LoadedModel, idx: int) -> str:
    """A token as readable text: decoded when it is whole characters, else its raw vocabulary form."""
    text = loaded.tokenizer.decode([idx], skip_special_tokens=False)
    if not text or "\ufffd" in text:
        text = loaded.tokenizer.id_to_token(idx) or f"<{idx}>"
    return text


def report(loaded: LoadedModel, split: str = "validation", max_batches: Optional[int] = None,
           other: Optional[LoadedModel] = None, cache_sim: Optional[tuple[int, str]] = None) -> dict:
    """The full route-stats report as a JSON-ready dict (keys: JSON_KEYS). `cache_sim`: (K, policy)
    to replay the routing through an expert cache of K per layer."""
    if other is not None:
        _check_compatible(loaded, other)
    if cache_sim is not None:
        _check_cache_sim(loaded, *cache_sim)
    loaded.warn_about_lookahead()
    trace = [[] for _ in moe_layers(loaded.model)] if cache_sim is not None else None
    prof, batches, drift = profile(loaded, split, max_batches, other, trace)
    threshold = loaded.cfg.log.collapse_threshold
    layers = []
    for i, (slot, s, e) in enumerate(zip(loaded.slots, prof.summary(), prof.experts)):
        importance = (prof.importance[i] / prof.importance[i].sum().clamp_min(1e-30)).tolist()
        chosen, load = prof.chosen[i].tolist(), prof.load[i].tolist()
        experts = []
        for k in range(e):
            spec = prof.specialisation(i, k)
            for t in spec["top_tokens"]:
                t["text"] = token_text(loaded, t["id"])
            experts.append({
                "expert": k,
                "load": int(load[k]),
                "share": s.share[k],
                "importance": importance[k],
                "drop_fraction": (chosen[k] - load[k]) / chosen[k] if chosen[k] > 0 else 0.0,
                **spec,
            })
        tokens = max(float(prof.tokens[i]), 1.0)
        bins = np.array_split(np.arange(loaded.cfg.data.seq_len), min(POSITION_BINS, loaded.cfg.data.seq_len))
        by_pos = prof.by_position[i, :, :e].cpu().numpy()
        pos_load = np.stack([by_pos[b].sum(0) for b in bins])  # (bins, E)
        pos_share = pos_load / np.maximum(pos_load.sum(1, keepdims=True), 1e-300)
        layers.append({
            "slot": slot,
            "stats": s.to_dict(),
            "collapsed": s.max_over_mean > threshold,
            "experts": experts,
            "coselection": (prof.coselect[i, :e, :e] / tokens).cpu().tolist(),
            "by_position": {"bins": [int(b[0]) for b in bins], "share": pos_share.tolist()},
        })
    out = {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "split": split,
        "batches": len(batches),
        "tokens": int(prof.tokens[0]),
        "collapse_threshold": threshold,
        "layers": layers,
    }
    if cache_sim is not None:
        out["cache_sim"] = simulate_caches(loaded, trace, *cache_sim)
    if other is not None:
        out["compare"] = {
            "other": str(other.checkpoint),
            "layers": [
                {"slot": layer["slot"],
                 "js_divergence": js_divergence(layer["stats"]["share"], drift[i, 2 : 2 + len(layer["experts"])]),
                 "top1_changed": float(drift[i, 0] / max(drift[i, 1], 1))}
                for i, layer in enumerate(layers)
            ],
        }
    return out


def _check_cache_sim(loaded: LoadedModel, capacity: int, policy: str) -> None:
    _check_moe(loaded)
    if policy not in POLICIES:
        raise ConfigError(f"--policy {policy!r}: choose {', '.join(POLICIES)}")
    fewest = min(layer.num_experts for layer in moe_layers(loaded.model))
    if not 1 <= capacity <= fewest:
        raise ConfigError(f"--cache-sim {capacity}: choose 1 to the {fewest} experts of a layer")


def simulate_caches(loaded: LoadedModel, trace: list[list], capacity: int, policy: str) -> dict:
    """Each MoE layer's routing trace replayed through a cache of `capacity` experts (moe/cache.py):
    one pass per token, as decoding one token at a time asks for experts."""
    layers = []
    for slot, layer, passes in zip(loaded.slots, moe_layers(loaded.model), trace):
        c = simulate(passes, layer.num_experts, capacity, policy)
        expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters()) / layer.num_experts
        layers.append({"slot": slot, "requests": c.requests, "hit_rate": c.hit_rate,
                       "random_hit_rate": capacity / layer.num_experts, "static_hit_rate": c.static_hit_rate(capacity),
                       "loads_per_token": c.loads / max(len(passes), 1),
                       "bytes_per_token": c.loads * expert_bytes / max(len(passes), 1)})
    return {"capacity": capacity, "policy": policy, "layers": layers}


def _check_compatible(a: LoadedModel, b: LoadedModel) -> None:
    if a.tokenizer.to_str() != b.tokenizer.to_str():
        raise ConfigError(f"--compare: {b.run_dir} uses another tokenizer, so the same tokens cannot be routed through both")
    if a.slots != b.slots or a.experts != b.experts:
        raise ConfigError(
            f"--compare: the models differ in MoE layers ({a.slots} vs {b.slots}) or experts "
            f"({a.experts} vs {b.experts}); compare checkpoints of the same architecture"
        )


# ---------------------------------------------------------------------------------------- files


def write_outputs(rep: dict, out_dir: Path) -> list[Path]:
    """stats.json, layerNN.csv, load_heatmap.png, coselection_layerNN.png, tensorboard/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "stats.json"]
    (out_dir / "stats.json").write_text(json.dumps(rep, indent=2) + "\n")
    for layer in rep["layers"]:
        path = out_dir / f"layer{layer['slot']:02d}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["expert", "load", "share", "importance", "drop_fraction", "top10_share", "top_tokens"])
            for x in layer["experts"]:
                tops = " ".join(f"{t['text']!r}:{t['lift']:.2f}" for t in x["top_tokens"])
                w.writerow([x["expert"], x["load"], f"{x['share']:.6f}", f"{x['importance']:.6f}",
                            f"{x['drop_fraction']:.6f}", f"{x['top10_share']:.6f}", tops])
        written.append(path)
    slots = [layer["slot"] for layer in rep["layers"]]
    stats = [LayerStats(**layer["stats"]) for layer in rep["layers"]]
    plots.save_png(plots.load_heatmap([s.share for s in stats], slots, rep["step"]), out_dir / "load_heatmap.png")
    written.append(out_dir / "load_heatmap.png")
    tracker = Tracker(out_dir / "tensorboard")
    tracker.routing(slots, stats, rep["step"], histograms=True)
    tracker.heatmap(stats, rep["step"], slots)
    for slot, layer in zip(slots, rep["layers"]):
        co = np.array(layer["coselection"])  # (E, E)
        path = out_dir / f"coselection_layer{slot:02d}.png"
        plots.save_png(plots.coselection(co, slot), path)
        written.append(path)
        tracker.coselection(slot, co, rep["step"])
    tracker.close()
    written.append(out_dir / "tensorboard")
    return written


# ------------------------------------------------------------------------------------- terminal


def _bar(fraction: float, width: int) -> str:
    """A horizontal bar in eighths of a character."""
    eighths = int(round(max(0.0, min(1.0, fraction)) * width * 8))
    full, rest = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[rest - 1] if rest else "")).ljust(width)


def _shown(text: str) -> str:
    return repr(text)[1:-1].replace(" ", "·") or "∅"


def render(rep: dict, width: int = 80) -> list[str]:
    """The report as plain lines of at most `width` characters (markup-free, so it pipes well)."""
    ckpt = rep["checkpoint"] if len(rep["checkpoint"]) <= width - 12 else "…" + rep["checkpoint"][-(width - 13):]
    lines = [f"checkpoint  {ckpt}", f"routed      {rep['tokens']:,} {rep['split']} tokens per MoE layer, "
             f"step {rep['step']}", ""]
    most = []
    for layer in rep["layers"]:
        s, e = layer["stats"], len(layer["experts"])
        cells = ["COLLAPSED"] * layer["collapsed"] + [f"{c.label} {c.format(s[c.name])}" for c in COLUMNS]
        line = f"layer {layer['slot']:02d}"
        for cell in cells:
            if len(line) + 2 + len(cell) > width:
                lines.append(line)
                line = " " * 8
            line += "  " + cell
        lines.append(line)
        lines.append("  exp share (full bar: 2/E)      imp.  drop top10  tokens it takes most (lift)")
        for x in layer["experts"]:
            head = (f"  {x['expert']:>3} {_bar(x['share'] * e / 2, 14)} {100 * x['share']:5.1f}% "
                    f"{100 * x['importance']:5.1f}% {100 * x['drop_fraction']:4.1f}% {100 * x['top10_share']:5.1f}%  ")
            tokens = " ".join(f"{_shown(t['text'])}({t['lift']:.1f})" for t in x["top_tokens"])
            room = width - len(head)
            lines.append(head + (tokens if len(tokens) <= room else tokens[: max(room - 1, 0)] + "…"))
            most.append((x["share"], layer["slot"], x["expert"]))
        lines.append("")
    busiest = max(most)
    idlest = min(most)
    collapsed = [f"{layer['slot']:02d}" for layer in rep["layers"] if layer["collapsed"]]
    lines.append(f"most used:  layer {busiest[1]:02d} expert {busiest[2]} ({100 * busiest[0]:.1f}% of its layer's load)")
    lines.append(f"least used: layer {idlest[1]:02d} expert {idlest[2]} ({100 * idlest[0]:.1f}%)")
    lines.append(f"collapsed layers (max/mean > {rep['collapse_threshold']}): {', '.join(collapsed) or 'none'}")
    if "cache_sim" in rep:
        sim = rep["cache_sim"]
        lines += ["", f"expert cache of {sim['capacity']} per layer ({sim['policy']}), replayed one token at a time:"]
        for c in sim["layers"]:
            lines.append(f"  layer {c['slot']:02d}  hit rate {100 * c['hit_rate']:5.1f}%  (random K/E "
                         f"{100 * c['random_hit_rate']:.1f}%, best fixed K {100 * c['static_hit_rate']:.1f}%)  "
                         f"{c['loads_per_token']:.2f} loads/token")
    if "compare" in rep:
        lines.append("")
        lines.append(f"drift against {rep['compare']['other']}:")
        for c in rep["compare"]["layers"]:
            lines.append(f"  layer {c['slot']:02d}  share divergence (Jensen-Shannon) {c['js_divergence']:.4f} bits; "
                         f"top-1 changed {100 * c['top1_changed']:.1f}%")
    return lines

