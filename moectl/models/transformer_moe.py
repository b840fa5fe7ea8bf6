"""Decoder-only Transformer with MoE FFNs (GShard / Switch / Mixtral layout).

Pre-norm blocks: h += attn(RMSNorm(h)); h += ffn(RMSNorm(h)), rotary positions, causal
scaled_dot_product_attention. `make_ffn(i)` builds block i's FFN slot: an MoE layer (every
`moe.every`-th block) or a dense FFN; with dense slots only it is the dense baseline.
Shapes: B batch, T sequence length, D model dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moectl.models.base import LanguageModel
from moectl.models.layers import CausalSelfAttention, FFNSlot, RMSNorm, RotaryEmbedding
from moectl.moe import RoutingRecord


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, norm_eps: float, ffn: FFNSlot):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, RoutingRecord | None]:
        h = h + self.drop(self.attn(self.attn_norm(h), cos, sin, mask))
        y, record = self.ffn(self.ffn_norm(h), valid)
        return h + self.drop(y), record


class TransformerMoE(LanguageModel):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        make_ffn: Callable[[int], FFNSlot],
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        loss_coefs: Optional[dict[str, float]] = None,
        init_std: float = 0.02,
        **head,
    ):
        super().__init__(vocab_size, d_model, tie_embeddings, loss_coefs, dropout, init_std, **head)
        self.rotary = RotaryEmbedding(d_model // n_heads, rope_theta)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout, norm_eps, make_ffn(i)) for i in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)
        self.init_weights()

    def body(
        self, h: Tensor, state: Optional[Tensor] = None, segments: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, list[RoutingRecord], None]:
        """Attention sees only this sequence: there is no state to carry (`state` is ignored).
        With `segments` (B, T), each position attends only to earlier positions of its own
        segment, and rotary positions count from the segment's start."""
        cos, sin = self.rotary(h.shape[1], h.device)  # (T, hd) each
        mask = None
        if segments is not None:
            t = segments.shape[1]
            idx = torch.arange(t, device=h.device)
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            first = torch.where(starts, idx, 0).cummax(dim=1).values  # (B, T) where each position's segment starts
            pos = idx - first
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, hd): broadcast over heads
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(t, t, dtype=torch.bool, device=h.device).tril())[:, None]  # (B, 1, T, T)
        records = []
        for block in self.blocks:
            h, record = block(h, cos, sin, mask, valid)
            if record is not None:
                records.append(record)
        return self.norm(h), records, None
