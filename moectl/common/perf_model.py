"""A performance model of one expert-parallel MoE layer's training step, after FasterMoE (He et
al., PPoPP 2022): plain arithmetic on measured token counts and a description of the hardware.

For a layout (W processes, expert-parallel groups of N, optionally some experts shadowed and the
exchange overlapped with compute) and the tokens each rank routes to each expert, one layer's
step costs

  compute    3 x the expert FLOPs of the busiest rank / device FLOP/s. Forward is 2 x D x H x m
             FLOPs per routed row (m weight matrices: 3 for SwiGLU, 2 otherwise), backward twice
             that. The busiest rank sets the pace: the others wait for it.
  exchange   4 all-to-alls (dispatch and combine, forward and backward) of D values per row
             that leaves or reaches a rank: for the slowest rank, max(bytes within its node /
             intra-node bandwidth, bytes to other nodes / inter-node bandwidth) + one latency per
             peer. Rows for the rank's own experts and for shadowed experts never travel.
  shadow     per shadowed expert, its parameters broadcast from the owner to the group and its
             gradient reduced back: 2 x parameter bytes / the group's bandwidth + 2 latencies.
  reduce     the expert gradients' all-reduce over the W / N ranks that hold the same experts
             (a ring: 2 (R - 1) / R x bytes / bandwidth); with N = 1 (plain DDP) every expert's.
  total      compute + exchange, or with overlap in C chunks max(compute, exchange) +
             min(compute, exchange) / C (the pipeline's fill and drain) on hardware whose
             transfers run beside its compute (not a CPU's gloo); + shadow + reduce.

FasterMoE's shadowing policy is greedy: take the experts by global load, heaviest first, and
shadow the next one while the predicted time falls. Memory per rank: parameters, gradients and
AdamW's two moments of the experts it holds (its own share and its shadows).

Notation: W processes, N per expert-parallel group, E experts, D model dim, H expert hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Hardware:
    """What the model needs to know of a machine; rates are per device."""

    name: str
    flops: float  # FLOP/s the expert matmuls sustain
    intra_bandwidth: float  # bytes/s a device exchanges with devices of its own node
    inter_bandwidth: float  # bytes/s a device exchanges with other nodes
    latency: float  # seconds per message
    devices_per_node: int
    memory: float  # bytes per device
    nodes: int = 1
    # Whether transfers run beside the compute (a GPU's copy engines and NICs). On a CPU, gloo's
    # transfers take the same cores' time, so overlapping them with the experts hides nothing.
    overlaps: bool = True


# Named machines. `cpu` is the 2-core development machine running one gloo process of one thread
# per core: `python benchmarks/expert_parallel.py --calibrate` measured a 2-process all-to-all's
# latency and bandwidth (0.3-0.4 ms, 0.65-0.75 GB/s), and the experts' matmuls sustained 35
# GFLOP/s per thread in training there (a lone matmul of the same shape: 50-70); the GPU presets
# are round datasheet-level figures for bf16 on H100-class GPUs (NVLink within a node, 400 Gb/s
# per GPU between nodes), to be replaced by measurements where such a machine is at hand.
PRESETS: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware("gpu-node", flops=4e14, intra_bandwidth=2e11, inter_bandwidth=5e10, latency=1e-5,
                 devices_per_node=8, memory=80e9),
        Hardware("gpu-2nodes", flops=4e14, intra_bandwidth=2e11, inter_bandwidth=5e10, latency=1e-5,
                 devices_per_node=8, memory=80e9, nodes=2),
        Hardware("cpu", flops=3.5e10, intra_bandwidth=6.5e8, inter_bandwidth=6.5e8, latency=3.5e-4,
                 devices_per_node=2, memory=24e9 / 2, overlaps=False),
    )
}


@dataclass(frozen=True)
class ExpertShape:
    """One MoE layer's experts."""

    d_model: int
    hidden: int
    num_experts: int
    matrices: int = 3  # 3 for SwiGLU (up, gate, down), 2 for GELU / ReLU
    bytes_per_value: int = 4  # activations and parameters on the wire (4: fp32, 2: bf16)

    @property
    def forward_flops_per_row(self) -> float:
        return 2.0 * self.d_model * self.hidden * self.matrices

    @property
    def parameter_bytes(self) -> float:
        """One expert's parameters."""
        return float(self.d_model * self.hidden * self.matrices * self.bytes_per_value)

    @property
    def row_bytes(self) -> float:
        return float(self.d_model * self.bytes_per_value)


@dataclass(frozen=True)
class Layout:
    world: int  # W
    ep: int  # N
    shadow: tuple[int, ...] = ()  # shadowed experts
    overlap: bool = False
    chunks: int = 4  # pieces each exchange is split into when overlapped

    def check(self, num_experts: int) -> str | None:
        """Why this layout is impossible, or None."""
        if self.world % self.ep:
            return f"EP={self.ep} does not divide {self.world} processes"
        if num_experts % self.ep:
            return f"EP={self.ep} does not divide {num_experts} experts"
        if self.shadow and self.ep == 1:
            return "shadowing needs EP > 1"
        return None


@dataclass
class Estimate:
    """Seconds of one MoE layer's training step, by part; `rows` is what each rank computes."""

    compute: float
    exchange: float
    shadow: float
    reduce: float
    total: float
    rows: list[float] = field(default_factory=list)
    memory: float = 0.0  # bytes of expert state on the fullest rank

    @property
    def imbalance(self) -> float:
        """Busiest rank's rows over the mean (1: balanced)."""
        mean = sum(self.rows) / len(self.rows) if self.rows else 0.0
        return max(self.rows) / mean if mean else 1.0


def owner(expert: int, rank: int, layout: Layout, num_experts: int) -> int:
    """The rank of `rank`'s group that holds `expert`."""
    return (rank // layout.ep) * layout.ep + expert // (num_experts // layout.ep)


def estimate(shape: ExpertShape, hw: Hardware, layout: Layout, counts: Sequence[Sequence[float]]) -> Estimate:
    """One layer's step under `layout`; counts[r][e]: rows rank r routes to expert e per step."""
    problem = layout.check(shape.num_experts)
    if problem:
        raise ValueError(problem)
    w, n, e_total = layout.world, layout.ep, shape.num_experts
    if len(counts) != w or any(len(row) != e_total for row in counts):
        raise ValueError(f"counts must be {w} x {e_total} (processes x experts)")
    shadowed = set(layout.shadow)
    rows = [0.0] * w  # rows each rank computes
    sent = [[0.0] * w for _ in range(w)]  # sent[r][p]: rows r sends to p
    for r in range(w):
        for e in range(e_total):
            c = float(counts[r][e])
            if e in shadowed or n == 1:
                rows[r] += c  # computed where it was routed
                continue
            dest = owner(e, r, layout, e_total)
            rows[dest] += c
            if dest != r:
                sent[r][dest] += c
    compute = 3.0 * max(rows) * shape.forward_flops_per_row / hw.flops
    exchange = 4.0 * max(_exchange_time(r, sent, shape, hw, layout) for r in range(w)) if n > 1 else 0.0
    group_bw = hw.intra_bandwidth if n <= hw.devices_per_node else hw.inter_bandwidth
    shadow = len(shadowed) * 2.0 * (shape.parameter_bytes / group_bw + hw.latency)
    local_experts = e_total // n
    replicas = w // n
    replica_bw = hw.intra_bandwidth if w <= hw.devices_per_node else hw.inter_bandwidth
    reduce = 0.0
    if replicas > 1:
        reduce = 2.0 * (replicas - 1) / replicas * local_experts * shape.parameter_bytes / replica_bw
        reduce += 2.0 * (replicas - 1) * hw.latency
    if layout.overlap and n > 1 and hw.overlaps:
        core = max(compute, exchange) + min(compute, exchange) / layout.chunks
    else:
        core = compute + exchange
    memory = 4.0 * (local_experts + len(shadowed)) * shape.parameter_bytes  # weights, grads, 2 AdamW moments
    return Estimate(compute=compute, exchange=exchange, shadow=shadow, reduce=reduce,
                    total=core + shadow + reduce, rows=rows, memory=memory)


def _exchange_time(r: int, sent: list[list[float]], shape: ExpertShape, hw: Hardware, layout: Layout) -> float:
    """One all-to-all as rank r sees it: the larger of what it sends and receives, per link."""
    node = r // hw.devices_per_node
    intra = inter = 0.0
    peers = 0
    for p in range(len(sent)):
        if p == r or p // layout.ep != r // layout.ep:
            continue
        peers += 1
        volume = max(sent[r][p], sent[p][r]) * shape.row_bytes
        if p // hw.devices_per_node == node:
            intra += volume
        else:
            inter += volume
    return max(intra / hw.intra_bandwidth, inter / hw.inter_bandwidth) + peers * hw.latency


def greedy_shadow(shape: ExpertShape, hw: Hardware, layout: Layout, counts: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """FasterMoE's policy: shadow the heaviest experts, one at a time, while the predicted time falls."""
    if layout.ep == 1:
        return ()
    load = [sum(float(row[e]) for row in counts) for e in range(shape.num_experts)]
    by_load = sorted(range(shape.num_experts), key=lambda e: (-load[e], e))
    chosen: tuple[int, ...] = ()
    best = estimate(shape, hw, _with_shadow(layout, chosen), counts).total
    for e in by_load:
        trial = estimate(shape, hw, _with_shadow(layout, chosen + (e,)), counts).total
        if trial >= best:
            break
        chosen, best = chosen + (e,), trial
    return chosen


def top_shadow(counts: Sequence[Sequence[float]], k: int) -> tuple[int, ...]:
    """The k experts with the most rows over all ranks (ties: the lower id)."""
    experts = range(len(counts[0]))
    load = [sum(float(row[e]) for row in counts) for e in experts]
    return tuple(sorted(experts, key=lambda e: (-load[e], e))[:k])


def _with_shadow(layout: Layout, shadow: tuple[int, ...]) -> Layout:
    return Layout(world=layout.world, ep=layout.ep, shadow=shadow, overlap=layout.overlap, chunks=layout.chunks)


def hardware(name: str, device_type: str) -> Hardware:
    """A preset by name; `auto`: gpu-node on CUDA, else cpu."""
    if name == "auto":
        name = "gpu-node" if device_type == "cuda" else "cpu"
    return PRESETS[name]
