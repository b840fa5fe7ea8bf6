"""Token dispatch: sort assignments by expert, apply capacity, and undo the sort.

An assignment is one (token, slot) pair; there are N*K of them. They are numbered k-major,
a = k*N + n, so that under capacity every token's first choice outranks any token's second
choice (GShard's priority), and earlier tokens outrank later ones within a slot.

Memory is O(N*K*D): no (N, E, capacity) one-hot tensor, no weight copy per token.

Notation: N tokens, D model dim, E experts, K experts per token, M kept assignments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moectl.moe.record import RoutingRecord


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """capacity = ceil(capacity_factor * N * K / E) (Switch Transformer)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class DispatchPlan:
    assignments: Tensor  # (M,) int64 kept assignment ids a = k*N + n, grouped by expert
    tokens: Tensor  # (M,) int64 token of each kept assignment, a % N
    tokens_per_expert: list[int]  # E host ints: the split sizes of `assignments`


def plan(record: RoutingRecord, capacity: Optional[int]) -> tuple[DispatchPlan, RoutingRecord]:
    """Group assignments by expert and drop those past `capacity` (None: dropless).

    Returns the plan and the record updated with kept / weights / tokens_per_expert / num_dropped.
    """
    n, k = record.expert_idx.shape
    num_experts = record.num_experts
    flat_expert = record.expert_idx.t().reshape(-1)  # (K, N) -> (K*N,) expert of assignment a
    # Stable sort keeps assignment order (slot, then position) within each expert.
    order = torch.sort(flat_expert, stable=True).indices  # (K*N,) assignment ids grouped by expert
    chosen = torch.bincount(flat_expert, minlength=num_experts)  # (E,)
    if capacity is None:
        kept_sorted = None
        assignments = order
        counts = chosen
    else:
        starts = torch.cumsum(chosen, 0) - chosen  # (E,) first sorted position of each expert
        rank = torch.arange(n * k, device=order.device) - starts[flat_expert[order]]  # (K*N,) rank within expert
        kept_sorted = rank < capacity
        assignments = order[kept_sorted]
        counts = chosen.clamp(max=capacity)
    kept = torch.ones(k * n, dtype=torch.bool, device=order.device)
    if kept_sorted is not None:
        kept[order] = kept_sorted
    kept = kept.view(k, n).t()  # (K*N,) -> (N, K)
    record = dataclasses.replace(
        record,
        weights=record.weights * kept,
        kept=kept,
        tokens_per_expert=counts,
        num_dropped=(chosen - counts).sum(),
    )
    # Host sync: torch.split needs the per-expert sizes as Python ints.
    sizes = counts.tolist()
    return DispatchPlan(assignments=assignments, tokens=assignments % n, tokens_per_expert=sizes), record


def gather(x: Tensor, plan: DispatchPlan) -> Tensor:
    """(N, D) -> (M, D): each kept assignment's token, grouped by expert."""
    return x.index_select(0, plan.tokens)


def combine(y: Tensor, plan: DispatchPlan, record: RoutingRecord) -> Tensor:
    """(M, D) expert outputs -> (N, D) = sum over kept slots of weight * output.

    Scattering into a (K*N, D) buffer and summing over K is deterministic, unlike index_add
    with repeated token ids under CUDA atomics.
    """
    n, k = record.expert_idx.shape
    flat_weights = record.weights.t().reshape(-1)  # (K, N) -> (K*N,) weight of assignment a
    w = flat_weights.index_select(0, plan.assignments).to(y.dtype)  # (M,)
    buf = y.new_zeros(k * n, y.shape[1])  # (K*N, D)
    buf = buf.index_copy(0, plan.assignments, y * w[:, None])
    return buf.view(k, n, y.shape[1]).sum(0)  # (K, N, D) -> (N, D)
