"""Token dispatch: sort assignments by expert, apply capacity, and undo the sort.

An assignment is one chosen (token, slot) pair; there are at most N*K of them, numbered
token-major, a = n*K + k. Under capacity each expert serves its assignments in one of two orders:
- token-major (position priority): by the token's `priority` (lower first; the backbones pass each
  token's position in its sequence), ties broken by token, then by slot. A causal LM stays causal:
  a token is only ever displaced by tokens at the same or earlier positions, never by later ones.
- rank by rank (`by_rank`): every token's first choice, in priority order, before any token's
  second choice, and so on, so a second choice never takes the slot of another token's first
  choice. With position priority this is GShard's Algorithm 1 (drop_policy `rank`); with the
  largest routing weight first, Riquelme et al. 2021's batch-prioritised routing (`probability`).
  A token's k-th choice is the slot with its k-th largest routing weight (a hierarchical router's
  slots are ordered by group, not weight).

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
    assignments: Tensor  # (M,) int64 kept assignment ids a = n*K + k, grouped by expert
    tokens: Tensor  # (M,) int64 token of each kept assignment, a // K
    tokens_per_expert: list[int]  # E host ints: the split sizes of `assignments`


def plan(
    record: RoutingRecord, capacity: Optional[int], priority: Optional[Tensor] = None, by_rank: bool = False
) -> tuple[DispatchPlan, RoutingRecord]:
    """Group the chosen assignments by expert and drop those past `capacity` (None: dropless).

    `priority` (N,) orders tokens for capacity (lower is served first); None means token order.
    `by_rank` serves all first choices before any second choice (see above).
    Returns the plan and the record updated with kept / tokens_per_expert / num_dropped.
    """
    n, k = record.expert_idx.shape
    num_experts = record.num_experts
    # Slots the router did not choose go to a virtual expert E, which sorts last and is never run.
    flat_expert = torch.where(record.chosen, record.expert_idx, num_experts).reshape(-1)  # (N*K,) a = n*K + k
    bucket_counts = torch.bincount(flat_expert, minlength=num_experts + 1)  # (E+1,)
    chosen = bucket_counts[:num_experts]  # (E,)
    if capacity is None:
        order = torch.sort(flat_expert, stable=True).indices  # (N*K,) grouped by expert
        counts = chosen
        kept = record.chosen
    else:
        # Stable sorts from the least to the most significant key: priority, (rank), expert.
        queue = torch.arange(n * k, device=flat_expert.device)  # (N*K,) token-major
        if priority is not None:
            queue = torch.sort(priority.repeat_interleave(k), stable=True).indices
        if by_rank:
            rank = torch.argsort(torch.argsort(-record.weights, dim=1, stable=True), dim=1).reshape(-1)  # (N*K,)
            queue = queue[torch.sort(rank[queue], stable=True).indices]
        order = queue[torch.sort(flat_expert[queue], stable=True).indices]
        starts = torch.cumsum(bucket_counts, 0) - bucket_counts  # (E+1,) first sorted position of each expert
        sorted_expert = flat_expert[order]
        rank = torch.arange(n * k, device=order.device) - starts[sorted_expert]  # (N*K,) place in queue
        kept_sorted = (rank < capacity) & (sorted_expert < num_experts)
        kept = torch.empty(n * k, dtype=torch.bool, device=order.device)
        kept[order] = kept_sorted
        kept = kept.view(n, k)  # (N*K,) -> (N, K)
        counts = chosen.clamp(max=capacity)
    # Host sync: torch.split needs the per-expert sizes as Python ints.
    sizes = counts.tolist()
    assignments = order[: sum(sizes)] if capacity is None else order[kept_sorted]
    record = dataclasses.replace(record, kept=kept, tokens_per_expert=counts, num_dropped=(chosen - counts).sum())
    return DispatchPlan(assignments=assignments, tokens=assignments // k, tokens_per_expert=sizes), record


def gather(x: Tensor, plan: DispatchPlan) -> Tensor:
    """(N, D) -> (M, D): each kept assignment's token, grouped by expert."""
    return x.index_select(0, plan.tokens)


def combine(y: Tensor, plan: DispatchPlan, record: RoutingRecord) -> Tensor:
    """(M, D) expert outputs -> (N, D) = sum over kept slots of weight * output.

    Each token reads its K slots' rows of `y` (a gather: deterministic, unlike index_add with
    repeated token ids under CUDA atomics) and mixes them with one batched matmul; the backward
    gathers too (_Combine)."""
    n, k = record.expert_idx.shape
    m = plan.assignments.numel()
    if m == 0:  # every assignment dropped: nothing reaches the output
        return y.new_zeros(n, y.shape[1]) + 0.0 * record.weights.sum().to(y.dtype)
    # row[a]: the row of y holding slot a's output (slots nothing was kept for: -1)
    row = torch.full((n * k,), -1, dtype=torch.int64, device=y.device)
    row[plan.assignments] = torch.arange(m, device=y.device)
    return _Combine.apply(y, record.weights.to(y.dtype), row.view(n, k), plan.assignments)


_FMA_MAX_K = 4  # up to this many slots per token, combine with one multiply-add per slot


class _Combine(torch.autograd.Function):
    """out[n] = sum_k w[n, k] * y[row[n, k]] over the kept slots (y: (M, D), w and row: (N, K),
    row -1 for a slot nothing was kept for).

    Forward: gather the (N, K, D) slot outputs (kept for the backward: O(N·K·D), as y) and
    contract them with the weights: one fused multiply-add per slot for small K (a batched
    matmul of N (1, K) @ (K, D) products is several times slower there: 8x at K = 1), one
    batched matmul beyond. Backward: dw[n, k] = <g[n], slot[n, k]>
    from the saved slots; dy[m] = w[a] * g[a // K] for the slot a = assignments[m] that row m
    serves: a gather in y's own order, never a scatter."""

    @staticmethod
    def forward(ctx, y, w, row, assignments):
        kept = row >= 0  # (N, K)
        slots = y.index_select(0, row.clamp(min=0).reshape(-1)).view(*row.shape, y.shape[1])  # (N, K, D)
        w_kept = w * kept  # a dropped slot reads some row but weighs 0
        ctx.save_for_backward(slots, w, kept, assignments)
        ctx.k = row.shape[1]
        if ctx.k > _FMA_MAX_K:
            return torch.bmm(w_kept.unsqueeze(1), slots).squeeze(1)  # (N, 1, K) @ (N, K, D) -> (N, D)
        out = slots[:, 0] * w_kept[:, :1]
        for k in range(1, ctx.k):
            out.addcmul_(slots[:, k], w_kept[:, k : k + 1])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        slots, w, kept, assignments = ctx.saved_tensors
        g = grad_out.contiguous()
        dy = dw = None
        if ctx.needs_input_grad[0]:  # row m of y served slot a = assignments[m]: token a // K
            dy = g.index_select(0, assignments // ctx.k) * w.reshape(-1).index_select(0, assignments)[:, None]  # (M, D)
        if ctx.needs_input_grad[1]:
            dw = (slots * g.unsqueeze(1)).sum(-1) * kept  # (N, K)
        return dy, dw, None, None
