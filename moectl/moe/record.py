"""The routing record: the one vocabulary every consumer of routing speaks.

The router fills in what it decided (logits, probs, chosen experts and their weights); the
dispatcher adds what capacity allowed (kept, tokens per expert, dropped). The aux losses,
TensorBoard statistics, eval and route-stats all read this record and nothing else.

Every router fits one shape: each token has K slots, slot k names an expert and a weight.
Top-k routers fill all N*K slots. GShard's random routing leaves some second slots unchosen;
expert choice and soft routing use K = E slots (slot k is expert k), chosen where that expert
takes the token. `chosen` marks the slots the router used; `kept` the subset capacity allowed.

Padding (`valid`, e.g. the pad of an unpacked instruction-tuning row) keeps its rows, so the
record still lines up with the batch, but no slot of it is chosen, and every mean over tokens
(the losses' P_i and z-loss, the statistics) is over the valid tokens alone (`masked_mean`).

Notation: N tokens, E experts, K slots per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RoutingRecord:
    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor  # (N, E) fp32 router distribution over experts (softmax, or normalised sigmoid scores)
    expert_idx: Tensor  # (N, K) int64 expert of each slot, best first for top-k routers
    weights: Tensor  # (N, K) fp32 the router's combine weight of each slot; 0 where not chosen
    chosen: Tensor  # (N, K) bool, the slots the router used
    kept: Tensor  # (N, K) bool, chosen and within capacity: the slots the layer computes
    tokens_per_expert: Tensor  # (E,) int64 assignments each expert actually processed
    num_dropped: Tensor  # () int64 chosen assignments dropped by capacity
    load: Optional[Tensor] = None  # (E,) differentiable load estimate (noisy top-k's smooth estimator)
    counted: Optional[Tensor] = None  # (N, K) bool: the slots the load-balancing loss counts (None: all chosen)
    group: Optional["RoutingRecord"] = None  # hierarchical MoE: the primary gate's record over groups
    valid: Optional[Tensor] = None  # (N,) bool: real tokens, not padding; None: every token is real
    skipped: Optional[Tensor] = None  # (N, K) bool, slots the router chose but skip_weak left out; None: no skipping

    @property
    def num_tokens(self) -> int:
        return self.expert_idx.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_idx.shape[1]

    def token_mask(self) -> Tensor:
        """(N,) bool: the tokens that are not padding."""
        if self.valid is None:
            return torch.ones(self.num_tokens, dtype=torch.bool, device=self.expert_idx.device)
        return self.valid

    def num_valid(self) -> Tensor:
        """() the number of real tokens, on the device (no host sync)."""
        return self.token_mask().sum()

    @property
    def combine_weights(self) -> Tensor:
        """(N, K) the weights the layer applies: the router's, zero where dropped."""
        return self.weights * self.kept

    def chosen_per_expert(self) -> Tensor:
        """(E,) assignments the router chose per expert, before capacity."""
        return _bincount(self.expert_idx[self.chosen], self.num_experts)

    def dense_weights(self) -> Tensor:
        """(N, E) the router's weights scattered to experts: G(x) in Shazeer et al.'s notation."""
        dense = torch.zeros_like(self.probs)
        return dense.scatter_add(1, self.expert_idx, self.weights * self.chosen)


def masked_mean(values: Tensor, valid: Optional[Tensor]) -> Tensor:
    """(N, ...) -> (...): the mean over the `valid` (N,) tokens, all when None (0 when there are none)."""
    if valid is None:
        return values.mean(dim=0)
    w = valid.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(dim=0) / w.sum().clamp_min(1.0)


def _bincount(idx: Tensor, n: int) -> Tensor:
    counts = torch.zeros(n, dtype=torch.int64, device=idx.device)
    return counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))


def make_record(
    logits: Tensor, probs: Tensor, expert_idx: Tensor, weights: Tensor, chosen: Optional[Tensor] = None, **extra
) -> RoutingRecord:
    """A record as a router returns it: every chosen slot kept, no capacity applied yet. `valid`
    (N,) bool, in `extra`: padding tokens choose nothing."""
    chosen = torch.ones_like(expert_idx, dtype=torch.bool) if chosen is None else chosen
    if extra.get("valid") is not None:
        chosen = chosen & extra["valid"][:, None]
    weights = weights * chosen
    return RoutingRecord(
        logits=logits,
        probs=probs,
        expert_idx=expert_idx,
        weights=weights,
        chosen=chosen,
        kept=chosen,
        tokens_per_expert=_bincount(expert_idx[chosen], probs.shape[1]),
        num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device),
        **extra,
    )


def skip_weak(record: RoutingRecord, beta: float) -> RoutingRecord:
    """NAEE's dynamic skipping (Lu et al. 2024, §4.2): a token's chosen slots whose weight is below
    `beta` times its largest weight are not computed (its first choice always is). The weights
    left are rescaled to the token's total weight, so renormalised weights still sum to 1, as
    NAEE renormalises; `skipped` marks the slots left out. Before capacity: a skipped assignment
    takes no slot."""
    w = record.weights * record.chosen  # (N, K)
    first = w.argmax(dim=-1, keepdim=True)  # (N, 1) the slot of the largest weight
    weak = record.chosen & (w < beta * w.gather(1, first))
    weak = weak.scatter(1, first, False)
    chosen = record.chosen & ~weak
    left = w * chosen
    weights = left * (w.sum(-1, keepdim=True) / left.sum(-1, keepdim=True).clamp_min(1e-30))
    return dataclasses.replace(
        record, weights=weights, chosen=chosen, kept=record.kept & chosen,
        tokens_per_expert=_bincount(record.expert_idx[chosen], record.num_experts), skipped=weak,
    )
