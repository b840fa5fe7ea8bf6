"""Router losses, computed from the routing record and returned, never stored globally.

All are returned unweighted, per MoE layer; the model multiplies each by its coefficient and
adds the layers up, as Switch, GShard and ST-MoE do (each layer carries its own term).
Notation: N tokens, E experts, K slots per token, T tokens per sequence.

- load_balance: Switch Transformer (Fedus et al. 2021, eq. 4-6): E * sum_i f_i * P_i, with f_i
  the fraction of the counted assignments that went to expert i (before capacity drops) and P_i
  the mean router probability. The counted assignments are every chosen slot (Switch, top-k) or
  each token's first choice (GShard, Algorithm 1: record.counted). 1.0 under perfectly uniform
  routing for any K. (transformers' Mixtral loss uses per-slot fractions and equals K times
  this.) Gradients flow through P only.
- importance: Shazeer et al. 2017: CV(sum_x G(x))^2, G the router's (pre-capacity) weights.
- load: Shazeer et al. 2017: CV(Load(X))^2 with the smooth, differentiable load estimator that
  noisy top-k gating computes (record.load).
- seq_balance: DeepSeek-V3 (eq. 17-20), per sequence: f_i = E / (K T) * sum_t 1[i in the top K
  of token t's affinities s_t], P_i = mean over the sequence of the normalised affinities s'_i
  (record.probs), loss = sum_i f_i P_i, averaged over the sequences. The indicator is the top K
  of the raw affinities, as eq. 18 writes it (and Megatron-core counts it), not the router's
  choice, which adds the balancing bias and may be group-limited; s' has the order of s, so the
  top K of record.probs is that of s.
- z: ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_x logsumexp(logits(x))^2.

Padding (record.valid) is in none of them: P_i, the z-loss and each sequence's T are over the real
tokens, and padding chooses no expert, so f_i, importance and load never see it.

A hierarchical record's primary gate (record.group) is balanced too only with `include_group`:
Shazeer et al.'s Appendix B balances the leaf experts' Importance_H and Load_H alone.
CV^2 uses the population variance over the E entries, as the authors' tensor2tensor code does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from moectl.moe.record import RoutingRecord, masked_mean

LOSS_NAMES = ("load_balance", "importance", "load", "seq_balance", "z")


CountReduce = Callable[[Tensor], Tensor]


def load_balancing_loss(
    probs: Tensor,
    expert_idx: Tensor,
    counted: Tensor | None = None,
    count_reduce: CountReduce | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """E * sum_i f_i * P_i over the `counted` (N, K) assignments (all when None), P_i the mean over
    the `valid` (N,) tokens (all when None). `count_reduce` (the `global` scope) sums the counts
    behind f over data-parallel processes; P stays local, so averaging the processes' gradients
    gives the gradient of the loss over the whole batch."""
    num_experts = probs.shape[1]
    mask = torch.ones_like(expert_idx, dtype=probs.dtype) if counted is None else counted.to(probs.dtype)
    counts = torch.zeros(num_experts + 1, device=probs.device, dtype=probs.dtype)  # (E + 1,): last = total
    counts.scatter_add_(0, expert_idx.reshape(-1), mask.reshape(-1))
    counts[num_experts] = mask.sum()
    if count_reduce is not None:
        counts = count_reduce(counts)
    f = counts[:num_experts] / counts[num_experts].clamp_min(1.0)  # (E,)
    p = masked_mean(probs, valid)  # (E,)
    return num_experts * (f * p).sum()



def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of a vector: var(v) / mean(v)^2 (population variance)."""
    v = v.float()
    if v.numel() < 2:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def importance_loss(record: RoutingRecord) -> Tensor:  # padding has no weight (record.make_record)
    return cv_squared(record.dense_weights().sum(dim=0))


def load_loss(record: RoutingRecord) -> Tensor:
    if record.load is None:
        return record.probs.new_zeros(())
    return cv_squared(record.load)


def sequence_balance_loss(probs: Tensor, top_k: int, seq_len: int, valid: Tensor | None = None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss over the B = N / T sequences (tokens sequence-major):
    f from each token's top `top_k` of `probs` (N, E), the normalised affinities. With `valid` (N,)
    each sequence counts its real tokens T_b, and a sequence of padding alone is left out."""
    n, e = probs.shape
    v = torch.ones(n, dtype=probs.dtype, device=probs.device) if valid is None else valid.to(probs.dtype)
    top = probs.detach().topk(top_k, dim=-1).indices  # (N, K) the indicator carries no gradient
    picked = torch.zeros_like(probs).scatter_(1, top, 1.0) * v[:, None]  # (N, E) 1 where in token t's top K
    tokens = v.view(-1, seq_len).sum(1)  # (B,) T_b
    f = picked.view(-1, seq_len, e).sum(1) * (e / top_k) / tokens.clamp_min(1.0)[:, None]  # (B, E)
    p = (probs * v[:, None]).view(-1, seq_len, e).sum(1) / tokens.clamp_min(1.0)[:, None]  # (B, E)
    per_seq = (f * p).sum(-1)  # (B,)
    real = (tokens > 0).to(probs.dtype)
    return (per_seq * real).sum() / real.sum().clamp_min(1.0)


def router_z_loss(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """mean over the valid tokens of logsumexp(logits)^2."""
    return masked_mean(torch.logsumexp(logits.float(), dim=-1).square(), valid)


def routing_losses(
    record: RoutingRecord, count_reduce: CountReduce | None = None, seq_len: Optional[int] = None, include_group: bool = False
) -> dict[str, Tensor]:
    """Every router loss of one MoE layer, unweighted. `seq_len` T: the layer's N tokens are
    sequences of T (needed for seq_balance, else 0); `include_group` adds a hierarchical record's
    primary-gate terms."""
    counted = record.chosen if record.counted is None else record.counted & record.chosen
    valid = record.valid
    terms = {
        "load_balance": load_balancing_loss(record.probs, record.expert_idx, counted, count_reduce, valid),
        "importance": importance_loss(record),
        "load": load_loss(record),
        "seq_balance": (sequence_balance_loss(record.probs, record.top_k, seq_len, valid)
                        if seq_len else record.probs.new_zeros(())),
        "z": router_z_loss(record.logits, valid),
    }
    if include_group and record.group is not None:
        for name, value in routing_losses(record.group, count_reduce, seq_len).items():
            terms[name] = terms[name] + value
    return terms
