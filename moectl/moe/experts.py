"""Expert feed-forward networks, stored stacked so E experts are one parameter per matrix, and
the dense FFN they generalise.

Each expert is a one-hidden-layer FFN: SwiGLU (down(silu(x gate) * x up)), or GELU / ReLU
(down(act(x up))), with optional dropout on the hidden layer ("expert dropout"). The same
function runs the dense FFNs, so a dense FFN split into E hidden groups and an MoE with K = E
are the same computation.

Notation: N tokens, D model dim, H expert hidden size, E experts, M kept assignments.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("swiglu", "gelu", "relu")


def ffn(
    x: Tensor, w_up: Tensor, w_gate: Optional[Tensor], w_down: Tensor, activation: str, dropout: float = 0.0
) -> Tensor:
    """(n, D) -> (n, D) with w_up, w_gate: (D, H) and w_down: (H, D); dropout (training only) on the hidden layer."""
    h = x @ w_up  # (n, H)
    if activation == "swiglu":
        h = F.silu(x @ w_gate) * h
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.relu(h)
    if dropout:
        h = F.dropout(h, dropout)
    return h @ w_down  # (n, D)


class FeedForward(nn.Module):
    """A dense FFN; weights stored (in, out) like the experts'."""

    def __init__(self, d_model: int, hidden: int, activation: str, init_std: float = 0.02):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        self.activation = activation
        self.w_up = nn.Parameter(torch.empty(d_model, hidden))
        self.w_gate = nn.Parameter(torch.empty(d_model, hidden)) if activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(hidden, d_model))
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, self.w_up, self.w_gate, self.w_down, self.activation)


class GroupedExperts(nn.Module):
    """E FFNs with weights w_up / w_gate: (E, D, H) and w_down: (E, H, D)."""

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str, init_std: float = 0.02, dropout: float = 0.0
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        self.num_experts = num_experts
        self.activation = activation
        self.dropout = dropout
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """(M, D) assignments grouped by expert -> (M, D): each expert on its contiguous slice."""
        # unbind once: its backward stacks the E gradients in one allocation, whereas indexing
        # w[e] per expert would add E full-size zero-padded gradients (quadratic in E).
        ups, downs = self.w_up.unbind(0), self.w_down.unbind(0)
        gates = self.w_gate.unbind(0) if self.w_gate is not None else [None] * self.num_experts
        p = self._dropout()
        outs = [
            ffn(chunk, ups[e], gates[e], downs[e], self.activation, p)
            for e, chunk in enumerate(x.split(tokens_per_expert))
            if tokens_per_expert[e]
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """One expert on (n, D): the reference path's building block."""
        gate = self.w_gate[e] if self.w_gate is not None else None
        return ffn(x, self.w_up[e], gate, self.w_down[e], self.activation, self._dropout())
