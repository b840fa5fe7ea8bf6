"""Routing statistics, computed in one place from routing records.

`RoutingStats` accumulates counts over a window of steps on the device (no host sync per
step); `summarize()` turns a layer's counts into the numbers training logs and, later, eval
and route-stats report. Definitions (E experts; load_i = assignments expert i processed):

- share_i          load_i / sum(load)
- cv               std(load) / mean(load), population std over the E experts (0 = balanced)
- max_over_mean    max(load) / mean(load) (1 = balanced; E / K when every token picks the same K)
- min_over_mean    min(load) / mean(load)
- load_entropy     H(share) / log E (1 = balanced, 0 = one expert)
- router_entropy   mean over tokens of H(p(x)) / log E (1 = the router cannot tell experts apart)
- drop_fraction    assignments dropped by capacity / assignments chosen
- dead_experts     experts that processed no token in the window
- top20_share      share of the load on the busiest 20% of experts (at least one); 0.2 = balanced
- bottom20_share   share of the load on the idlest 20% of experts (at least one); 0.2 = balanced

`RoutingProfile` (route-stats) accumulates more per layer from the same records: per-expert
importance and drops, top-k co-selection, load by position and load by input token, and turns
the layer counts into the same `LayerStats` through `summarize`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from moectl.moe import RoutingRecord


@dataclass
class LayerStats:
    load: list[int]  # (E,) assignments processed per expert
    share: list[float]  # (E,) load / sum(load)
    cv: float
    max_over_mean: float
    min_over_mean: float
    load_entropy: float
    router_entropy: float
    drop_fraction: float
    dead_experts: int
    tokens: int
    top20_share: float = 0.0
    bottom20_share: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(load: Tensor, entropy_sum: float, tokens: int, dropped: int) -> LayerStats:
    """One layer's statistics from its window counts (see the module docstring)."""
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
        cv=float(load64.std(unbiased=False) / mean) if mean > 0 else 0.0,
        max_over_mean=float(load64.max() / mean) if mean > 0 else 0.0,
        min_over_mean=float(load64.min() / mean) if mean > 0 else 0.0,
        load_entropy=h / log_e if e > 1 else 1.0,
        router_entropy=(entropy_sum / tokens) / log_e if tokens and e > 1 else 0.0,
        drop_fraction=dropped / chosen if chosen > 0 else 0.0,
        dead_experts=int((load64 == 0).sum()),
        tokens=tokens,
        top20_share=float(ordered[:fifth].sum()),
        bottom20_share=float(ordered[-fifth:].sum()),
    )


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over many steps, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class RoutingStats:
    """Per-layer routing counts accumulated over a window of forward passes."""

    FIELDS = ("load", "entropy_sum", "tokens", "dropped")

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        z = lambda *shape: torch.zeros(*shape, dtype=accumulator_dtype(self.device), device=self.device)  # noqa: E731
        self.load = z(self.num_layers, self.num_experts)
        self.entropy_sum = z(self.num_layers)
        self.tokens = z(self.num_layers)
        self.dropped = z(self.num_layers)

    @torch.no_grad()
    def update(self, records: list[RoutingRecord]) -> None:
        for i, r in enumerate(records):
            p = r.probs.detach()
            self.load[i] += r.tokens_per_expert.to(self.load.dtype)
            self.entropy_sum[i] += -(p * p.clamp_min(1e-20).log()).sum().to(self.load.dtype)
            self.tokens[i] += r.num_tokens
            self.dropped[i] += r.num_dropped.to(self.load.dtype)

    def tensors(self) -> list[Tensor]:
        """The accumulators, all sums: data-parallel training adds them up over ranks in place."""
        return [getattr(self, name) for name in self.FIELDS]

    def empty(self) -> bool:
        return self.num_layers == 0 or float(self.tokens.sum()) == 0

    def summary(self) -> list[LayerStats]:
        """Host sync: called once per logging window, not per step."""
        entropy, tokens, dropped = self.entropy_sum.tolist(), self.tokens.tolist(), self.dropped.tolist()
        return [summarize(self.load[i], entropy[i], int(tokens[i]), int(dropped[i])) for i in range(self.num_layers)]

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).cpu() for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name].to(self.device, accumulator_dtype(self.device)))


class RoutingProfile:
    """Everything route-stats reports, accumulated per MoE layer over batches (float64 counts but on MPS).

    Per layer l: load (E,) kept assignments; chosen (E,) before capacity; importance (E,) summed
    router probabilities; coselect (E, E) tokens that chose both i and j (diagonal: chose i);
    by_position (T, E) kept assignments by position in the sequence; by_token (V, E) kept
    assignments by input token id; plus the router-entropy sum and token count. `token_counts`
    (V,) counts every routed token once, the corpus the lifts compare against.
    """

    def __init__(self, num_layers: int, num_experts: int, seq_len: int, vocab_size: int, device="cpu"):
        dtype = accumulator_dtype(device)
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.num_experts, self.seq_len = num_experts, seq_len
        self.load = z(num_layers, num_experts)
        self.chosen = z(num_layers, num_experts)
        self.importance = z(num_layers, num_experts)
        self.coselect = z(num_layers, num_experts, num_experts)
        self.by_position = z(num_layers, seq_len, num_experts)
        self.by_token = z(num_layers, vocab_size, num_experts)
        self.entropy_sum = z(num_layers)
        self.tokens = z(num_layers)
        self.token_counts = z(vocab_size)

    @torch.no_grad()
    def update(self, records: list[RoutingRecord], input_ids: Tensor) -> None:
        """`input_ids` (B, T): the tokens the records route, in the same (B*T) order."""
        dev, dtype = self.load.device, self.load.dtype
        ids = input_ids.reshape(-1).to(dev)  # (N,)
        n, e = ids.numel(), self.num_experts
        self.token_counts += torch.bincount(ids, minlength=self.token_counts.numel()).to(dtype)
        positions = torch.arange(n, device=dev) % input_ids.shape[-1]  # (N,)
        for i, r in enumerate(records):
            p = r.probs.detach().to(dev, dtype)
            self.load[i] += r.tokens_per_expert.to(dev, dtype)
            self.chosen[i] += r.chosen_per_expert().to(dev, dtype)
            self.importance[i] += p.sum(0)
            self.entropy_sum[i] += -(p * p.clamp_min(1e-20).log()).sum()
            self.tokens[i] += n
            idx = r.expert_idx.to(dev)
            picked = torch.zeros(n, e, dtype=dtype, device=dev)  # (N, E) 1 where chosen
            picked.scatter_(1, idx, r.chosen.to(dev, dtype))
            self.coselect[i] += picked.T @ picked
            kept = torch.zeros(n, e, dtype=dtype, device=dev)  # (N, E) 1 where kept
            kept.scatter_(1, idx, r.kept.to(dev, dtype))
            self.by_position[i].index_add_(0, positions, kept)
            self.by_token[i].index_add_(0, ids, kept)

    def layer_stats(self, i: int) -> LayerStats:
        dropped = float((self.chosen[i] - self.load[i]).sum())
        return summarize(self.load[i], float(self.entropy_sum[i]), int(self.tokens[i]), int(round(dropped)))

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
