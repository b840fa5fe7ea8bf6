"""The mixture-of-experts output head, and its objectives: the classic mixture of experts of
Jacobs, Jordan et al. (1991), trained by likelihood or by EM (Jordan & Jacobs 1994). Each expert
is a whole softmax over the vocabulary with an output matrix W_i of its own, on the same hidden
state: not Yang et al.'s (2018) mixture of softmaxes, whose components share one output matrix
and differ in a projection of h.

    p(y | h) = sum_i g_i(h) p_i(y | h),   g = softmax(W_g h),   p_i = softmax(W_i h)

over E_h experts, each a whole softmax over the vocabulary. The gate is a dense (soft) router:
its routing record reaches the statistics, TensorBoard, eval and route-stats like an MoE
layer's. Objectives, per token, with log q_i = log g_i + log p_i(y):
- likelihood: -log p(y) = -logsumexp_i log q_i;
- em: -sum_i r_i log q_i with the responsibilities r = softmax(log q) held fixed (the E-step);
  one optimiser step per batch on it is generalised EM, and its gradient at the current
  parameters equals the likelihood's;
- hard_em: the same with r the one-hot argmax of the responsibilities.

Shapes: N tokens, D model dim, V vocabulary, E_h head experts. All of it runs in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.moe.record import RoutingRecord
from moectl.moe.router import SoftRouter, fp32


class MixtureHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int, num_experts: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.gate = SoftRouter(d_model, num_experts, init_std)  # W_g: (E_h, D)
        self.proj = nn.Parameter(torch.empty(num_experts, vocab_size, d_model))  # W_i: (E_h, V, D)
        nn.init.normal_(self.proj, std=init_std)

    def forward(self, h: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor, RoutingRecord]:
        """(N, D) -> log g (N, E_h), log p_i (N, E_h, V), and the gate's routing record (padding, where
        `valid` (N,) is False, left out of it)."""
        record = self.gate(h, valid)
        with fp32(h):
            log_g = record.logits.log_softmax(-1)
            log_p = torch.einsum("nd,evd->nev", h.float(), self.proj.float()).log_softmax(-1)
        return log_g, log_p, record


def mixture_log_probs(log_g: Tensor, log_p: Tensor) -> Tensor:
    """log p(y | h) for every y: (N, E_h), (N, E_h, V) -> (N, V)."""
    return torch.logsumexp(log_g[..., None] + log_p, dim=1)


def objective_loss(log_g: Tensor, log_p: Tensor, targets: Tensor, objective: str) -> Tensor:
    """The mean over tokens of the objective's loss (module docstring); targets (N,)."""
    log_q = log_g + log_p.gather(2, targets[:, None, None].expand(-1, log_p.shape[1], 1)).squeeze(2)  # (N, E_h)
    if objective == "likelihood":
        return -torch.logsumexp(log_q, dim=1).mean()
    r = log_q.detach().softmax(dim=1)  # E-step: the posterior over experts, held fixed
    if objective == "hard_em":
        r = F.one_hot(r.argmax(dim=1), r.shape[1]).to(r.dtype)
    return -(r * log_q).sum(dim=1).mean()
