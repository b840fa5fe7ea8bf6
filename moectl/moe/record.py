"""The routing record: the one vocabulary every consumer of routing speaks.

The router fills in what it decided (logits, probs, chosen experts, combine weights); the
dispatcher adds what capacity allowed (kept, tokens per expert, dropped). The aux losses,
TensorBoard statistics, eval and route-stats all read this record and nothing else.

Notation: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingRecord:
    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor  # (N, E) fp32 router probabilities, softmax(logits)
    expert_idx: Tensor  # (N, K) int64 chosen experts, best first
    weights: Tensor  # (N, K) fp32 combine weights; 0 where the assignment was dropped
    kept: Tensor  # (N, K) bool, False where capacity dropped the assignment
    tokens_per_expert: Tensor  # (E,) int64 assignments each expert actually processed
    num_dropped: Tensor  # () int64 assignments dropped by capacity

    @property
    def num_tokens(self) -> int:
        return self.expert_idx.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_idx.shape[1]

    def detach(self) -> "RoutingRecord":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)})

    def chosen_per_expert(self) -> Tensor:
        """(E,) assignments the router chose per expert, before capacity."""
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=self.expert_idx.device)
        return counts.scatter_add_(0, self.expert_idx.flatten(), torch.ones_like(self.expert_idx.flatten()))
