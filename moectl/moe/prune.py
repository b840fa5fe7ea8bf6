"""Expert pruning criteria: which experts of one MoE layer to keep, scored on calibration data.

  frequency  the expert's share of the layer's routed assignments (those capacity kept)
  reap       Lasby et al. 2025 (REAP), eq. 9: S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||f_j(x)||_2, X_j the
             tokens routed to expert j, g_j(x) the weight the layer combines j's output with (after
             top-k and renormalisation), f_j(x) the expert's output; 0 for an expert no token chose
  naee       Lu et al. 2024 (NAEE), §4.1: the subset S of the kept size that minimises
             sum over calibration batches of ||F(X) - F_S(X)||_F, F the layer's routed output and F_S
             the output of the layer holding S alone (its router over S: Router.pruned); each layer
             is fed the full model's inputs (NAEE's layer-wise pruning), both outputs dropless.
             Every subset is tried, so the search is refused past a limit (`naee_subsets`)
  random     a seeded random subset: the baseline the others must beat

The higher a score, the more an expert is kept; ties go to the lower expert id. Grouped routers
(hierarchical, sigmoid with n_group > 1) keep the same number of experts in each group.

Notation: N tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor

from moectl.moe.layer import MoELayer
from moectl.moe.record import RoutingRecord
from moectl.moe.router import TopKRouter, check_keep

__all__ = ["CRITERIA", "LayerScores", "SubsetSearch", "best_per_group", "check_keep", "keep_count", "naee_subsets",
           "random_subset"]

CRITERIA = ("frequency", "reap", "naee", "random")
NAEE_MAX_SUBSETS = 20_000  # per layer: C(16, 8) = 12,870 fits (half of a 16-expert layer); C(32, 16) does not


def best_per_group(scores: Tensor, keep: int, groups: int = 1) -> list[int]:
    """The `keep` experts with the highest scores, keep / groups from each group of consecutive
    experts; ties to the lower id. Ascending ids."""
    per_group, take = scores.numel() // groups, keep // groups
    chosen = []
    for g in range(groups):
        block = scores[g * per_group : (g + 1) * per_group].double()
        order = torch.sort(-block, stable=True).indices[:take]  # stable: equal scores keep id order
        chosen += [g * per_group + int(i) for i in order]
    return sorted(chosen)


def random_subset(num_experts: int, keep: int, groups: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return best_per_group(torch.rand(num_experts, generator=gen), keep, groups)


class LayerScores:
    """One layer's frequency and REAP sums over the calibration batches (`observe` each batch)."""

    def __init__(self, num_experts: int):
        self.assignments = torch.zeros(num_experts, dtype=torch.float64)  # (E,) kept assignments
        self.reap_sum = torch.zeros(num_experts, dtype=torch.float64)  # (E,) sum of g_j(x) ||f_j(x)||

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: Tensor, record: RoutingRecord) -> None:
        """`x` (N, D) the layer's input, `record` its routing after capacity."""
        weights = record.combine_weights  # (N, K), zero where not kept
        for e in range(layer.num_experts):
            token, slot = torch.where((record.expert_idx == e) & record.kept)  # (n_e,), (n_e,)
            if token.numel():
                norms = layer.experts.forward_expert(e, x[token]).float().norm(dim=-1)  # (n_e,) ||f_j(x)||_2
                self.reap_sum[e] += float((weights[token, slot].float() * norms).sum())
                self.assignments[e] += token.numel()

    def scores(self, criterion: str) -> Tensor:
        """(E,) frequency: share of the assignments; reap: REAP's S_j."""
        if criterion == "frequency":
            return self.assignments / self.assignments.sum().clamp_min(1.0)
        if criterion == "reap":
            return self.reap_sum / self.assignments.clamp_min(1.0)
        raise ValueError(f"criterion {criterion!r} is not a score; choose frequency or reap")


def naee_subsets(num_experts: int, keep: int, groups: int = 1) -> int:
    """How many subsets NAEE's search tries: C(B, keep / G) per group, B = E / G, for every group."""
    return math.comb(num_experts // groups, keep // groups) ** groups


class SubsetSearch:
    """NAEE's search for one layer: every subset's reconstruction error summed over the batches
    (`observe` each), then `best()`."""

    def __init__(self, layer: MoELayer, keep: int, max_subsets: int = NAEE_MAX_SUBSETS):
        e, groups = layer.num_experts, layer.router.groups
        count = naee_subsets(e, keep, groups)
        if count > max_subsets:
            raise ValueError(
                f"naee would try {count:,} subsets of {keep} of {e} experts per layer, past its limit of "
                f"{max_subsets:,}; keep closer to all or to none, or choose --criterion reap"
            )
        per_group = e // groups
        blocks = [itertools.combinations(range(g * per_group, (g + 1) * per_group), keep // groups) for g in range(groups)]
        self.candidates = [sorted(itertools.chain(*parts)) for parts in itertools.product(*blocks)]
        # Softmax top-k (Mixtral's router) has a batched path: all subsets' routing from one set of logits.
        self.batched = type(layer.router) is TopKRouter
        self.routers = [] if self.batched else [layer.router.pruned(c) for c in self.candidates]
        self.loss = torch.zeros(len(self.candidates), dtype=torch.float64)

    @staticmethod
    def _routed(record: RoutingRecord, outputs: Tensor, scale: float) -> Tensor:
        """sum_k w_k f_{e_k}(x) * scale from `outputs` (N, E, D), every chosen slot computed."""
        picked = outputs.gather(1, record.expert_idx[..., None].expand(-1, -1, outputs.shape[-1]))  # (N, K, D)
        return (record.weights[..., None] * record.chosen[..., None] * picked).sum(1) * scale  # (N, D)

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: Tensor) -> None:
        """`x` (N, D): the layer's input (real tokens only) in one calibration batch."""
        outputs = torch.stack([layer.experts.forward_expert(e, x).float() for e in range(layer.num_experts)], 1)  # (N, E, D)
        full = self._routed(layer.router(x), outputs, layer.routed_scale)
        if self.batched:
            self._observe_topk(layer, x, outputs, full)
            return
        for i, (subset, router) in enumerate(zip(self.candidates, self.routers)):
            mine = self._routed(router(x), outputs[:, subset], layer.routed_scale)
            self.loss[i] += float(torch.linalg.norm(full - mine))  # Frobenius norm of the batch's error

    def _observe_topk(self, layer: MoELayer, x: Tensor, outputs: Tensor, full: Tensor, chunk: int = 256) -> None:
        """What Router.pruned's TopKRouter computes for each subset S (softmax over the logits of S,
        its top K, renormalised or raw), for `chunk` subsets at a time from one (N, E) logit matrix.
        The error is expanded so that no subset's (N, D) output is formed: with y_n = scale *
        sum_k w_nk Y_n,e_k, ||f_n - y_n||^2 = ||f_n||^2 - 2 scale sum_k w_nk <f_n, Y_n,e_k>
        + scale^2 sum_k,k' w_nk w_nk' <Y_n,e_k, Y_n,e_k'>, from per-token inner products (float64)."""
        router, n, scale = layer.router, x.shape[0], layer.routed_scale
        logits = router.logits(x)  # (N, E); a pruned router's logits are these columns
        y, f = outputs.double(), full.double()
        cross = torch.einsum("nd,ned->ne", f, y)  # (N, E) <f_n, Y_n,e>
        gram = torch.einsum("ned,nfd->nef", y, y)  # (N, E, E) <Y_n,e, Y_n,f>
        f_sq = f.square().sum()
        gram_flat = gram.reshape(n, -1)  # (N, E * E)
        e, k = layer.num_experts, router.top_k
        index = torch.tensor(self.candidates)  # (C, S)
        for start in range(0, len(self.candidates), chunk):
            idx = index[start : start + chunk]  # (b, S)
            b = idx.shape[0]
            chosen = logits[:, idx]  # (N, b, S): each subset's logits
            top, pos = chosen.topk(k, dim=-1)  # (N, b, K): the top probabilities are the top logits
            if router.renormalize:  # softmax over S, renormalised over the K: a softmax over the K logits
                w = top.softmax(dim=-1)
            else:
                w = (top - chosen.logsumexp(dim=-1, keepdim=True)).exp()
            w = w.permute(1, 0, 2).double()  # (b, N, K)
            experts = idx[:, None, :].expand(-1, n, -1).gather(2, pos.permute(1, 0, 2))  # (b, N, K) ids in the layer
            linear = (w * cross[None].expand(b, -1, -1).gather(2, experts)).sum(dim=(1, 2))  # (b,)
            pairs = (experts[..., :, None] * e + experts[..., None, :]).reshape(b, n, k * k)  # (b, N, K*K)
            pair = gram_flat[None].expand(b, -1, -1).gather(2, pairs).reshape(b, n, k, k)  # (b, N, K, K)
            quadratic = torch.einsum("bnk,bnkl,bnl->b", w, pair, w)
            error_sq = f_sq - 2 * scale * linear + scale**2 * quadratic
            self.loss[start : start + idx.shape[0]] += error_sq.clamp_min(0).sqrt()

    def best(self) -> tuple[list[int], float]:
        """The subset with the smallest summed error (the first such on a tie), and that error."""
        i = int(torch.argmin(self.loss))
        return self.candidates[i], float(self.loss[i])


def keep_count(num_experts: int, keep: Optional[int], ratio: Optional[float]) -> int:
    """Experts to keep per layer from --keep N or --ratio R (the fraction removed, rounded to the nearest)."""
    if (keep is None) == (ratio is None):
        raise ValueError("give one of --keep N (experts to keep per layer) or --ratio R (the fraction to remove)")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise ValueError(f"--ratio {ratio}: the fraction of experts to remove must be in [0, 1)")
        keep = num_experts - round(ratio * num_experts)
    return keep
