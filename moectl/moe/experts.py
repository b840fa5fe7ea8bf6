"""Expert feed-forward networks, stored stacked so E experts are one parameter per matrix.

Each expert is a one-hidden-layer FFN: SwiGLU (down(silu(x gate) * x up)), or GELU / ReLU
(down(act(x up))). The same function runs the dense FFNs in models/, so a dense FFN split
into E hidden groups and an MoE with K = E are the same computation.

Notation: N tokens, D model dim, H expert hidden size, E experts, M kept assignments.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("swiglu", "gelu", "relu")


def ffn(x: Tensor, w_up: Tensor, w_gate: Optional[Tensor], w_down: Tensor, activation: str) -> Tensor:
    """(n, D) -> (n, D) with w_up, w_gate: (D, H) and w_down: (H, D)."""
    h = x @ w_up  # (n, H)
    if activation == "swiglu":
        h = F.silu(x @ w_gate) * h
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.relu(h)
    return h @ w_down  # (n, D)


class GroupedExperts(nn.Module):
    """E FFNs with weights w_up / w_gate: (E, D, H) and w_down: (E, H, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str, init_std: float = 0.02):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        self.num_experts = num_experts
        self.activation = activation
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def _weights(self, e: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
        gate = self.w_gate[e] if self.w_gate is not None else None
        return self.w_up[e], gate, self.w_down[e]

    def forward(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """(M, D) assignments grouped by expert -> (M, D): each expert on its contiguous slice."""
        # unbind once: its backward stacks the E gradients in one allocation, whereas indexing
        # w[e] per expert would add E full-size zero-padded gradients (quadratic in E).
        ups, downs = self.w_up.unbind(0), self.w_down.unbind(0)
        gates = self.w_gate.unbind(0) if self.w_gate is not None else [None] * self.num_experts
        outs = [
            ffn(chunk, ups[e], gates[e], downs[e], self.activation)
            for e, chunk in enumerate(x.split(tokens_per_expert))
            if tokens_per_expert[e]
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """One expert on (n, D): the reference path's building block."""
        return ffn(x, *self._weights(e), self.activation)
