"""Routers: (N, D) tokens -> a RoutingRecord (before capacity). One class per method:

  topk           softmax top-k (GShard, Mixtral), weights renormalised over the K or raw
  noisy_topk     Shazeer et al. 2017: tunable Gaussian noise, top-k, softmax over the kept logits,
                 and the smooth load estimator behind their load loss
  switch         Switch Transformer: top-1 with multiplicative jitter on the router input
  gshard_top2    GShard: top-2 where the second expert is used with probability 2 * g2
  expert_choice  Zhou et al. 2022: each expert takes its top-C tokens
  soft           dense gating (Jacobs, Jordan et al. 1991): every expert, weighted by softmax
  hierarchical   Shazeer et al. 2017 Appendix B: a primary gate picks groups, a gate per group
                 picks experts in it
  sigmoid        DeepSeek-V3: sigmoid scores, a per-expert bias used for selection only and
                 updated after each step towards uniform load (aux-loss-free balancing),
                 optionally limited to the best groups of experts

Every router's forward takes `valid` (N,) bool, None for all: padding tokens choose no expert and
add nothing to a load estimate or a capacity (moe/record.py).

Routing math runs in fp32 even under bf16 autocast (Switch Transformer's "selective
precision"): the softmax over E logits and the top-k comparison are where low precision
flips choices and destabilises training. Noise (noisy_topk, switch jitter, gshard's random
second expert) is applied in training only.

Notation: N tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.config import ROUTERS
from moectl.moe.record import RoutingRecord, make_record

NOISE_EPS = 1e-2  # floor of the noise std, as in the authors' tensor2tensor code


@contextmanager
def fp32(x: Tensor) -> Iterator[None]:
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def _gate_weight(num_experts: int, d_model: int, init_std: float) -> nn.Parameter:
    w = nn.Parameter(torch.empty(num_experts, d_model))  # W_g^T: (E, D)
    if init_std > 0:
        nn.init.normal_(w, std=init_std)
    else:
        nn.init.zeros_(w)
    return w


class Router(nn.Module):
    """Base: E experts, K per token (checked here, at most `max_k`), and the gate weight W_g^T
    (E, D) when `init_std` is given; subclasses implement forward(x, valid) -> RoutingRecord."""

    #: capacity factors apply (False where the method fixes its own capacity or has none)
    uses_capacity: bool = True
    #: wants update_bias(tokens_per_expert) after every optimizer step (aux-loss-free balancing)
    balances_with_bias: bool = False
    #: the fewest experts it can route over (its K is fixed above 1: gshard_top2)
    min_experts: int = 1

    def __init__(self, d_model: int, num_experts: int, top_k: int, init_std: Optional[float], max_k: Optional[int] = None):
        super().__init__()
        max_k = num_experts if max_k is None else max_k
        if not 1 <= top_k <= max_k:
            raise ValueError(f"top_k={top_k} must be in [1, {max_k}] for {num_experts} experts")
        self.num_experts, self.top_k = num_experts, top_k
        if init_std is not None:
            self.weight = _gate_weight(num_experts, d_model, init_std)

    @property
    def active_experts(self) -> float:
        """Experts run per token on average: what 'active parameters' counts."""
        return float(self.top_k)

    def logits(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, E): x W_g in fp32."""
        return x.float() @ self.weight.float().t()

    @property
    def groups(self) -> int:
        """Groups of consecutive experts that selection treats as units (1: none); pruning keeps
        the same number of experts in each, so the groups survive it."""
        return 1

    def pruned(self, keep: Sequence[int]) -> "Router":
        """A copy that routes over the experts `keep` alone (ascending ids, the same number from
        each group), renumbered 0..len(keep)-1: the rows of its gate weight, noise weight and
        bias that belong to them, and K at most what is left (`pruned_top_k`). Expert pruning
        (moectl prune) gives each pruned MoE layer this router."""
        keep = check_keep(keep, self.num_experts, self.groups, self.min_experts)
        new = copy.deepcopy(self)
        idx = torch.tensor(keep)
        per_group = len(keep) // self.groups
        for table in (new._parameters, new._buffers):  # the per-expert tensors of this router, not of its children
            for name, t in table.items():
                if t is None:
                    continue
                lead = 2 if t.dim() == 3 else 1  # (E, ...) or hierarchical's (G, B, D)
                rows = t.detach().reshape(self.num_experts, *t.shape[lead:])[idx]  # (E', ...)
                rows = rows.reshape(self.groups, per_group, *t.shape[lead:]) if lead == 2 else rows
                table[name] = nn.Parameter(rows.clone(), t.requires_grad) if isinstance(t, nn.Parameter) else rows.clone()
        new.num_experts = len(keep)
        new.top_k = self.pruned_top_k(len(keep))
        return new

    def pruned_top_k(self, num_experts: int) -> int:
        """K once only `num_experts` experts are left (the config's moe.top_k after pruning)."""
        return min(self.top_k, num_experts)


class TopKRouter(Router):
    """p = softmax(x W_g); keep the K largest p_i; weights p_i renormalised over the K, or raw."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True, init_std: float = 0.02):
        super().__init__(d_model, num_experts, top_k, init_std)
        self.renormalize = renormalize

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        with fp32(x):
            logits = self.logits(x)  # (N, E)
            probs = logits.softmax(dim=-1)
            if self.top_k == 1:  # max is several times faster than topk for one expert
                top_probs, expert_idx = probs.max(dim=-1, keepdim=True)  # (N, 1)
            else:
                top_probs, expert_idx = probs.topk(self.top_k, dim=-1)  # (N, K)
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.renormalize else top_probs
        return make_record(logits, probs, expert_idx, weights, valid=valid)


def smooth_load(clean: Tensor, noise_std: Tensor, top_vals: Tensor, top_idx: Tensor, k: int) -> Tensor:
    """Shazeer et al. 2017, Appendix A: P(x, i), the probability that expert i stays in the top k
    when only its own noise is drawn again.

    P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i), where kth_excluding is the (k+1)-th
    largest noisy logit if i is in the top k, else the k-th largest. Shapes: (..., E) inputs,
    top_vals / top_idx the top min(k + 1, E) of the noisy logits; returns (..., E). With k = E every
    expert is always chosen and P is 1.
    """
    if k >= clean.shape[-1]:
        return torch.ones_like(clean)
    thr_in = top_vals[..., k : k + 1]  # (..., 1) the (k+1)-th largest: the bar for an expert in the top k
    thr_out = top_vals[..., k - 1 : k]  # (..., 1) the k-th largest: the bar for one outside it
    is_in = torch.zeros_like(clean, dtype=torch.bool).scatter(-1, top_idx[..., :k], True)
    p_in = torch.special.ndtr((clean - thr_in) / noise_std)
    p_out = torch.special.ndtr((clean - thr_out) / noise_std)
    return torch.where(is_in, p_in, p_out)


class NoisyTopKRouter(Router):
    """Shazeer et al. 2017: H(x) = x W_g + StandardNormal() * Softplus(x W_noise); G(x) =
    softmax(KeepTopK(H(x), k)). Both weight matrices start at zero, as in the paper, so all
    experts start equal. In training the record carries the smooth load estimate (record.load)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int):
        super().__init__(d_model, num_experts, top_k, init_std=0.0)
        self.noise_weight = _gate_weight(num_experts, d_model, 0.0)

    def noisy_logits(self, x: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(clean, noisy, noise std); in eval, noisy == clean and std is None."""
        clean = self.logits(x)  # (N, E)
        if not self.training:
            return clean, clean, None
        std = F.softplus(x.float() @ self.noise_weight.float().t()) + NOISE_EPS  # (N, E)
        return clean, clean + torch.randn_like(clean) * std, std

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        k = self.top_k
        with fp32(x):
            clean, noisy, std = self.noisy_logits(x)
            top_vals, top_idx = noisy.topk(min(k + 1, self.num_experts), dim=-1)  # (N, k+1)
            weights = top_vals[:, :k].softmax(dim=-1)  # softmax over the kept logits: (N, K)
            load = None
            if std is not None:
                p_in = smooth_load(clean, std, top_vals, top_idx, k)  # (N, E)
                load = (p_in if valid is None else p_in * valid[:, None]).sum(0)  # (E,) Load(X) over real tokens
            probs = clean.softmax(dim=-1)
        return make_record(clean, probs, top_idx[:, :k], weights, load=load, valid=valid)


class SwitchRouter(Router):
    """Switch Transformer top-1: the router input is multiplied by U(1 - eps, 1 + eps) in
    training; the expert output is scaled by its raw router probability p_i."""

    def __init__(self, d_model: int, num_experts: int, jitter_eps: float = 1e-2, init_std: float = 0.02):
        super().__init__(d_model, num_experts, 1, init_std)
        self.jitter_eps = jitter_eps

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        with fp32(x):
            h = x.float()
            if self.training and self.jitter_eps > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            logits = self.logits(h)  # (N, E)
            probs = logits.softmax(dim=-1)
            top_prob, expert_idx = probs.max(dim=-1, keepdim=True)  # (N, 1)
        return make_record(logits, probs, expert_idx, top_prob, valid=valid)


class GShardTop2Router(Router):
    """GShard (Lepikhin et al. 2020, Algorithm 1): top-2 gates normalised so g1 + g2 = 1; in
    training the second expert is used only if 2 * g2 > u, u ~ U(0, 1), else the token goes to
    its first expert alone (with weight g1, as in the algorithm: no renormalisation). Its aux
    loss counts first choices only (record.counted). Under capacity the algorithm fills every
    token's first choice before any second choice: moe.drop_policy `rank`, its default."""

    min_experts = 2

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02):
        super().__init__(d_model, num_experts, 2, init_std)  # active: 2 at most (random routing skips some)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        with fp32(x):
            logits = self.logits(x)  # (N, E)
            probs = logits.softmax(dim=-1)
            top2, expert_idx = probs.topk(2, dim=-1)  # (N, 2)
            gates = top2 / top2.sum(dim=-1, keepdim=True)
            chosen = torch.ones_like(expert_idx, dtype=torch.bool)
            if self.training:
                chosen[:, 1] = 2.0 * gates[:, 1] > torch.rand_like(gates[:, 1])
        first = torch.zeros_like(chosen)
        first[:, 0] = True  # the aux loss's c_e counts each token's first choice (Algorithm 1)
        return make_record(logits, probs, expert_idx, gates, chosen, counted=first, valid=valid)


class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: S = softmax(X W_g) over experts; expert j takes the C tokens with the
    highest S[:, j], C = ceil(capacity_factor * N * K / E), combine weight S[token, j], N counting
    the real tokens (padding is never taken). A token may get zero or several experts. In a
    causal LM this choice sees the whole batch, later positions included: see docs/routing.md."""

    uses_capacity = False

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: Optional[float], init_std: float = 0.02):
        super().__init__(d_model, num_experts, top_k, init_std)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor

    @property
    def active_experts(self) -> float:
        return min(self.capacity_factor * self.top_k, float(self.num_experts))

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        n, e = x.shape[0], self.num_experts
        # Host sync with padding: topk needs C as a Python int, and C counts the real tokens.
        real = n if valid is None else int(valid.sum())
        with fp32(x):
            logits = self.logits(x)  # (N, E)
            probs = logits.softmax(dim=-1)
            scores = probs if valid is None else probs.masked_fill(~valid[:, None], -1.0)  # padding ranks last
            _, tokens = scores.t().topk(self.capacity(real), dim=-1)  # (E, C) each expert's tokens
            chosen = torch.zeros(e, n, dtype=torch.bool, device=x.device).scatter_(1, tokens, True).t()  # (N, E)
        expert_idx = torch.arange(e, device=x.device).expand(n, e)  # slot j is expert j
        return make_record(logits, probs, expert_idx, probs, chosen, valid=valid)


class SoftRouter(Router):
    """Dense gating: y = sum_i G(x)_i E_i(x) with G = softmax(x W_g); every expert runs."""

    uses_capacity = False

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02):
        super().__init__(d_model, num_experts, num_experts, init_std)  # K = E: every expert, every token

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        n, e = x.shape[0], self.num_experts
        with fp32(x):
            logits = self.logits(x)  # (N, E)
            probs = logits.softmax(dim=-1)
        return make_record(logits, probs, torch.arange(e, device=x.device).expand(n, e), probs, valid=valid)

    def pruned_top_k(self, num_experts: int) -> int:
        return num_experts  # every expert that is left


class HierarchicalRouter(Router):
    """Shazeer et al. 2017, Appendix B (MoE-h): a noisy top-k primary gate picks `group_top_k` of
    G groups; each group a has its own noisy top-k gate over its B = E / G experts.

    Expert (a, b) is expert a * B + b; its weight is G_primary(x)_a * G_a(x)_b, so each token's
    weights sum to 1. The leaf load is Load_H(X)_{a,b} = Load_primary(X)_a * Load_a(X^(a))_b /
    |X^(a)|, X^(a) the tokens sent to group a; the record's `group` is the primary gate's record
    (balanced too only with moe.balance_primary, moe/losses.py). The leaf logits are l_a + c_{a,b},
    primary plus secondary clean logits: their logsumexp, what the z-loss squares, is
    log sum_a e^{l_a} Z_a with Z_a = sum_b e^{c_{a,b}} group a's partition (not the log-partition of
    either gate, nor of `probs`); probs are G_p softmax times G_a softmax.
    """

    def __init__(self, d_model: int, num_experts: int, num_groups: int, group_top_k: int, top_k: int):
        if num_experts % num_groups:
            raise ValueError(f"num_experts={num_experts} must be a multiple of num_groups={num_groups}")
        per_group = num_experts // num_groups
        super().__init__(d_model, num_experts, top_k, init_std=None, max_k=per_group)
        self.num_groups, self.per_group = num_groups, per_group
        self.primary = NoisyTopKRouter(d_model, num_groups, group_top_k)
        # Zero init, as the paper's gates: (G, B, D) gate and noise weights of the secondary gates.
        self.weight = nn.Parameter(torch.zeros(num_groups, per_group, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_groups, per_group, d_model))

    @property
    def active_experts(self) -> float:
        return float(self.primary.top_k * self.top_k)

    @property
    def groups(self) -> int:
        return self.num_groups

    def pruned(self, keep: Sequence[int]) -> "Router":
        new = super().pruned(keep)
        new.per_group = new.num_experts // self.num_groups
        return new

    def pruned_top_k(self, num_experts: int) -> int:
        return min(self.top_k, num_experts // self.num_groups)  # K is per group

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        n, k, b = x.shape[0], self.top_k, self.per_group
        group = self.primary(x, valid)  # over G groups: expert_idx (N, Kp), weights (N, Kp), load (G,)
        kp = group.top_k
        with fp32(x):
            h = x.float()
            clean = torch.einsum("nd,gbd->ngb", h, self.weight.float())  # (N, G, B)
            std = None
            noisy = clean
            if self.training:
                std = F.softplus(torch.einsum("nd,gbd->ngb", h, self.noise_weight.float())) + NOISE_EPS
                noisy = clean + torch.randn_like(clean) * std
            top_vals, top_idx = noisy.topk(min(k + 1, b), dim=-1)  # (N, G, k+1)
            inner_w = top_vals[..., :k].softmax(dim=-1)  # (N, G, K) each group's gate
            groups = group.expert_idx  # (N, Kp)
            pick = lambda t: t.gather(1, groups[..., None].expand(n, kp, t.shape[-1]))  # (N, G, .) -> (N, Kp, .)  # noqa: E731
            expert_idx = (groups[..., None] * b + pick(top_idx)[..., :k]).reshape(n, kp * k)  # (N, Kp*K)
            weights = (group.weights[..., None] * pick(inner_w)).reshape(n, kp * k)  # (N, Kp*K)
            logits = (group.logits[..., None] + clean).reshape(n, -1)  # (N, G, B) -> (N, E)
            probs = (group.probs[..., None] * clean.softmax(dim=-1)).reshape(n, -1)  # (N, E)
            load = None
            if std is not None:
                p_in = smooth_load(clean, std, top_vals, top_idx, k)  # (N, G, B)
                routed = torch.zeros(n, self.num_groups, device=x.device).scatter_(1, groups, group.chosen.float())  # (N, G) x in X^(a)
                load_a = (p_in * routed[..., None]).sum(0)  # (G, B) Load_a(X^(a))
                load = (group.load[:, None] * load_a / routed.sum(0).clamp_min(1.0)[:, None]).reshape(-1)  # (E,)
        return make_record(logits, probs, expert_idx, weights, load=load, group=group, valid=valid)


class SigmoidRouter(Router):
    """DeepSeek-V3 routing with auxiliary-loss-free balancing.

    s_i = sigmoid(x W_g)_i; the top K of s_i + b_i are selected, where the bias b only steers
    selection; weights are s_i over the selected (renormalised to sum 1, or raw); V3's routed
    scaling is the MoE layer's `routed_scale`. Group-limited routing (V3 §2.1.2, `n_group` > 1): the experts form n_group
    groups, a group's score is the sum of its two largest s_i + b_i, and only the `topk_group`
    best groups are eligible. After each optimizer step, update_bias(counts) moves b_i by
    rate * sign(mean load - load_i). The bias is a buffer, so it is saved with the weights.
    probs (the normalised affinities s' of V3's sequence-wise loss, and the statistics) are s
    normalised to sum 1 over all experts; V3's loss counts each token's top-K of them (moe/losses.py),
    not the biased, group-limited choice.
    """

    balances_with_bias = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        bias_update_rate: float = 1e-3,
        renormalize: bool = True,
        init_std: float = 0.02,
        n_group: int = 1,
        topk_group: int = 1,
    ):
        super().__init__(d_model, num_experts, top_k, init_std)
        if num_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"num_experts={num_experts}, n_group={n_group}, topk_group={topk_group} do not fit")
        self.bias_update_rate, self.renormalize = bias_update_rate, renormalize
        self.n_group, self.topk_group = n_group, topk_group
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def groups(self) -> int:
        return self.n_group

    def pruned_top_k(self, num_experts: int) -> int:
        return min(self.top_k, self.topk_group * (num_experts // self.n_group))  # what the eligible groups hold

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> RoutingRecord:
        with fp32(x):
            logits = self.logits(x)  # (N, E)
            scores = logits.sigmoid()
            select = scores + self.expert_bias.float()  # (N, E) the bias steers selection only
            if self.n_group > 1:
                grouped = select.view(select.shape[0], self.n_group, -1)  # (N, G, E/G)
                best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices  # (N, M) groups
                shut = torch.ones(grouped.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, best, False)
                select = grouped.masked_fill(shut[..., None], float("-inf")).view_as(select)
            _, expert_idx = select.topk(self.top_k, dim=-1)  # (N, K)
            gates = scores.gather(1, expert_idx)
            if self.renormalize:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        return make_record(logits, probs, expert_idx, gates, valid=valid)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """b_i += rate * sign(mean load - load_i), from one optimizer step's (global) counts."""
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


def check_keep(keep: Sequence[int], num_experts: int, groups: int = 1, min_experts: int = 1) -> list[int]:
    """`keep` as a sorted list of distinct expert ids, checked: at least `min_experts`, at most all,
    and the same number from each of `groups` groups of consecutive experts."""
    keep = sorted(int(e) for e in keep)
    if len(set(keep)) != len(keep) or not all(0 <= e < num_experts for e in keep):
        raise ValueError(f"experts to keep {keep} must be distinct ids in [0, {num_experts})")
    if not min_experts <= len(keep) <= num_experts:
        raise ValueError(f"keep {len(keep)} of {num_experts} experts: keep at least {min_experts} and at most all")
    per_group = num_experts // groups
    counts = [sum(1 for e in keep if e // per_group == g) for g in range(groups)]
    if len(set(counts)) != 1:
        raise ValueError(f"keep the same number of experts in each of the {groups} groups (kept per group: {counts})")
    return keep


def make_router(
    kind: str,
    d_model: int,
    num_experts: int,
    top_k: int,
    *,
    renormalize: bool = True,
    init_std: float = 0.02,
    capacity_factor: Optional[float] = None,
    jitter_eps: float = 1e-2,
    num_groups: int = 1,
    group_top_k: int = 1,
    bias_update_rate: float = 1e-3,
    n_group: int = 1,
    topk_group: int = 1,
) -> Router:
    """The router named `kind` (one of config.ROUTERS), from plain arguments."""
    d, e, k = d_model, num_experts, top_k
    build = {
        "topk": lambda: TopKRouter(d, e, k, renormalize, init_std),
        "noisy_topk": lambda: NoisyTopKRouter(d, e, k),
        "switch": lambda: SwitchRouter(d, e, jitter_eps, init_std),
        "gshard_top2": lambda: GShardTop2Router(d, e, init_std),
        "expert_choice": lambda: ExpertChoiceRouter(d, e, k, capacity_factor, init_std),
        "soft": lambda: SoftRouter(d, e, init_std),
        "hierarchical": lambda: HierarchicalRouter(d, e, num_groups, group_top_k, k),
        "sigmoid": lambda: SigmoidRouter(d, e, k, bias_update_rate, renormalize, init_std, n_group, topk_group),
    }
    if kind not in build:
        raise ValueError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")
    return build[kind]()
