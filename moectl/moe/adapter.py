"""A low-rank adapter (LoRA, Hu et al. 2021) of one weight matrix, or of a stack of E experts' matrices.

The adapted weight is W + s A B with s = alpha / rank, A (in, r) and B (r, out) for a weight used as
x @ W; a stack has A (E, in, r) and B (E, r, out), or one pair shared by all E experts (a leading
dimension of 1). B starts at zero, so an adapted model starts as its base; A starts as PEFT's
lora_A (nn.Linear's default: uniform within 1 / sqrt(in)). The low-rank path s (drop(x) A) B is
what a layer adds to x @ W (dropout on the adapter's input alone, as PEFT's lora_dropout);
`delta()` is s A B in the weight's own layout, for merging and for weights used whole (the
LSTM's). models/lora.py decides which weights get one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adapter(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float = 0.0,
                 experts: Optional[int] = None, transposed: bool = False):
        """`experts`: the adapted weight is a stack of that many matrices (E, in, out) with one adapter
        pair each, or with `experts=1` one pair shared by the whole stack. `transposed`: the weight is
        stored (out, in) (nn.Linear, nn.LSTM) rather than (in, out)."""
        super().__init__()
        lead = () if experts is None else (experts,)
        self.A = nn.Parameter(torch.empty(*lead, d_in, rank))
        self.B = nn.Parameter(torch.zeros(*lead, rank, d_out))
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.A, -bound, bound)
        self.rank, self.scale, self.dropout, self.transposed = rank, scale, dropout, transposed
        self.stacked = experts is not None

    @property
    def shared(self) -> bool:
        """One pair for every matrix of a stack."""
        return self.stacked and self.A.shape[0] == 1

    def factors(self, expert: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """(A, B) of a plain adapter, or of expert `expert` of a stack."""
        if expert is None:
            return self.A, self.B
        e = 0 if self.shared else expert
        return self.A[e], self.B[e]

    def forward(self, x: Tensor, expert: Optional[int] = None) -> Tensor:
        """The low-rank path s (drop(x) A) B on (n, in) rows (of expert `expert` of a stack)."""
        a, b = self.factors(expert)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return (x.to(a.dtype) @ a) @ b * self.scale

    def delta(self) -> Tensor:
        """s A B in the adapted weight's layout: (in, out), (out, in) when transposed, with a leading
        E (or 1, shared) for a stack."""
        d = self.scale * (self.A @ self.B)
        return d.mT if self.transposed else d
