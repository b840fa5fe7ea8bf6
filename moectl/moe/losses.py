"""Router losses, computed from the routing record and returned, never stored globally.

Both are returned unweighted; the model multiplies by its coefficients and averages over
MoE layers. Notation: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_idx: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), without alpha.

    E * sum_i f_i * P_i, with f_i the fraction of the N*K assignments the router chose for
    expert i (before capacity drops) and P_i the mean router probability of expert i.
    It is 1.0 under perfectly uniform routing for any K. (transformers' Mixtral loss uses
    per-slot fractions and equals K times this.) Gradients reach the router through P only.
    """
    n, k = expert_idx.shape
    num_experts = probs.shape[1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, expert_idx.flatten(), torch.ones(n * k, device=probs.device, dtype=probs.dtype))
    f = counts / (n * k)  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5), without its coefficient: mean_x logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
