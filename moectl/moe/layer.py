"""The MoE layer: (N, D) -> (N, D) plus a routing record. Route -> dispatch -> compute -> combine.

Two implementations of the same function:
- "sorted" (default): assignments sorted by expert, each expert run once on its contiguous slice;
- "loop": the obviously-correct reference, one boolean mask per expert. Tests check they agree.

Around the router: capacity (separate train and eval factors, a minimum, dropless, counting real
tokens only: padding chooses no expert), the drop priority (by position, which keeps a causal LM
causal; GShard's rank by rank in position order; or Riquelme et al.'s batch-prioritised routing:
rank by rank, each rank by the token's largest routing weight, noise included), and
always-on shared experts (DeepSeekMoE, Qwen-MoE) whose output is added to the routed experts',
optionally scaled by a sigmoid gate. The routed output Σ_k w_k E_k(x) is multiplied by
`routed_scale` (1 as the papers define their routers; DeepSeek-V3's routed scaling; or K, which
gives renormalised top-K the output scale of a dense FFN of hidden K·H at init).

Notation: N tokens, D model dim, H expert hidden size, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from moectl.moe import dispatch
from moectl.moe.experts import FeedForward, GroupedExperts
from moectl.moe.record import RoutingRecord, skip_weak
from moectl.moe.router import Router, TopKRouter


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        activation: str = "swiglu",
        renormalize: bool = True,
        capacity_factor: Optional[float] = None,
        init_std: float = 0.02,
        *,
        router: Optional[Router] = None,
        eval_capacity_factor: Optional[float] | Literal["train"] = "train",
        min_capacity: int = 0,
        drop_policy: Literal["position", "rank", "probability"] = "position",
        shared_hidden: int = 0,
        shared_gate: bool = False,
        expert_dropout: float = 0.0,
        routed_scale: Optional[float] = 1.0,
        impl: Literal["sorted", "loop"] = "sorted",
        expert_device: Optional[torch.device | str] = None,
    ):
        """`router` defaults to softmax top-k over `top_k` experts, renormalised or not. Capacity
        factors of None mean dropless; `eval_capacity_factor="train"` reuses the training one.
        `shared_hidden` > 0 adds a shared dense FFN of that hidden size (n shared experts of size
        H: n * H). `routed_scale` multiplies the routed output; None means the router's K (its
        active experts). `impl` picks the fast sorted path or the loop reference (see above).
        `expert_device` "meta" makes no expert weights: they are offloaded (services/offload.py)."""
        super().__init__()
        if impl not in ("sorted", "loop"):
            raise ValueError(f"impl={impl!r} must be 'sorted' or 'loop'")
        if drop_policy not in ("position", "rank", "probability"):
            raise ValueError(f"drop_policy={drop_policy!r} must be 'position', 'rank' or 'probability'")
        self.num_experts = num_experts
        self._impl = impl
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor == "train" else eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy
        self.router = router if router is not None else TopKRouter(d_model, num_experts, top_k, renormalize, init_std)
        self.routed_scale = self.router.active_experts if routed_scale is None else float(routed_scale)
        if not self.routed_scale > 0:
            raise ValueError(f"routed_scale={routed_scale} must be > 0")
        self.experts = GroupedExperts(num_experts, d_model, expert_hidden, activation, init_std, expert_dropout,
                                      device=expert_device)
        self.shared = FeedForward(d_model, shared_hidden, activation, init_std) if shared_hidden else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_hidden and shared_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        # NAEE's dynamic skipping in eval (moe/record.py skip_weak): eval and generate's --skip-threshold.
        self.skip_threshold: Optional[float] = None

    def prune_experts(self, keep: list[int]) -> None:
        """Keep the experts `keep` alone (ascending ids, renumbered 0..len(keep)-1): their router
        rows and weights. The routed output's scale stays the trained one."""
        self.router = self.router.pruned(keep)
        self.experts = self.experts.pruned(sorted(keep))
        self.num_experts = len(keep)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for a batch of N tokens: max(min_capacity, ceil(factor * N * K / E)); None: dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None or not self.router.uses_capacity:
            return None
        # K here is the assignments per token the router makes (hierarchical: group_top_k * top_k).
        assignments = round(self.router.active_experts)
        return max(self.min_capacity, dispatch.expert_capacity(factor, num_tokens, assignments, self.num_experts))

    def forward(
        self, x: Tensor, positions: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, RoutingRecord]:
        """(N, D) -> (N, D). `positions` (N,): each token's place in its sequence, for drop priority.
        `valid` (N,) bool: the real tokens; padding goes to no expert (its routed output is 0) and
        counts in no capacity, loss or statistic."""
        record = self.router(x, valid)  # route
        if self.skip_threshold and not self.training:
            record = skip_weak(record, self.skip_threshold)
        by_rank = self.drop_policy in ("rank", "probability")
        # Batch-prioritised routing: the largest weight the gate gave the token goes first; else position.
        priority = -record.weights.max(dim=-1).values if self.drop_policy == "probability" else positions
        capacity = self.capacity(x.shape[0])
        if capacity is not None and valid is not None:  # host sync, under capacity only: N counts the real tokens
            capacity = self.capacity(int(valid.sum()))
        plan, record = dispatch.plan(record, capacity, priority, by_rank)  # sort by expert, drop overflow
        if self.impl == "loop":
            out = self._forward_loop(x, record)
        else:
            x_sorted = dispatch.gather(x, plan)  # (M, D)
            y_sorted = self.experts(x_sorted, plan.tokens_per_expert)  # (M, D)
            out = dispatch.combine(y_sorted, plan, record)  # (N, D)
        if self.routed_scale != 1.0:
            out = out * self.routed_scale
        if self.shared is not None:
            shared = self.shared(x)  # (N, D)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out, record

    def _forward_loop(self, x: Tensor, record: RoutingRecord) -> Tensor:
        out = torch.zeros_like(x)
        weights = record.combine_weights
        for e in range(self.num_experts):
            token, slot = torch.where((record.expert_idx == e) & record.kept)  # (n_e,), (n_e,)
            if token.numel():
                w = weights[token, slot].to(x.dtype)[:, None]  # (n_e, 1)
                out = out.index_add(0, token, w * self.experts.forward_expert(e, x[token]))
        return out

    @property
    def impl(self) -> str:
        """Which path computes the experts, fixed at construction."""
        return self._impl

    @property
    def active_experts(self) -> float:
        return self.router.active_experts

