"""Expert feed-forward networks, stored stacked so E experts are one parameter per matrix, and
the dense FFN they generalise.

Each expert is a one-hidden-layer FFN: SwiGLU (down(silu(x gate) * x up)), or GELU / ReLU
(down(act(x up))), with optional dropout on the hidden layer ("expert dropout"). The same
function runs the dense FFNs, so a dense FFN split into E hidden groups and an MoE with K = E
are the same computation.

Notation: N tokens, D model dim, H expert hidden size, E experts, M kept assignments.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.config import ACTIVATIONS


def ffn(
    x: Tensor, w_up: Tensor, w_gate: Optional[Tensor], w_down: Tensor, activation: str, dropout: float = 0.0,
    adapters: Optional[nn.ModuleDict] = None, expert: Optional[int] = None,
) -> Tensor:
    """(n, D) -> (n, D) with w_up, w_gate: (D, H) and w_down: (H, D); dropout (training only) on the
    hidden layer. `adapters`: LoRA adapters (moe/adapter.py) by weight name, whose low-rank paths add to
    those matmuls (of expert `expert`, for a stack's adapters)."""

    def matmul(inp: Tensor, w: Tensor, name: str) -> Tensor:
        out = inp @ w
        return out + adapters[name](inp, expert) if adapters is not None and name in adapters else out

    h = matmul(x, w_up, "w_up")  # (n, H)
    if activation == "swiglu":
        h = F.silu(matmul(x, w_gate, "w_gate")) * h
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.relu(h)
    if dropout:
        h = F.dropout(h, dropout)
    return matmul(h, w_down, "w_down")  # (n, D)


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
        self.adapters: Optional[nn.ModuleDict] = None  # LoRA, by weight name (models/lora.py attaches them)

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, self.w_up, self.w_gate, self.w_down, self.activation, adapters=self.adapters)


def _grouped_mm_ok(x: Tensor, *weights: Optional[Tensor]) -> bool:
    """Can torch's grouped matmul run these shapes? CPU only here (the GPU kernels have more
    conditions and are not exercised by this project's tests); rows must be 16-byte aligned."""
    if not hasattr(F, "grouped_mm") or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    dims = [x.shape[1]] + [d for w in weights if w is not None for d in w.shape[1:]]
    return all(d % align == 0 for d in dims)


class _GroupedFFN(torch.autograd.Function):
    """All E experts' FFNs over assignments grouped by expert, with a hand-written backward.

    The same math as `ffn` per expert. Each of the FFN's matmuls is one grouped matmul over
    all experts (torch's grouped_mm, rows split by `offsets`) and each elementwise step runs
    once over all M rows: a dozen kernel calls per layer instead of a dozen per expert, no
    torch.cat of E outputs, and weight gradients produced as one (E, ., .) tensor. Where
    grouped_mm does not apply, a per-expert loop of mm(out=...) into the same buffers does the
    same. The forward saves what the dense FFN's autograd saves: the up and gate
    pre-activations, silu(gate) and the hidden layer (recomputing the last two in the backward
    cost 2% of the layer's time for M x H floats each).

    LoRA (moe/adapter.py): each adapted matrix W gets its low-rank path, x W + s (drop(x) A) B, as
    two more grouped matmuls through rank r (or plain ones, for a pair shared by all experts); the
    backward gives A and B their gradients through rank r too, and computes no gradient for a
    frozen W at all.
    """

    @staticmethod
    def forward(ctx, x, sizes, activation, lora, w_up, w_gate, w_down, *factors):
        """x: (M, D) grouped by expert; `lora`: (scale, dropout) of the adapters; `factors`: A, B of
        up, gate and down, (E or 1, in, r) and (E or 1, r, out), None where a matrix has no adapter."""
        grouped = _grouped_mm_ok(x, w_up, w_gate, w_down, *factors)
        offsets = torch.tensor(sizes, device=x.device).cumsum(0).to(torch.int32) if grouped else None
        mm = (lambda a, b: F.grouped_mm(a, b, offs=offsets)) if grouped else (lambda a, b: _loop_mm(a, b, sizes))
        scale, p = lora or (0.0, 0.0)
        a_up, b_up, a_gate, b_gate, a_down, b_down = factors or (None,) * 6
        mask_x = _dropout_mask(x, p) if (a_up is not None or a_gate is not None) else None

        def matmul(inp, inp_mask, w, a, b):  # inp @ w (+ the low-rank path): (out, its rank-r middle or None)
            out = mm(inp, w)
            if a is None:
                return out, None
            mid = _factor_mm(mm, inp if inp_mask is None else inp * inp_mask, a)  # (M, r)
            return out.add_(_factor_mm(mm, mid, b), alpha=scale), mid

        pre_up, mid_up = matmul(x, mask_x, w_up, a_up, b_up)  # (M, H)
        if w_gate is not None:
            pre_gate, mid_gate = matmul(x, mask_x, w_gate, a_gate, b_gate)  # (M, H)
            silu = F.silu(pre_gate)
            hidden = silu * pre_up
        else:
            pre_gate = silu = mid_gate = None
            hidden = F.gelu(pre_up) if activation == "gelu" else F.relu(pre_up)
        mask_h = _dropout_mask(hidden, p) if a_down is not None else None
        out, mid_down = matmul(hidden, mask_h, w_down, a_down, b_down)  # (M, D)
        ctx.sizes, ctx.activation, ctx.offsets, ctx.scale = sizes, activation, offsets, scale
        ctx.save_for_backward(x, w_up, w_gate, w_down, pre_up, pre_gate, silu, hidden, *(factors or (None,) * 6),
                              mid_up, mid_gate, mid_down, mask_x, mask_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x, w_up, w_gate, w_down, pre_up, pre_gate, silu, hidden, a_up, b_up, a_gate, b_gate, a_down, b_down,
         mid_up, mid_gate, mid_down, mask_x, mask_h) = ctx.saved_tensors
        go = grad_out.contiguous()
        sizes, offsets, scale = ctx.sizes, ctx.offsets, ctx.scale
        if offsets is not None:
            mm = lambda a, b: F.grouped_mm(a, b, offs=offsets)  # noqa: E731  (M,K)@(E,K,N) -> (M,N)
            wgrad = lambda a, b: F.grouped_mm(a.t(), b, offs=offsets)  # noqa: E731  (M,K),(M,N) -> (E,K,N)
        else:
            mm = lambda a, b: _loop_mm(a, b, sizes)  # noqa: E731
            wgrad = lambda a, b: _loop_wgrad(a, b, sizes)  # noqa: E731
        need_up, need_gate, need_down = ctx.needs_input_grad[4:7]

        def matmul_grad(d_out, inp, inp_mask, w, need_w, a, b, mid):
            """Gradients of out = inp @ w + s (inp * mask) a b: (d inp, d w, d a, d b)."""
            d_inp = mm(d_out, w.transpose(1, 2))
            dw = wgrad(inp, d_out) if need_w else None
            if a is None:
                return d_inp, dw, None, None
            g = _factor_mm(mm, d_out, b.transpose(1, 2))  # (M, r)
            db = _factor_wgrad(wgrad, mid, d_out, b).mul_(scale)
            d_mid_in = _factor_mm(mm, g, a.transpose(1, 2)).mul_(scale)  # d (inp * mask)
            da = _factor_wgrad(wgrad, inp if inp_mask is None else inp * inp_mask, g, a).mul_(scale)
            return d_inp.add_(d_mid_in if inp_mask is None else d_mid_in * inp_mask), dw, da, db

        dh, dw_down, da_down, db_down = matmul_grad(go, hidden, mask_h, w_down, need_down, a_down, b_down, mid_down)
        a = pre_up
        if pre_gate is not None:
            d_up = silu * dh
            # dg = dh * a * silu'(g) in one fused pass, written over dh
            dg = torch.ops.aten.silu_backward.grad_input(dh.mul_(a), pre_gate, grad_input=dh)
            dx, dw_gate, da_gate, db_gate = matmul_grad(dg, x, mask_x, w_gate, need_gate, a_gate, b_gate, mid_gate)
        else:
            if ctx.activation == "gelu":  # exact GELU, as F.gelu's default
                d_up = torch.ops.aten.gelu_backward(dh, a)
            else:  # relu: dh where the output is positive
                d_up = torch.ops.aten.threshold_backward(dh, hidden, 0)
            dx, dw_gate, da_gate, db_gate = None, None, None, None
        dx_up, dw_up, da_up, db_up = matmul_grad(d_up, x, mask_x, w_up, need_up, a_up, b_up, mid_up)
        dx = dx_up if dx is None else dx.add_(dx_up)
        return dx, None, None, None, dw_up, dw_gate, dw_down, da_up, db_up, da_gate, db_gate, da_down, db_down


def _dropout_mask(t: Tensor, p: float) -> Optional[Tensor]:
    """Inverted dropout's multiplier for `t` (0 or 1 / (1 - p)); None without dropout."""
    return torch.empty_like(t).bernoulli_(1.0 - p).div_(1.0 - p) if p else None


def _factor_mm(mm, a: Tensor, factor: Tensor) -> Tensor:
    """(M, K) rows grouped by expert @ an adapter factor (E, K, N), or a shared one (1, K, N)."""
    return a @ factor[0] if factor.shape[0] == 1 else mm(a, factor)


def _factor_wgrad(wgrad, a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """The gradient of an adapter factor shaped like `factor`: per expert a_e^T b_e, or for a shared
    factor a^T b over all rows."""
    return (a.t() @ b).unsqueeze(0) if factor.shape[0] == 1 else wgrad(a, b)


def _loop_mm(a: Tensor, b: Tensor, sizes: list[int]) -> Tensor:
    """(M, K) rows grouped by expert @ (E, K, N) -> (M, N): the grouped matmul as a loop."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(a[start : start + n], b[e], out=out[start : start + n])
        start += n
    return out


def _loop_wgrad(a: Tensor, b: Tensor, sizes: list[int]) -> Tensor:
    """(M, K), (M, N) grouped by expert -> (E, K, N) with [e] = a_e^T b_e (zero for an expert with no rows)."""
    out = a.new_empty(len(sizes), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(a[start : start + n].t(), b[start : start + n], out=out[e])
        else:
            out[e].zero_()
        start += n
    return out


def grouped_ffn(x: Tensor, tokens_per_expert: list[int], activation: str, w_up: Tensor, w_gate: Optional[Tensor],
                w_down: Tensor, adapters: Optional[nn.ModuleDict] = None) -> Tensor:
    """(M, D) rows grouped by expert -> (M, D): expert e's FFN on its rows (_GroupedFFN), with the
    (E, D, H), (E, H, D) weights and their stacked LoRA `adapters` by weight name; in autocast's
    dtype when autocast is on."""
    weights = [w_up, w_gate, w_down]
    factors: list[Optional[Tensor]] = []
    lora = None
    if adapters is not None and len(adapters):
        for name in ("w_up", "w_gate", "w_down"):
            factors += list(adapters[name].factors()) if name in adapters else [None, None]
        first = next(iter(adapters.values()))
        lora = (first.scale, first.dropout if first.training else 0.0)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # a custom Function is not autocast-aware: cast as autocast would
        dtype = torch.get_autocast_dtype(device)
        x = x.to(dtype)
        weights = [w.to(dtype) if w is not None else None for w in weights]
        factors = [f.to(dtype) if f is not None else None for f in factors]
    elif x.dtype != w_up.dtype:
        x = x.to(w_up.dtype)
    return _GroupedFFN.apply(x, tokens_per_expert, activation, lora, *weights, *factors)


class GroupedExperts(nn.Module):
    """E FFNs with weights w_up / w_gate: (E, D, H) and w_down: (E, H, D)."""

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str, init_std: float = 0.02, dropout: float = 0.0,
        device: Optional[torch.device | str] = None,
    ):
        """`device`: where the weights are made; "meta" makes none (experts offloaded, services/offload.py)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}")
        self.num_experts = num_experts
        self.activation = activation
        self.dropout = dropout
        shape_in, shape_out = (num_experts, d_model, hidden), (num_experts, hidden, d_model)
        self.w_up = nn.Parameter(torch.empty(shape_in, device=device))
        self.w_gate = nn.Parameter(torch.empty(shape_in, device=device)) if activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(shape_out, device=device))
        if torch.device(device or "cpu").type != "meta":  # initialising meta tensors imports ~70 MB of torch
            for p in self.parameters():
                nn.init.normal_(p, std=init_std)
        self.adapters: Optional[nn.ModuleDict] = None  # stacked LoRA, by weight name (models/lora.py attaches them)

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """(M, D) assignments grouped by expert -> (M, D): each expert on its contiguous slice."""
        if not self._dropout():
            return self._fused(x, tokens_per_expert)
        # With expert dropout: plain autograd ops per expert. unbind once: its backward stacks the
        # E gradients in one allocation, whereas indexing w[e] per expert would add E full-size
        # zero-padded gradients (quadratic in E).
        ups, downs = self.w_up.unbind(0), self.w_down.unbind(0)
        gates = self.w_gate.unbind(0) if self.w_gate is not None else [None] * self.num_experts
        p = self._dropout()
        outs = [
            ffn(chunk, ups[e], gates[e], downs[e], self.activation, p, self.adapters, e)
            for e, chunk in enumerate(x.split(tokens_per_expert))
            if tokens_per_expert[e]
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    def _fused(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        return grouped_ffn(x, tokens_per_expert, self.activation, self.w_up, self.w_gate, self.w_down, self.adapters)

    def pruned(self, keep: list[int]) -> "GroupedExperts":
        """A copy holding the experts `keep` alone, in that order."""
        new = copy.deepcopy(self)
        for name, p in self._parameters.items():
            if p is not None:
                new._parameters[name] = nn.Parameter(p.detach()[keep].clone(), p.requires_grad)  # (E', ., .)
        new.num_experts = len(keep)
        return new

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """One expert on (n, D): the reference path's building block."""
        gate = self.w_gate[e] if self.w_gate is not None else None
        return ffn(x, self.w_up[e], gate, self.w_down[e], self.activation, self._dropout(), self.adapters, e)
