"""Routers: token -> experts and combine weights.

Routing math runs in fp32 even under bf16 autocast (Switch Transformer's "selective
precision"): the softmax over E logits and the top-k comparison are where low precision
flips choices and destabilises training.

Notation: N tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moectl.moe.record import RoutingRecord


class TopKRouter(nn.Module):
    """Softmax top-k routing (GShard, Mixtral): p = softmax(x W_g); keep the K largest p_i.

    Combine weights are p_i renormalised over the chosen K (Mixtral), or the raw p_i.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True, init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # W_g^T: (E, D)
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: Tensor) -> RoutingRecord:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()  # (N, D) @ (D, E) -> (N, E)
            probs = logits.softmax(dim=-1)  # (N, E)
            top_probs, expert_idx = probs.topk(self.top_k, dim=-1)  # (N, K), (N, K)
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.renormalize else top_probs
        # Dropless until the dispatcher applies capacity (moe/dispatch.py).
        record = RoutingRecord(
            logits=logits,
            probs=probs,
            expert_idx=expert_idx,
            weights=weights,
            kept=torch.ones_like(expert_idx, dtype=torch.bool),
            tokens_per_expert=torch.zeros(self.num_experts, dtype=torch.int64, device=x.device),
            num_dropped=torch.zeros((), dtype=torch.int64, device=x.device),
        )
        record.tokens_per_expert = record.chosen_per_expert()
        return record
