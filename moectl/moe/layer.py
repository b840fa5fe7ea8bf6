"""The MoE layer: (N, D) -> (N, D) plus a routing record. Route -> dispatch -> compute -> combine.

Two implementations of the same function:
- "sorted" (default): assignments sorted by expert, each expert run once on its contiguous slice;
- "loop": the obviously-correct reference, one boolean mask per expert. Tests check they agree.

Notation: N tokens, D model dim, H expert hidden size, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from moectl.moe import dispatch
from moectl.moe.experts import GroupedExperts
from moectl.moe.record import RoutingRecord
from moectl.moe.router import TopKRouter


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        activation: str = "swiglu",
        renormalize: bool = True,
        capacity_factor: Optional[float] = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = TopKRouter(d_model, num_experts, top_k, renormalize, init_std)
        self.experts = GroupedExperts(num_experts, d_model, expert_hidden, activation, init_std)
        self.impl: Literal["sorted", "loop"] = "sorted"

    def capacity(self, num_tokens: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return dispatch.expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)

    def forward(self, x: Tensor, priority: Optional[Tensor] = None) -> tuple[Tensor, RoutingRecord]:
        """(N, D) -> (N, D). `priority` (N,) orders tokens for capacity, lower first (see dispatch.py)."""
        record = self.router(x)  # route
        plan, record = dispatch.plan(record, self.capacity(x.shape[0]), priority)  # sort by expert, drop overflow
        if self.impl == "loop":
            return self._forward_loop(x, record), record
        x_sorted = dispatch.gather(x, plan)  # (M, D)
        y_sorted = self.experts(x_sorted, plan.tokens_per_expert)  # (M, D)
        return dispatch.combine(y_sorted, plan, record), record

    def _forward_loop(self, x: Tensor, record: RoutingRecord) -> Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where((record.expert_idx == e) & record.kept)  # (n_e,), (n_e,)
            if token.numel():
                w = record.weights[token, slot].to(x.dtype)[:, None]  # (n_e, 1)
                out = out.index_add(0, token, w * self.experts.forward_expert(e, x[token]))
        return out
