"""Statistics, each computed in one place: perplexity and bits per byte of a loss, and the routing
statistics of routing records (moe/record.py).

`COLUMNS` is the one list of per-layer statistics: TensorBoard's routing scalars, the progress
bar's imbalance, `moectl eval`'s table, route-stats' report and the export model card all show
these names, labels and formats. `summarize()` turns one layer's counts into a `LayerStats`:
the columns plus load (E,) assignments processed per expert, share (E,) = load / sum(load),
and the tokens routed. Population statistics over the E experts throughout.

Padding (record.valid) is in no statistic: it chooses no expert, and the token counts, router
entropies, importance and token lifts are over the real tokens.

Two accumulators, on the device (no host sync per step), over a window of forward passes:
`RoutingStats` holds the counts `summarize` needs (training logs it every log.every steps;
eval reports it); `RoutingProfile` extends it with what route-stats explains: per-expert
importance and drops, top-k co-selection, load by position and load by input token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from moectl.moe import RoutingRecord


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def bits_per_byte(loss: float, tokens: int, num_bytes: float) -> float:
    return loss * tokens / math.log(2) / num_bytes


@dataclass(frozen=True)
class Column:
    name: str  # the LayerStats field, JSON key and TensorBoard tag
    label: str  # its header in tables
    spec: str  # format spec of its value; "%" prints a fraction as a percentage
    meaning: str
    about: str = "load"  # `load`: how the experts' load spreads; `router`: the router's logits and distribution

    def format(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.spec == "%" else format(value, self.spec)


COLUMNS = (
    Column("cv", "cv", ".3f", "std(load) / mean(load) (0 = balanced)"),
    Column("max_over_mean", "max/mean", ".2f", "max(load) / mean(load) (1 = balanced; E / K when all tokens pick the same K)"),
    Column("min_over_mean", "min/mean", ".2f", "min(load) / mean(load)"),
    Column("batch_max_over_mean", "batch m/m", ".2f", "mean over forward passes of each pass's own max/mean load (a "
           "batch's imbalance; in training, with the router's noise)"),
    Column("load_entropy", "entropy", ".3f", "H(share) / log E (1 = balanced, 0 = one expert)"),
    Column("drop_fraction", "drop", "%", "assignments dropped by capacity / assignments chosen"),
    Column("dead_experts", "dead", "d", "experts that processed no token"),
    Column("top20_share", "top20", "%", "share of the load on the busiest 20% of experts (at least one; 0.2 = balanced)"),
    Column("bottom20_share", "bot20", "%", "share of the load on the idlest 20% of experts (at least one)"),
    Column("router_entropy", "router H", ".3f", "mean over tokens of H(p(x)) / log E (1 = the router cannot tell experts "
           "apart)", "router"),
    Column("router_z", "z", ".2f", "mean over tokens of logsumexp(router logits)^2, ST-MoE's z-loss term", "router"),
    Column("logit_spread", "spread", ".2f", "mean over tokens of the std of the router logits over experts (unchanged "
           "by a shift of all logits, which lowers z without changing the routing)", "router"),
)


@dataclass
class LayerStats:
    load: list[int]  # (E,) assignments processed per expert
    share: list[float]  # (E,) load / sum(load)
    tokens: int
    cv: float
    max_over_mean: float
    min_over_mean: float
    load_entropy: float
    router_entropy: float
    drop_fraction: float
    dead_experts: int
    top20_share: float
    bottom20_share: float
    batch_max_over_mean: float = float("nan")  # nan: not measured (a report written before these existed)
    router_z: float = float("nan")
    logit_spread: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def worst_imbalance(layers: list[LayerStats]) -> float:
    """The most imbalanced layer's max/mean load: the progress bar's one routing number."""
    return max(s.max_over_mean for s in layers)


def summarize(
    load: Tensor, entropy_sum: float, tokens: int, dropped: int, z_sum: float = 0.0, spread_sum: float = 0.0,
    batch_peak_sum: float = 0.0, passes: int = 0,
) -> LayerStats:
    """One layer's statistics from its window counts (see COLUMNS): `z_sum` and `spread_sum` sum
    each token's logsumexp(logits)^2 and std of its logits over experts, `batch_peak_sum` each
    forward pass's max/mean load over `passes` passes."""
    load64 = load.detach().double().cpu()
    e = load64.numel()
    total = float(load64.sum())
    mean = total / e
    share = load64 / total if total > 0 else torch.zeros_like(load64)
    nz = share[share > 0]
    h = float(-(nz * nz.log()).sum())
    log_e = math.log(e) if e > 1 else 1.0
    chosen = total + dropped
    fifth = max(1, round(0.2 * e))
    ordered = share.sort(descending=True).values
    return LayerStats(
        load=[int(v) for v in load64.tolist()],
        share=[float(v) for v in share.tolist()],
        tokens=tokens,
        cv=float(load64.std(unbiased=False) / mean) if mean > 0 else 0.0,
        max_over_mean=float(load64.max() / mean) if mean > 0 else 0.0,
        min_over_mean=float(load64.min() / mean) if mean > 0 else 0.0,
        load_entropy=h / log_e if e > 1 else 1.0,
        router_entropy=(entropy_sum / tokens) / log_e if tokens and e > 1 else 0.0,
        drop_fraction=dropped / chosen if chosen > 0 else 0.0,
        dead_experts=int((load64 == 0).sum()),
        top20_share=float(ordered[:fifth].sum()),
        bottom20_share=float(ordered[-fifth:].sum()),
        batch_max_over_mean=batch_peak_sum / passes if passes else float("nan"),
        router_z=z_sum / tokens if tokens else float("nan"),
        logit_spread=spread_sum / tokens if tokens else float("nan"),
    )


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over many steps, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class Sums:
    """Accumulators that only ever add, kept on the device (float64, but float32 on MPS). Data-
    parallel training adds them up over ranks in place (`tensors`); a checkpoint saves them.
    Subclasses name them in FIELDS and create them in `reset`."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=accumulator_dtype(self.device), device=self.device)

    def tensors(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.FIELDS]

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).cpu() for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """A field the state lacks (saved before it existed) keeps its zeros."""
        for name in self.FIELDS:
            if name in state:
                setattr(self, name, state[name].to(self.device, accumulator_dtype(self.device)))


class RoutingStats(Sums):
    """Per-layer routing counts accumulated over a window of forward passes. `experts`: E of each
    layer (one number for all); per-expert counts are stored padded to the largest E."""

    FIELDS = ("load", "entropy_sum", "tokens", "dropped", "z_sum", "spread_sum", "batch_peak_sum", "passes", "skipped")

    def __init__(self, num_layers: int, experts: int | list[int], device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.experts = [experts] * num_layers if isinstance(experts, int) else list(experts)
        self.num_experts = max(self.experts, default=0)
        super().__init__(device)

    def blank(self) -> "RoutingStats":
        """A new, empty accumulator for the same layers."""
        return RoutingStats(self.num_layers, self.experts, self.device)

    def reset(self) -> None:
        self.load = self.zeros(self.num_layers, self.num_experts)
        self.entropy_sum = self.zeros(self.num_layers)
        self.tokens = self.zeros(self.num_layers)
        self.dropped = self.zeros(self.num_layers)
        self.z_sum = self.zeros(self.num_layers)
        self.spread_sum = self.zeros(self.num_layers)
        self.batch_peak_sum = self.zeros(self.num_layers)
        self.passes = self.zeros(self.num_layers)
        self.skipped = self.zeros(self.num_layers)  # assignments left out by dynamic skipping (skip_weak)

    @torch.no_grad()
    def update(self, records: list[RoutingRecord]) -> None:
        dev, dtype = self.device, self.load.dtype
        for i, r in enumerate(records):
            p, logits, e = r.probs.detach(), r.logits.detach().float(), r.num_experts
            real = r.token_mask()[:, None]  # (N, 1) padding adds no entropy and no token
            load = r.tokens_per_expert.to(dev, dtype)
            self.load[i, :e] += load
            self.entropy_sum[i] += -(p * p.clamp_min(1e-20).log() * real).sum().to(dev, dtype)
            self.tokens[i] += r.num_valid().to(dev, dtype)
            self.dropped[i] += r.num_dropped.to(dev, dtype)
            self.z_sum[i] += (torch.logsumexp(logits, -1).square() * real[:, 0]).sum().to(dev, dtype)
            self.spread_sum[i] += (logits.std(-1, unbiased=False) * real[:, 0]).sum().to(dev, dtype)
            routed = load.sum() > 0  # a pass that routed nothing (all padding) has no imbalance
            self.batch_peak_sum[i] += torch.where(routed, load.max() * e / load.sum().clamp_min(1), 0.0)
            self.passes[i] += routed.to(dtype)
            if r.skipped is not None:
                self.skipped[i] += r.skipped.sum().to(dev, dtype)

    def empty(self) -> bool:
        return self.num_layers == 0 or float(self.tokens.sum()) == 0

    def calls_saved(self) -> tuple[list[float], float]:
        """The fraction of the router's choices that dynamic skipping left out, skipped / (computed
        + dropped + skipped): per layer, and over all layers. Host sync."""
        before = self.load.sum(1) + self.dropped + self.skipped
        overall = float(self.skipped.sum() / before.sum().clamp_min(1))
        return (self.skipped / before.clamp_min(1)).tolist(), overall

    def summary(self) -> list[LayerStats]:
        """Host sync: called once per logging window, not per step."""
        entropy, tokens, dropped = self.entropy_sum.tolist(), self.tokens.tolist(), self.dropped.tolist()
        z, spread, peaks, passes = (t.tolist() for t in (self.z_sum, self.spread_sum, self.batch_peak_sum, self.passes))
        return [summarize(self.load[i, : self.experts[i]], entropy[i], int(tokens[i]), round(dropped[i]), z[i], spread[i],
                          peaks[i], round(passes[i])) for i in range(self.num_layers)]


class RoutingProfile(RoutingStats):
    """The window counts plus everything route-stats explains, per MoE layer l:

    chosen (E,) assignments before capacity; importance (E,) summed router probabilities;
    coselect (E, E) tokens that chose both i and j (diagonal: chose i); by_position (T, E) kept
    assignments by position in the sequence; by_token (V, E) kept assignments by input token id.
    For a dense gate, where every expert takes every token (soft routing, a mixture head),
    by_position and by_token sum the gate weights instead, so they still show who takes what.
    `token_counts` (V,) counts every routed token once, the corpus the lifts compare against.
    """

    def __init__(self, num_layers: int, experts: int | list[int], seq_len: int, vocab_size: int, device="cpu"):
        self.seq_len, self.vocab_size = seq_len, vocab_size
        super().__init__(num_layers, experts, device)

    def reset(self) -> None:
        super().reset()
        layers, e = self.num_layers, self.num_experts
        self.chosen = self.zeros(layers, e)
        self.importance = self.zeros(layers, e)
        self.coselect = self.zeros(layers, e, e)
        self.by_position = self.zeros(layers, self.seq_len, e)
        self.by_token = self.zeros(layers, self.vocab_size, e)
        self.token_counts = self.zeros(self.vocab_size)

    @torch.no_grad()
    def update(self, records: list[RoutingRecord], input_ids: Tensor) -> None:
        """`input_ids` (B, T): the tokens the records route, in the same (B*T) order."""
        super().update(records)
        dev, dtype = self.device, self.load.dtype
        ids = input_ids.reshape(-1).to(dev)  # (N,)
        n = ids.numel()
        real = records[0].token_mask().to(dev) if records else torch.ones(n, dtype=torch.bool, device=dev)  # (N,)
        self.token_counts += torch.bincount(ids[real], minlength=self.vocab_size).to(dtype)
        positions = torch.arange(n, device=dev) % input_ids.shape[-1]  # (N,)
        for i, r in enumerate(records):
            e = r.num_experts  # this layer's experts: the first e of the padded columns
            self.chosen[i, :e] += r.chosen_per_expert().to(dev, dtype)
            self.importance[i, :e] += (r.probs.detach().to(dev, dtype) * real[:, None]).sum(0)
            idx = r.expert_idx.to(dev)
            picked = torch.zeros(n, e, dtype=dtype, device=dev).scatter_(1, idx, r.chosen.to(dev, dtype))  # (N, E)
            self.coselect[i, :e, :e] += picked.T @ picked
            dense = r.top_k == e and bool(r.chosen[r.token_mask()].all())  # every expert takes every real token
            mass = r.combine_weights if dense else r.kept  # dense gates: the weight each expert got
            kept = torch.zeros(n, e, dtype=dtype, device=dev).scatter_(1, idx, mass.detach().to(dev, dtype))  # (N, E)
            self.by_position[i, :, :e].index_add_(0, positions, kept)
            self.by_token[i, :, :e].index_add_(0, ids, kept)

    def specialisation(self, i: int, expert: int, top: int = 5, min_count: int = 5) -> dict:
        """Input tokens most over-represented in an expert's assignments, against all routed tokens.

        lift(v) = P(v | expert) / P(v); tokens seen fewer than `min_count` times by the expert are
        skipped (their lifts are noise). `top10_share`: the share of the expert's assignments
        taken by its 10 most frequent tokens, a measure of how concentrated it is.
        """
        counts = self.by_token[i, :, expert]  # (V,)
        total = float(counts.sum())
        if total == 0:
            return {"top_tokens": [], "top10_share": 0.0}
        corpus = self.token_counts / self.token_counts.sum()
        lift = (counts / total) / corpus.clamp_min(1e-30)
        lift[counts < min_count] = 0
        # Highest lift first; among equal lifts (e.g. tokens the expert takes every time), the most frequent.
        best = torch.from_numpy(np.lexsort((-counts.cpu().numpy(), -lift.cpu().numpy()))[:top])
        tokens = [
            {"id": int(v), "count": int(counts[v]), "lift": float(lift[v])} for v in best.tolist() if lift[v] > 0
        ]
        top10 = float(counts.sort(descending=True).values[:10].sum()) / total
        return {"top_tokens": tokens, "top10_share": top10}
