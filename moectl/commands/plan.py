"""`moectl plan`: what would this model's training step cost on another machine, laid out how?

From a trained run it takes the model's shape and each MoE layer's routing (the per-expert
loads route-stats measures on the validation split), and from a hardware description (a preset
of moectl/common/perf_model.py or a small YAML file) the device count, rates and memory. For each
candidate layout (plain DDP, every expert-parallel size that divides the processes and the
experts, each alone, with FasterMoE's shadowing, and with shadowing and overlap) it predicts:

  step       dense compute (6 FLOPs per parameter per token plus attention, Kaplan et al.'s
             count) + the dense gradients' all-reduce + each MoE layer's step (perf_model)
  comm       the share of the step spent communicating (all-to-alls, all-reduces, broadcasts)
  memory     per process: dense parameters, gradients and AdamW moments (16 bytes each), plus
             the experts it holds; activations are not counted
  imbalance  the busiest process's expert rows over the mean, worst layer

and recommends the simplest layout that fits in memory and is within 2% (NEAR_BEST) of the
fastest one's step: plain DDP before expert parallelism, which comes before shadowing, which
comes before overlap, and a smaller EP before a larger one; a prediction is not exact enough to
pay for more machinery with a gain inside its error. Layouts that cannot run say why instead.
Each process routes the global batch's tokens with the measured shares, so routing skew is in
the estimate but differences between processes are not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from torch import nn

from moectl.commands import route_stats
from moectl.common.errors import ConfigError
from moectl.common.perf_model import PRESETS, ExpertShape, Hardware, Layout, estimate, greedy_shadow
from moectl.config import Config, yaml_load
from moectl.models import moe_layers
from moectl.services.loaded_model import LoadedModel

JSON_KEYS = {
    "hardware": "the hardware description used (name, flops, intra_bandwidth, inter_bandwidth, latency, "
    "devices_per_node, memory, nodes)",
    "world": "processes: nodes x devices_per_node",
    "tokens_per_step": "train.batch_size x data.seq_len",
    "layouts": "one entry per candidate: name, ep, shadow (experts shadowed, summed over layers), overlap, step_ms, "
    "comm_share, memory_gb, imbalance, feasible, reason (why not, or null)",
    "recommended": "the name of the simplest feasible layout within 2% of the fastest one's step time (see "
    "complexity), or null",
    "fastest": "the name of the fastest feasible layout, or null",
}
NEAR_BEST = 0.02  # a layout this close to the fastest step counts as fast as it
HARDWARE_KEYS = ("flops", "intra_bandwidth", "inter_bandwidth", "latency", "devices_per_node", "memory")


@dataclass
class Prediction:
    name: str
    ep: int
    shadow: int
    overlap: bool
    step_ms: float
    comm_share: float
    memory_gb: float
    imbalance: float
    feasible: bool
    reason: Optional[str]


def read_hardware(value: str) -> Hardware:
    """A preset name, or a YAML file with name, nodes and overlaps (optional) and HARDWARE_KEYS."""
    if value in PRESETS:
        return PRESETS[value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--hardware {value}: neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of {', '.join(HARDWARE_KEYS)}")
    unknown = sorted(set(raw) - set(HARDWARE_KEYS) - {"name", "nodes", "overlaps"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; expected {', '.join(HARDWARE_KEYS)}, name, nodes, overlaps")
    if not isinstance(raw.get("overlaps", True), bool):
        raise ConfigError(f"{path}: overlaps={raw['overlaps']!r} must be true or false (whether transfers run beside compute)")
    values: dict[str, Any] = {}
    for key in HARDWARE_KEYS + ("nodes",):
        if key not in raw:
            if key == "nodes":
                continue
            raise ConfigError(f"{path}: missing key '{key}'")
        value = raw[key]
        integer = key in ("devices_per_node", "nodes")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (integer and value != int(value)):
            raise ConfigError(f"{path}: {key}={value!r} must be a positive {'integer' if integer else 'number'}")
        values[key] = int(value) if integer else float(value)
    return Hardware(name=str(raw.get("name", path.stem)), overlaps=raw.get("overlaps", True), **values)


def _dense_flops_per_token(cfg: Config, dense_params: int) -> float:
    """Forward + backward FLOPs per token outside the experts: 6 per parameter, plus attention's
    6 x 2 x layers x context x d_model for the Transformer."""
    attention = 12.0 * cfg.model.n_layers * cfg.data.seq_len * cfg.model.d_model if cfg.model.backbone == "transformer" else 0.0
    return 6.0 * dense_params + attention


def assignments_per_token(moe) -> float:
    """Expert rows one token costs on average (the router's active_experts): K; K in each of the
    group_top_k chosen groups for the hierarchical router; capacity factor x K for expert choice;
    every expert for soft routing."""
    if moe.router == "soft":
        return float(moe.num_experts)
    if moe.router == "expert_choice":
        return min((moe.capacity_factor or 1.0) * moe.top_k, float(moe.num_experts))
    return float(moe.top_k * (moe.group_top_k if moe.router == "hierarchical" else 1))


def predict(cfg: Config, hw: Hardware, dense_params: int, loads: list[list[float]], world: int, ep: int,
            shadow: bool, overlap: bool) -> Prediction:
    """One layout's step. `dense_params`: parameters outside the experts that act per token
    (embedding rows are looked up, not multiplied, and left out); `loads`: each MoE layer's
    per-expert assignments, in any unit (they are normalised)."""
    moe = cfg.moe
    name = "DDP" if ep == 1 else f"EP={ep}" + (" +shadow" if shadow else "") + (" +overlap" if overlap else "")
    problem = Layout(world=world, ep=ep).check(moe.num_experts)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    if problem:
        return Prediction(name, ep, 0, overlap, 0.0, 0.0, 0.0, 0.0, False, problem)
    value_bytes = 2 if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and hw.name.startswith("gpu")) else 4
    matrices = 3 if cfg.model.activation == "swiglu" else 2
    shape = ExpertShape(cfg.model.d_model, moe.expert_hidden, moe.num_experts, matrices, value_bytes)
    dense_compute = _dense_flops_per_token(cfg, dense_params) * tokens / world / hw.flops
    bw = hw.intra_bandwidth if world <= hw.devices_per_node else hw.inter_bandwidth
    dense_reduce = 2.0 * (world - 1) / world * dense_params * value_bytes / bw + 2.0 * (world - 1) * hw.latency
    total, comm, shadows, memory, imbalance = dense_compute + dense_reduce, dense_reduce, 0, 16.0 * dense_params, 1.0
    assignments = tokens * assignments_per_token(moe)
    for layer_load in loads:
        share = [x / max(sum(layer_load), 1e-30) for x in layer_load]
        counts = [[assignments / world * s for s in share] for _ in range(world)]
        layout = Layout(world=world, ep=ep, overlap=overlap)
        if shadow:
            layout = Layout(world=world, ep=ep, overlap=overlap,
                            shadow=greedy_shadow(shape, hw, layout, counts))
        est = estimate(shape, hw, layout, counts)
        total += est.total
        comm += est.exchange + est.reduce + est.shadow
        shadows += len(layout.shadow)
        memory += est.memory / shape.bytes_per_value * 4  # fp32 master weights, gradients and moments
        imbalance = max(imbalance, est.imbalance)
    feasible, reason = memory <= hw.memory, None
    if not feasible:
        reason = f"needs {memory / 1e9:.1f} GB per process, the device has {hw.memory / 1e9:.1f} GB"
    return Prediction(name, ep, shadows, overlap, total * 1e3, comm / total if total else 0.0, memory / 1e9,
                      imbalance, feasible, reason)


def candidates(cfg: Config, hw: Hardware, dense_params: int, loads: list[list[float]]) -> list[Prediction]:
    """DDP, then EP = 2, 4, ... up to the experts (those that cannot run, with their reason),
    each alone, with shadowing, and with shadowing and the overlapped exchange."""
    world, experts = hw.nodes * hw.devices_per_node, cfg.moe.num_experts
    sizes = [2**i for i in range(1, 31) if 2**i <= min(experts, world)]
    if experts <= world and experts not in sizes:
        sizes.append(experts)
    out = [predict(cfg, hw, dense_params, loads, world, 1, False, False)]
    for ep in sizes:
        for shadow, overlap in ((False, False), (True, False), (True, True)):
            out.append(predict(cfg, hw, dense_params, loads, world, ep, shadow, overlap))
    return out


def dense_parameters(model: nn.Module) -> int:
    """Parameters that multiply each token outside the routed experts: all but the experts and
    the embedding table, plus the output matrix when it is the tied embedding."""
    experts = sum(p.numel() for layer in moe_layers(model) for p in layer.experts.parameters())
    embed = model.embed.weight
    tied = getattr(getattr(model, "lm_head", None), "weight", None) is embed
    return sum(p.numel() for p in model.parameters()) - experts - (0 if tied else embed.numel())


def routing_loads(loaded: LoadedModel, max_batches: Optional[int]) -> list[list[float]]:
    """Each MoE layer's assignments per expert over the validation split (route-stats' loads)."""
    rep = route_stats.report(loaded, "validation", max_batches)
    return [[float(e["load"]) for e in layer["experts"]] for layer in rep["layers"][: len(moe_layers(loaded.model))]]


def complexity(p: Prediction) -> tuple[int, int]:
    """How much machinery a layout needs, to choose between layouts about as fast: the features it
    turns on (expert parallelism, shadowing, overlap), then the size of its expert-parallel groups."""
    return (p.ep > 1) + ("+shadow" in p.name) + p.overlap, p.ep


def recommend(rows: list[Prediction]) -> tuple[Optional[Prediction], Optional[Prediction]]:
    """(recommended, fastest) of the feasible layouts: the simplest within NEAR_BEST of the fastest."""
    feasible = [r for r in rows if r.feasible]
    if not feasible:
        return None, None
    fastest = min(feasible, key=lambda r: r.step_ms)
    near = [r for r in feasible if r.step_ms <= fastest.step_ms * (1 + NEAR_BEST)]
    return min(near, key=lambda r: (complexity(r), r.step_ms)), fastest


def report(cfg: Config, hw: Hardware, dense_params: int, loads: list[list[float]]) -> dict:
    """The plan as a JSON-ready dict (keys: JSON_KEYS)."""
    rows = candidates(cfg, hw, dense_params, loads)
    best, fastest = recommend(rows)
    return {
        "hardware": asdict(hw),
        "world": hw.nodes * hw.devices_per_node,
        "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        "layouts": [asdict(r) for r in rows],
        "recommended": best.name if best else None,
        "fastest": fastest.name if fastest else None,
    }


LEGEND = [
    "step ms: predicted time of one training step (compute, the dense gradients' all-reduce, each MoE layer's exchange)",
    "comm: the share of that step spent communicating (all-to-alls, all-reduces, shadowed experts' broadcasts)",
    "GB/proc: memory per process for weights, gradients and AdamW moments (activations not counted)",
    "imbal: the busiest process's expert rows over the mean, worst MoE layer (1.00: even)",
    f"recommended: the simplest layout that fits within {NEAR_BEST:.0%} of the fastest step; simplest first: "
    "DDP, EP=N (smaller N first), +shadow, +overlap",
]


def render(rep: dict) -> list[str]:
    """The plan for people: one line per layout, the recommended one marked, and what the columns mean."""
    hw = rep["hardware"]
    lines = [
        f"hardware {hw['name']}: {rep['world']} processes ({hw['nodes']} x {hw['devices_per_node']}), "
        f"{hw['flops'] / 1e12:g} TFLOP/s, {hw['intra_bandwidth'] / 1e9:g} / {hw['inter_bandwidth'] / 1e9:g} GB/s "
        f"within / between nodes, {hw['memory'] / 1e9:g} GB each; {rep['tokens_per_step']} tokens per step",
        f"{'layout':<24}{'step ms':>10}{'comm':>7}{'GB/proc':>9}{'imbal':>7}  note",
    ]
    for r in rep["layouts"]:
        mark = {rep["fastest"]: "<- fastest", rep["recommended"]: "<- recommended"}.get(r["name"], "")
        if r["reason"] and not r["step_ms"]:
            lines.append(f"{r['name']:<24}{'-':>10}{'-':>7}{'-':>9}{'-':>7}  {r['reason']}")
            continue
        note = r["reason"] or mark
        if r["shadow"]:
            note = f"{r['shadow']} experts shadowed over the layers" + (f"; {note}" if note else "")
        lines.append(f"{r['name']:<24}{r['step_ms']:>10.2f}{r['comm_share']:>6.0%} {r['memory_gb']:>8.2f}"
                     f"{r['imbalance']:>7.2f}  {note}")
    if rep["recommended"] is None:
        lines.append("no layout fits in the device's memory")
    elif rep["fastest"] != rep["recommended"]:
        fastest = next(r for r in rep["layouts"] if r["name"] == rep["fastest"])
        chosen = next(r for r in rep["layouts"] if r["name"] == rep["recommended"])
        lines.append(f"{rep['recommended']} rather than the fastest, {rep['fastest']}: a step "
                     f"{chosen['step_ms'] / fastest['step_ms'] - 1:.1%} longer, with less machinery")
    return lines + [""] + LEGEND
