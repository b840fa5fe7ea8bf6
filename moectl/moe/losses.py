"""Router losses, computed from the routing record and returned, never stored globally.

All are returned unweighted; the model multiplies each by its coefficient and averages over
MoE layers. A hierarchical record adds its primary gate's terms (both levels are balanced).
Notation: N tokens, E experts, K slots per token.

- load_balance: Switch Transformer (Fedus et al. 2021, eq. 4-6): E * sum_i f_i * P_i, with f_i
  the fraction of the chosen assignments that went to expert i (before capacity drops) and P_i
  the mean router probability. 1.0 under perfectly uniform routing for any K. (transformers'
  Mixtral loss uses per-slot fractions and equals K times this.) Gradients flow through P only.
- importance: Shazeer et al. 2017: CV(sum_x G(x))^2, G the router's (pre-capacity) weights.
- load: Shazeer et al. 2017: CV(Load(X))^2 with the smooth, differentiable load estimator that
  noisy top-k gating computes (record.load).
- z: ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_x logsumexp(logits(x))^2.

CV^2 uses the population variance over the E entries, as the authors' tensor2tensor code does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moectl.moe.record import RoutingRecord

LOSS_NAMES = ("load_balance", "importance", "load", "z")


CountReduce = Callable[[Tensor], Tensor]


def load_balancing_loss(
    probs: Tensor, expert_idx: Tensor, chosen: Tensor | None = None, count_reduce: CountReduce | None = None
) -> Tensor:
    """E * sum_i f_i * P_i. `count_reduce` (the `global` scope) sums the assignment counts behind
    f over data-parallel processes; P stays local, so averaging the processes' gradients gives
    the gradient of the loss over the whole batch."""
    num_experts = probs.shape[1]
    mask = torch.ones_like(expert_idx, dtype=probs.dtype) if chosen is None else chosen.to(probs.dtype)
    counts = torch.zeros(num_experts + 1, device=probs.device, dtype=probs.dtype)  # (E + 1,): last = total
    counts.scatter_add_(0, expert_idx.reshape(-1), mask.reshape(-1))
    counts[num_experts] = mask.sum()
    if count_reduce is not None:
        counts = count_reduce(counts)
    f = counts[:num_experts] / counts[num_experts].clamp_min(1.0)  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return num_experts * (f * p).sum()


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of a vector: var(v) / mean(v)^2 (population variance)."""
    v = v.float()
    if v.numel() < 2:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def importance_loss(record: RoutingRecord) -> Tensor:
    return cv_squared(record.dense_weights().sum(dim=0))


def load_loss(record: RoutingRecord) -> Tensor:
    if record.load is None:
        return record.probs.new_zeros(())
    return cv_squared(record.load)


def router_z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def routing_losses(record: RoutingRecord, count_reduce: CountReduce | None = None) -> dict[str, Tensor]:
    """Every router loss of one MoE layer, unweighted; a hierarchical layer sums its two levels."""
    terms = {
        "load_balance": load_balancing_loss(record.probs, record.expert_idx, record.chosen, count_reduce),
        "importance": importance_loss(record),
        "load": load_loss(record),
        "z": router_z_loss(record.logits),
    }
    if record.group is not None:
        for name, value in routing_losses(record.group, count_reduce).items():
            terms[name] = terms[name] + value
    return terms
