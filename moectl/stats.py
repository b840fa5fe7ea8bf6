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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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
