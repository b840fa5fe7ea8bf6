"""Building blocks shared by the backbones: RMSNorm, rotary attention, FFN slots.

An FFN slot is either a dense FFN or an MoE layer; both map (B, T, D) -> (B, T, D), and the
slot returns the MoE layer's routing record (None when dense), so a backbone treats them alike.
Shapes: B batch, T sequence length, D model dim, h heads, hd head dim, N = B*T tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.moe import MoELayer, RoutingRecord
from moectl.moe.experts import FeedForward


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Llama / Mixtral)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings in the "rotate half" layout used by Llama / Mixtral."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos(), emb.sin()


class Linear(nn.Linear):
    """nn.Linear (no bias) that may carry a LoRA adapter (models/lora.py attaches it), whose low-rank
    path it adds: x W^T + s (drop(x) A) B."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)
        self.adapters: Optional[nn.ModuleDict] = None  # {"weight": Adapter} when adapted

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        return y if self.adapters is None else y + self.adapters["weight"](x).to(y.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.o_proj = Linear(d_model, d_model)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """`cos`, `sin`: (T, hd), or (B, 1, T, hd) per sequence; `mask` (B, 1, T, T), True where
        a query may attend to a key (None: causal)."""
        b, t, d = x.shape
        # (B, T, D) -> (B, h, T, hd)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))  # (B, h, T, hd) -> (B, T, D)


class FFNSlot(nn.Module):
    """A dense FFN or an MoE layer behind one interface: (B, T, D) -> ((B, T, D), record or None)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def is_moe(self) -> bool:
        return isinstance(self.inner, MoELayer)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Optional[RoutingRecord]]:
        """`valid` (B, T) bool: the real tokens (None: all); an MoE layer routes no padding."""
        if not self.is_moe:
            return self.inner(x), None
        b, t, d = x.shape
        # Under capacity, earlier positions are served first, so no token is dropped because of a later one.
        positions = torch.arange(t, device=x.device).repeat(b)  # (N,) position of token n = b*T + t
        flat_valid = valid.reshape(b * t) if valid is not None else None  # (B, T) -> (N,)
        y, record = self.inner(x.reshape(b * t, d), positions, flat_valid)  # (B, T, D) -> (N, D)
        return y.view(b, t, d), record  # (N, D) -> (B, T, D)
