"""The router family of moectl.moe: every router's contract, each method's paper formulas, the
MoE layer's capacity / shared-expert / dropout features, router config checks and training.

Formulas are those of /work/shared/MOE_MATH.md, transcribed here by hand (Python floats and
math.erf, or plain torch ops in float64), never through the library's own helpers:
noisy top-k and its smooth load estimator and hierarchical MoE (Shazeer et al. 2017), Switch
top-1 with jitter and its load-balancing loss (Fedus et al. 2021), GShard top-2 random routing
(Lepikhin et al. 2020), expert choice (Zhou et al. 2022), soft gating (Jacobs et al. 1991) and
DeepSeek-V3 sigmoid routing with aux-loss-free bias balancing.

Conventions checked: CV^2 uses the population variance; the Switch loss is E * sum_i f_i P_i with
f_i the fraction of the chosen assignments (so 1.0 under uniform routing for any K).

Notation: N tokens, D model dim, H expert hidden size, E experts, K experts per token,
G groups, B = E / G experts per group, Kp groups per token.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import assert_sorted_equals_loop, tiny_config
from moectl import config
from moectl.common.errors import ConfigError
from moectl.models import build_model, build_moe_layer
from moectl.config import ROUTERS
from moectl.moe import MoELayer, make_router, routing_losses
from moectl.moe.router import NOISE_EPS, smooth_load
from moectl.commands.train import fit

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")

D, H = 16, 12
TOL = dict(rtol=1e-5, atol=1e-6)

# kind -> (E, the router's top_k, slots per token (the layer's K, for capacity), make_router extras)
SPECS = {
    "topk": (8, 2, 2, {}),
    "noisy_topk": (8, 2, 2, {}),
    "switch": (8, 1, 1, {}),
    "gshard_top2": (8, 2, 2, {}),
    "expert_choice": (8, 2, 2, {}),
    "soft": (8, 8, 8, {}),
    "hierarchical": (16, 2, 4, {"num_groups": 4, "group_top_k": 2}),  # B = 4, K = 2 of them, Kp = 2 of 4 groups
    "sigmoid": (8, 2, 2, {}),
}
CAPACITY_ROUTERS = [k for k in ROUTERS if k not in ("expert_choice", "soft")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster, above all when another process shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_specs_cover_every_router():
    assert set(SPECS) == set(ROUTERS)


# ------------------------------------------------------------------------------------ helpers


def build_router(kind: str, seed: int = 0, std: float = 0.5, cf=None, **kw):
    e, k, _, extra = SPECS[kind]
    torch.manual_seed(seed)
    router = make_router(kind, D, e, k, init_std=std, capacity_factor=cf, **{**extra, **kw})
    with torch.no_grad():  # noisy top-k and hierarchical gates start at zero: make every gate nontrivial
        for p in router.parameters():
            p.normal_(0.0, std)
    return router


def build_layer(kind: str, cf=None, seed: int = 0, **layer_kw) -> MoELayer:
    e, _, slots, _ = SPECS[kind]
    router = build_router(kind, seed, cf=cf)
    torch.manual_seed(seed + 1000)
    return MoELayer(D, e, slots, H, "swiglu", capacity_factor=cf, init_std=0.5, router=router, **layer_kw)


def phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def cv2(v: list[float]) -> float:
    """CV(v)^2 with the population variance."""
    m = sum(v) / len(v)
    return (sum((a - m) ** 2 for a in v) / len(v)) / (m * m)


def softmax_list(v: list[float]) -> list[float]:
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    return [a / sum(ex) for a in ex]


def swiglu_expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e written out: down(silu(x W_gate) * (x W_up))."""
    ex = layer.experts
    g = x @ ex.w_gate[e]
    return ((g * torch.sigmoid(g)) * (x @ ex.w_up[e])) @ ex.w_down[e]


def noisy_top_k_by_hand(clean: list[float], noisy: list[float], std: list[float], k: int):
    """Shazeer et al. 2017: the top-k of H, G = softmax over the kept H, and P(x, i) for every i."""
    e = len(clean)
    order = sorted(range(e), key=lambda i: -noisy[i])
    top = order[:k]
    gates = softmax_list([noisy[i] for i in top])
    p = []
    for i in range(e):
        if k >= e:
            p.append(1.0)
            continue
        thr = noisy[order[k]] if i in top else noisy[order[k - 1]]  # kth_excluding(H, k, i)
        p.append(phi((clean[i] - thr) / std[i]))
    return top, gates, p


# -------------------------------------------------------------------- 1. every router's contract


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ROUTERS)
def test_routing_math_is_fp32_under_bf16_autocast(kind, training):
    layer = build_layer(kind)
    layer.train(training)
    torch.manual_seed(1)
    x = torch.randn(32, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.t()).dtype == torch.bfloat16  # autocast is really on
        for inp in (x, x.bfloat16()):
            torch.manual_seed(2)
            from_router = layer.router(inp)
            torch.manual_seed(2)
            _, from_layer = layer(inp)
            for rec in (from_router, from_layer, from_router.group):
                if rec is None:
                    continue
                assert rec.logits.dtype == torch.float32
                assert rec.probs.dtype == torch.float32
                assert rec.weights.dtype == torch.float32
                if rec.load is not None:
                    assert rec.load.dtype == torch.float32
            if training and kind in ("noisy_topk", "hierarchical"):
                assert from_router.load is not None
        if not training:
            rec = layer.router(x)
    if training:
        return
    # The values are fp32 ones too: far closer to float64 than a bf16 matmul could be.
    xd, r = x.double(), layer.router
    if kind == "hierarchical":
        ref = (xd @ r.primary.weight.detach().double().t())[:, :, None] + torch.einsum(
            "nd,gbd->ngb", xd, r.weight.detach().double()
        )
        ref = ref.reshape(32, -1)
    else:
        ref = xd @ r.weight.detach().double().t()
    torch.testing.assert_close(rec.logits.double(), ref, rtol=0, atol=2e-5)
    if kind != "hierarchical":  # what bf16 routing math would have given instead
        bf16_logits = (x.bfloat16() @ r.weight.detach().bfloat16().t()).double()
        assert (bf16_logits - ref).abs().max() > 1e-3
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "cf0.5"])
@pytest.mark.parametrize("kind", ROUTERS)
def test_record_is_consistent_after_layer_forward(kind, cf):
    layer = build_layer(kind, cf=cf)
    layer.train()
    e = SPECS[kind][0]
    n = 64
    torch.manual_seed(3)
    x = torch.randn(n, D)
    _, rec = layer(x)
    assert rec.tokens_per_expert.dtype == torch.int64 and rec.num_dropped.dtype == torch.int64
    assert int(rec.tokens_per_expert.sum() + rec.num_dropped) == int(rec.chosen.sum())
    assert not bool((rec.kept & ~rec.chosen).any())  # kept implies chosen
    assert torch.equal(rec.tokens_per_expert, torch.bincount(rec.expert_idx[rec.kept], minlength=e))
    assert int(rec.num_dropped) == int((rec.chosen & ~rec.kept).sum())
    assert torch.equal(rec.combine_weights == 0, ~rec.kept | (rec.weights == 0))
    cap = layer.capacity(n)
    if cf is not None and kind in CAPACITY_ROUTERS:
        assert cap == max(0, math.ceil(cf * n * SPECS[kind][2] / e))
        assert int(rec.tokens_per_expert.max()) <= cap
        assert int(rec.num_dropped) > 0  # the capacity really bites
        assert torch.equal(rec.tokens_per_expert, rec.chosen_per_expert().clamp(max=cap))
    else:
        assert cap is None
        assert int(rec.num_dropped) == 0 and torch.equal(rec.kept, rec.chosen)


@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "cf0.5"])
@pytest.mark.parametrize("kind", ROUTERS)
def test_sorted_path_equals_loop_reference(kind, cf):
    # float64 experts: the two paths sum in different orders, and fp32 rounding would blur a real difference.
    n = 40
    torch.manual_seed(4)
    x = torch.randn(n, D, dtype=torch.float64)
    target = torch.randn(n, D, dtype=torch.float64)
    # The same noise / jitter / random routing for both paths.
    out_s, _, _, g_s = assert_sorted_equals_loop(
        lambda impl: build_layer(kind, cf=cf, impl=impl).double().train(), x, target, seed=5, tol=TOL
    )
    assert out_s.abs().max() > 1e-2
    assert any(name.startswith("router.") and g.abs().max() > 0 for name, g in g_s.items())


@pytest.mark.parametrize("kind", ROUTERS)
def test_routing_losses_alone_reach_every_router_parameter(kind):
    layer = build_layer(kind)
    layer.train()  # noise weights get gradient only through the (training-only) smooth load estimator
    torch.manual_seed(6)
    x = torch.randn(48, D)
    torch.manual_seed(7)
    _, rec = layer(x)  # output unused
    terms = routing_losses(rec)
    if kind in ("expert_choice", "soft"):
        # Every expert gets the same number of assignments by construction, so f_i = 1/E and the
        # Switch loss is E * sum_i P_i / E = 1 whatever the router weights: it is constant, no
        # gradient. These two routers are reached through the z-loss instead.
        assert float(terms["load_balance"]) == pytest.approx(1.0, abs=1e-6)
        names = ["z"]
    elif kind in ("noisy_topk", "hierarchical"):
        names = ["load_balance", "importance", "load"]
    else:
        names = ["load_balance"]
    loss = sum(terms[name] for name in names)
    loss.backward()
    router_params = dict(layer.router.named_parameters())
    expected = {
        "noisy_topk": {"weight", "noise_weight"},
        "hierarchical": {"weight", "noise_weight", "primary.weight", "primary.noise_weight"},
    }.get(kind, {"weight"})
    assert set(router_params) == expected
    for name, p in router_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    for p in layer.experts.parameters():
        assert p.grad is None


def test_noise_weight_gets_gradient_only_from_the_load_loss_in_training():
    layer = build_layer("noisy_topk")
    x = torch.randn(48, D)
    layer.train()
    _, rec = layer(x)
    routing_losses(rec)["load"].backward()
    assert layer.router.noise_weight.grad.abs().max() > 0
    layer.zero_grad(set_to_none=True)
    layer.eval()
    _, rec = layer(x)
    assert rec.load is None
    terms = routing_losses(rec)
    assert float(terms["load"]) == 0.0
    (terms["load_balance"] + terms["importance"] + terms["z"]).backward()
    assert layer.router.noise_weight.grad is None  # no noise in eval: nothing depends on it
    assert layer.router.weight.grad.abs().max() > 0


# ------------------------------------------------------------------------- 2. noisy top-k gating


def test_noisy_topk_matches_shazeer_formulas_and_losses():
    e, k, n = 8, 2, 24
    router = build_router("noisy_topk", seed=11)
    router.train()
    torch.manual_seed(12)
    x = torch.randn(n, D)
    torch.manual_seed(13)
    rec = router(x)
    torch.manual_seed(13)
    noise = torch.randn(n, e)  # the draw the router made: randn_like((N, E) fp32 logits)
    xd = x.double()
    clean = xd @ router.weight.detach().double().t()
    std = F.softplus(xd @ router.noise_weight.detach().double().t()) + NOISE_EPS
    noisy = clean + noise.double() * std
    gate = [[0.0] * e for _ in range(n)]  # G(x), dense
    load = [0.0] * e
    for t in range(n):
        top, gates, p = noisy_top_k_by_hand(clean[t].tolist(), noisy[t].tolist(), std[t].tolist(), k)
        assert rec.expert_idx[t].tolist() == top
        assert rec.weights[t].tolist() == pytest.approx(gates, rel=1e-5, abs=1e-6)
        for i, g in zip(top, gates):
            gate[t][i] = g
        for i in range(e):
            load[i] += p[i]
    assert rec.load.tolist() == pytest.approx(load, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(rec.logits.double(), clean, rtol=0, atol=1e-5)
    importance = [sum(gate[t][i] for t in range(n)) for i in range(e)]
    terms = routing_losses(rec)
    assert float(terms["importance"]) == pytest.approx(cv2(importance), rel=1e-4)
    assert float(terms["load"]) == pytest.approx(cv2(load), rel=1e-4)
    assert cv2(importance) > 1e-3 and cv2(load) > 1e-3  # not trivially balanced
    # The noise matters: the clean top-k differs from the noisy one for some token.
    assert not torch.equal(rec.expert_idx, clean.topk(k, dim=-1).indices)

    # Importance uses the gate values before capacity: a capacity-limited layer gives the same loss.
    layer = MoELayer(D, e, k, H, capacity_factor=0.25, router=router)
    layer.train()
    torch.manual_seed(13)
    _, capped = layer(x)
    assert int(capped.num_dropped) > 0
    assert float(routing_losses(capped)["importance"]) == pytest.approx(cv2(importance), rel=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_smooth_load_matches_erf_transcription(k):
    g = torch.Generator().manual_seed(20 + k)
    n, e = 7, 5
    clean = torch.randn(n, e, generator=g)
    std = F.softplus(torch.randn(n, e, generator=g)) + NOISE_EPS
    noisy = clean + torch.randn(n, e, generator=g) * std
    top_vals, top_idx = noisy.topk(min(k + 1, e), dim=-1)
    got = smooth_load(clean, std, top_vals, top_idx, k)
    assert got.shape == (n, e)
    cases = set()
    for t in range(n):
        _, _, p = noisy_top_k_by_hand(clean[t].tolist(), noisy[t].tolist(), std[t].tolist(), k)
        in_top = set(top_idx[t, :k].tolist())
        for i in range(e):
            cases.add(i in in_top)
            assert float(got[t, i]) == pytest.approx(p[i], rel=1e-5, abs=1e-7), (t, i)
    if k < e:
        assert cases == {True, False}  # both the in-top-k and the out-of-top-k threshold are exercised
    else:
        assert bool((got == 1).all())


def test_smooth_load_is_the_expected_top_k_membership():
    """P(x, i) = Pr(i in top k | the other experts' noise), so E[P(x, i)] over the noise is the
    frequency with which i is in the top k. Per sample, P - 1[i in top k] has mean 0 and variance
    E[P (1 - P)] <= 1/4, so over M draws the two means differ by at most 0.5 / sqrt(M) per std:
    a 5-std tolerance is 2.5 / sqrt(M) (0.018 for M = 20000)."""
    e, k, m = 8, 2, 20000
    router = build_router("noisy_topk", seed=30, std=0.4)
    router.train()
    torch.manual_seed(31)
    tokens = torch.randn(3, D)
    tol = 2.5 / math.sqrt(m)
    spread = 0.0
    for t in range(3):
        xs = tokens[t].expand(m, D).contiguous()
        torch.manual_seed(40 + t)
        with torch.no_grad():
            rec = router(xs)
        freq = torch.bincount(rec.expert_idx.flatten(), minlength=e).double() / m
        mean_p = rec.load.double() / m
        torch.testing.assert_close(mean_p, freq, rtol=0, atol=tol)
        assert float(freq.sum()) == pytest.approx(k)
        spread = max(spread, float((freq - k / e).abs().max()))
    assert spread > 0.2  # the tokens have real preferences: not a uniform-vs-uniform comparison


def test_noisy_topk_eval_is_deterministic_and_noise_free():
    e, k = 8, 2
    router = build_router("noisy_topk", seed=50)
    router.eval()
    x = torch.randn(30, D)
    a, b = router(x), router(x)
    assert a.load is None and b.load is None
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.weights, b.weights)
    clean = x.double() @ router.weight.detach().double().t()
    top = clean.topk(k, dim=-1)
    assert torch.equal(a.expert_idx, top.indices)
    torch.testing.assert_close(a.weights.double(), top.values.softmax(-1), rtol=0, atol=1e-6)
    router.train()
    torch.manual_seed(1)
    c = router(x)
    torch.manual_seed(2)
    d = router(x)
    assert c.load is not None and not torch.equal(c.weights, d.weights)


# ------------------------------------------------------------------------------------ 3. switch


def test_switch_is_top1_with_raw_probability_and_deterministic_in_eval():
    router = build_router("switch", seed=60)
    router.eval()
    x = torch.randn(40, D)
    a, b = router(x), router(x)
    assert a.expert_idx.shape == (40, 1) and a.weights.shape == (40, 1)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.expert_idx, b.expert_idx)
    p = (x.double() @ router.weight.detach().double().t()).softmax(-1)
    assert torch.equal(a.expert_idx[:, 0], p.argmax(-1))
    torch.testing.assert_close(a.weights[:, 0].double(), p.max(-1).values, rtol=0, atol=1e-6)
    assert torch.equal(a.weights, a.probs.gather(1, a.expert_idx))  # the raw probability, not renormalised
    assert bool((a.weights < 0.999).all())


@pytest.mark.parametrize("eps", [1e-2, 0.3])
def test_switch_jitter_multiplies_the_router_input_in_training(eps):
    router = build_router("switch", seed=61, jitter_eps=eps)
    router.train()
    n = 200
    x = torch.randn(n, D)
    torch.manual_seed(62)
    rec = router(x)
    torch.manual_seed(62)
    u = torch.empty(n, D).uniform_(1.0 - eps, 1.0 + eps)
    assert float(u.min()) >= 1.0 - eps and float(u.max()) <= 1.0 + eps
    logits = (x * u).double() @ router.weight.detach().double().t()
    torch.testing.assert_close(rec.logits.double(), logits, rtol=0, atol=1e-5)
    assert torch.equal(rec.expert_idx[:, 0], logits.argmax(-1))
    torch.testing.assert_close(rec.weights[:, 0].double(), logits.softmax(-1).max(-1).values, rtol=0, atol=1e-6)
    clean = x.double() @ router.weight.detach().double().t()
    assert (rec.logits.double() - clean).abs().max() > eps / 10  # the jitter is really applied
    if eps == 0.3:
        assert not torch.equal(rec.expert_idx[:, 0], clean.argmax(-1))  # and can change the choice


def test_switch_loss_is_alpha_at_uniform_routing_and_matches_formula():
    e, n, alpha = 8, 32, 1e-2
    router = build_router("switch", std=0.0)
    with torch.no_grad():
        router.weight.zero_()
    router.eval()
    rec = router(torch.randn(n, D))
    assert torch.equal(rec.probs, torch.full((n, e), 1.0 / e))
    balanced = (torch.arange(n) % e)[:, None]
    rec = dataclasses.replace(rec, expert_idx=balanced)
    assert torch.bincount(balanced.flatten(), minlength=e).tolist() == [n // e] * e
    lb = routing_losses(rec)["load_balance"]
    assert alpha * float(lb) == alpha
    assert torch.equal(alpha * lb, torch.tensor(alpha))

    # A real (non-uniform) switch record: alpha * E * sum_i f_i P_i written out.
    router = build_router("switch", seed=63)
    router.eval()
    rec = router(torch.randn(n, D))
    idx, probs = rec.expert_idx[:, 0].tolist(), rec.probs.tolist()
    expected = alpha * e * sum((idx.count(i) / n) * (sum(row[i] for row in probs) / n) for i in range(e))
    assert alpha * float(routing_losses(rec)["load_balance"]) == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(alpha, rel=1e-3)


# ---------------------------------------------------------------------------------- 4. GShard


def test_gshard_gates_are_normalised_and_eval_uses_both():
    router = build_router("gshard_top2", seed=70)
    router.eval()
    x = torch.randn(50, D)
    rec = router(x)
    assert bool(rec.chosen.all())
    p = (x.double() @ router.weight.detach().double().t()).softmax(-1)
    top = p.topk(2, dim=-1)
    assert torch.equal(rec.expert_idx, top.indices)
    torch.testing.assert_close(rec.weights.double(), top.values / top.values.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(50), rtol=0, atol=1e-6)
    assert bool((rec.weights[:, 0] >= rec.weights[:, 1]).all())


def test_gshard_second_expert_is_used_with_probability_2_g2():
    """Algorithm 1: the second expert is used iff 2 g2 > u, u ~ U(0, 1): a Bernoulli(min(1, 2 g2)).
    Over M tokens with fixed gates the fraction has std sqrt(p (1 - p) / M); tolerance 5 stds."""
    e, m = 8, 20000
    router = build_router("gshard_top2")
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :e] = torch.eye(e)  # logits = x[:, :E]
    router.train()
    skipped_seen = False
    for d in (0.2, 1.0, 2.5):  # logit gap between the top two: g2 = 1 / (1 + e^d)
        logits = [2.0, 2.0 - d] + [-5.0] * (e - 2)
        x = torch.zeros(m, D)
        x[:, :e] = torch.tensor(logits)
        torch.manual_seed(71)
        rec = router(x)
        p = softmax_list(logits)
        g1, g2 = p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])
        assert g2 == pytest.approx(1.0 / (1.0 + math.exp(d)), rel=1e-9)
        target = min(1.0, 2.0 * g2)
        frac = float(rec.chosen[:, 1].double().mean())
        assert abs(frac - target) < 5 * math.sqrt(target * (1 - target) / m) + 1e-9, (d, frac, target)
        assert bool(rec.chosen[:, 0].all()) and rec.expert_idx[0].tolist() == [0, 1]
        # Weights are g1 and g2, never renormalised: a skipped second slot leaves the first at g1.
        skipped = ~rec.chosen[:, 1]
        skipped_seen |= bool(skipped.any())
        assert float((rec.weights[:, 0].double() - g1).abs().max()) < 1e-6
        assert bool((rec.weights[skipped, 1] == 0).all())
        assert float((rec.weights[~skipped, 1].double() - g2).abs().max()) < 1e-6
        assert bool((rec.weights[skipped].sum(-1) < 1 - 1e-3).all())
    assert skipped_seen


def gshard_algorithm_1_kept(first: list[int], second: list[int], use_second: list[bool], capacity: int) -> list[list[bool]]:
    """GShard (Lepikhin et al. 2020), Algorithm 1, transcribed: every token's first choice, in
    token order, takes a slot while its expert has room; then every token's (randomly kept)
    second choice, in token order, fills what is left."""
    count = [0] * (max(first + second) + 1)
    kept = [[False, False] for _ in first]
    for t, e in enumerate(first):
        if count[e] < capacity:
            kept[t][0], count[e] = True, count[e] + 1
    for t, e in enumerate(second):
        if use_second[t] and count[e] < capacity:
            kept[t][1], count[e] = True, count[e] + 1
    return kept


def gshard_layer(e: int, capacity_factor: float, drop_policy: str = "rank", seed: int = 72) -> MoELayer:
    torch.manual_seed(seed)
    router = make_router("gshard_top2", D, e, 2, init_std=1.0)
    return MoELayer(D, e, 2, H, capacity_factor=capacity_factor, router=router, drop_policy=drop_policy, init_std=0.5)


def test_gshard_capacity_fills_every_first_choice_before_any_second_choice():
    # The case: 2 tokens, 2 experts, capacity 1, opposite preferences. Algorithm 1 keeps both
    # first choices; serving token 0's second choice before token 1's first would drop token 1 entirely.
    layer = gshard_layer(2, capacity_factor=0.5).eval()  # capacity = ceil(0.5 * 2 * 2 / 2) = 1
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 1] = 1.0, 1.0
    x = torch.zeros(2, D)
    x[0, 0], x[1, 1] = 2.0, 2.0
    _, rec = layer(x)
    assert layer.capacity(2) == 1 and rec.expert_idx.tolist() == [[0, 1], [1, 0]]
    assert rec.kept.tolist() == [[True, False], [True, False]]
    assert config.from_dict({"moe": {"router": "gshard_top2"}}).moe.drop_policy == "rank"  # the paper's order by default
    assert config.from_dict({"moe": {"router": "topk"}}).moe.drop_policy == "position"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cf", [0.25, 0.4, 0.5])
def test_gshard_capacity_matches_a_transcription_of_algorithm_1(cf, training):
    e, n = 4, 40
    layer = gshard_layer(e, cf).train(training)
    torch.manual_seed(73)
    x = torch.randn(n, D)
    _, rec = layer(x)  # one sequence: token order is position order
    expect = gshard_algorithm_1_kept(rec.expert_idx[:, 0].tolist(), rec.expert_idx[:, 1].tolist(),
                                     rec.chosen[:, 1].tolist(), layer.capacity(n))
    assert rec.kept.tolist() == expect
    assert int(rec.num_dropped) > 0  # the capacity binds
    # The causal position order differs: it serves each token's both choices before the next token's.
    position = gshard_layer(e, cf, "position").train(training)
    position.load_state_dict(layer.state_dict())
    torch.manual_seed(73)
    rec2 = position(torch.randn(n, D))[1]  # the same tokens and random second choices
    assert torch.equal(rec2.chosen, rec.chosen) and rec2.kept.tolist() != expect


def test_gshard_order_is_flagged_as_seeing_later_tokens():
    from moectl.models import lookahead

    cfg = config.from_dict({"moe": {"router": "gshard_top2", "capacity_factor": 1.25}})
    assert any("moe.drop_policy=rank" in w for w in lookahead(cfg.model, cfg.moe, training=True))
    causal = config.from_dict({"moe": {"router": "gshard_top2", "capacity_factor": 1.25, "drop_policy": "position"}})
    assert lookahead(causal.model, causal.moe, training=True) == []
    dropless = config.from_dict({"moe": {"router": "gshard_top2"}})
    assert lookahead(dropless.model, dropless.moe, training=True) == []


# --------------------------------------------------------------------------- 5. expert choice


@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 3.0, 100.0])
def test_expert_choice_takes_top_c_tokens_per_expert(cf):
    e, k, n = 8, 2, 20
    layer = build_layer("expert_choice", cf=cf, seed=80)
    torch.manual_seed(81)
    x = torch.randn(n, D)
    y, rec = layer(x)
    c = min(n, math.ceil((1.0 if cf is None else cf) * n * k / e))
    assert rec.tokens_per_expert.tolist() == [c] * e
    assert int(rec.num_dropped) == 0 and rec.expert_idx.shape == (n, e)
    s = (x.double() @ layer.router.weight.detach().double().t()).softmax(-1)  # S: (N, E)
    chosen = torch.zeros(n, e, dtype=torch.bool)
    for j in range(e):
        col = s[:, j].tolist()
        for t in sorted(range(n), key=lambda t: -col[t])[:c]:
            chosen[t, j] = True
    assert torch.equal(rec.chosen, chosen)
    torch.testing.assert_close(rec.weights.double(), s * chosen, rtol=0, atol=1e-6)
    per_token = chosen.sum(1)
    if cf == 0.5:  # 24 assignments over 20 tokens
        assert int(per_token.min()) == 0 and int(per_token.max()) >= 2  # zero or several experts
    # y = sum over the experts that chose the token of S[token, j] * E_j(x)
    expect = torch.zeros(n, D)
    for j in range(e):
        expect += (s[:, j] * chosen[:, j]).float()[:, None] * swiglu_expert(layer, j, x)
    torch.testing.assert_close(y, expect, **TOL)
    assert y.abs().max() > 1e-2


# ------------------------------------------------------------------------------------- 6. soft


@pytest.mark.parametrize("cf", [None, 0.5])
def test_soft_layer_is_the_softmax_mixture_of_all_experts(cf):
    e, n = 8, 25
    layer = build_layer("soft", cf=cf, seed=90)
    torch.manual_seed(91)
    x = torch.randn(n, D)
    y, rec = layer(x)
    g = (x.double() @ layer.router.weight.detach().double().t()).softmax(-1).float()
    expect = sum(g[:, i : i + 1] * swiglu_expert(layer, i, x) for i in range(e))
    torch.testing.assert_close(y, expect, **TOL)
    assert bool(rec.kept.all()) and rec.tokens_per_expert.tolist() == [n] * e  # capacity never applies
    assert y.abs().max() > 1e-2


# ------------------------------------------------------------------------------ 7. hierarchical


def test_hierarchical_z_loss_is_the_log_of_the_primary_weighted_group_partitions():
    """The leaf logits are l_a + c_{a,b} (primary plus group gate), so the z-loss squares
    log sum_a e^{l_a} Z_a with Z_a = sum_b e^{c_{a,b}}: neither gate's own log-partition."""
    e, _, _, extra = SPECS["hierarchical"]
    g, b = extra["num_groups"], e // extra["num_groups"]
    router = build_router("hierarchical", seed=101).eval()
    x = torch.randn(6, D)
    rec = router(x)
    primary = (x.double() @ router.primary.weight.detach().double().t()).tolist()  # (N, G) l
    inner = torch.einsum("nd,gbd->ngb", x.double(), router.weight.detach().double()).tolist()  # (N, G, B) c
    per_token = []
    for t in range(6):
        z_a = [sum(math.exp(inner[t][a][j]) for j in range(b)) for a in range(g)]
        per_token.append(math.log(sum(math.exp(primary[t][a]) * z_a[a] for a in range(g))) ** 2)
        own = math.log(sum(math.exp(v) for v in primary[t]))  # the primary gate's log-partition alone
        assert abs(math.sqrt(per_token[-1]) - own) > 1e-3
    assert float(routing_losses(rec)["z"]) == pytest.approx(sum(per_token) / 6, rel=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hierarchical_weights_are_a_distribution_inside_chosen_groups(training):
    e, k, _, extra = SPECS["hierarchical"]
    g, kp = extra["num_groups"], extra["group_top_k"]
    b = e // g
    router = build_router("hierarchical", seed=100)
    router.train(training)
    n = 40
    rec = router(torch.randn(n, D))
    assert rec.expert_idx.shape == (n, kp * k)
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(n), rtol=0, atol=1e-6)
    assert bool((rec.weights > 0).all())
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(n), rtol=0, atol=1e-6)
    groups = rec.group.expert_idx  # (N, Kp) the primary choices
    assert rec.group.probs.shape == (n, g)
    for t in range(n):
        assert len(set(rec.expert_idx[t].tolist())) == kp * k
        for ex in rec.expert_idx[t].tolist():
            assert ex // b in groups[t].tolist()
    assert (rec.load is not None) == training and (rec.group.load is not None) == training


def test_hierarchical_matches_appendix_b_by_hand():
    e, k, _, extra = SPECS["hierarchical"]
    g, kp = extra["num_groups"], extra["group_top_k"]
    b = e // g
    router = build_router("hierarchical", seed=110)
    router.train()
    n = 30
    torch.manual_seed(111)
    x = torch.randn(n, D)
    torch.manual_seed(112)
    rec = router(x)
    torch.manual_seed(112)
    noise_p = torch.randn(n, g)  # the primary gate draws first ...
    noise_s = torch.randn(n, g, b)  # ... then the secondary gates
    xd = x.double()
    clean_p = xd @ router.primary.weight.detach().double().t()  # (N, G)
    std_p = F.softplus(xd @ router.primary.noise_weight.detach().double().t()) + NOISE_EPS
    clean_s = torch.einsum("nd,gbd->ngb", xd, router.weight.detach().double())  # (N, G, B)
    std_s = F.softplus(torch.einsum("nd,gbd->ngb", xd, router.noise_weight.detach().double())) + NOISE_EPS
    noisy_p = clean_p + noise_p.double() * std_p
    noisy_s = clean_s + noise_s.double() * std_s

    load_primary = [0.0] * g
    load_a = [[0.0] * b for _ in range(g)]  # Load_a(X^(a)): the secondary estimator over group a's tokens
    count_a = [0] * g  # |X^(a)|
    for t in range(n):
        groups, gp, pp = noisy_top_k_by_hand(clean_p[t].tolist(), noisy_p[t].tolist(), std_p[t].tolist(), kp)
        assert rec.group.expert_idx[t].tolist() == groups
        assert rec.group.weights[t].tolist() == pytest.approx(gp, rel=1e-5, abs=1e-6)
        for a in range(g):
            load_primary[a] += pp[a]
        expect_idx, expect_w = [], []
        for a, ga in zip(groups, gp):
            count_a[a] += 1
            inner, gi, pa = noisy_top_k_by_hand(clean_s[t, a].tolist(), noisy_s[t, a].tolist(), std_s[t, a].tolist(), k)
            expect_idx += [a * b + j for j in inner]
            expect_w += [ga * w for w in gi]  # G_primary(x)_a * G_a(x)_b
            for j in range(b):
                load_a[a][j] += pa[j]
        assert rec.expert_idx[t].tolist() == expect_idx
        assert rec.weights[t].tolist() == pytest.approx(expect_w, rel=1e-5, abs=1e-6)
    assert rec.group.load.tolist() == pytest.approx(load_primary, rel=1e-4, abs=1e-6)
    assert min(count_a) > 0
    # Load_H(X)_{a,b} = Load_primary(X)_a * Load_a(X^(a))_b / |X^(a)|, from the primary record's load.
    primary = rec.group.load.tolist()
    expect_load = [primary[a] * load_a[a][j] / count_a[a] for a in range(g) for j in range(b)]
    assert rec.load.tolist() == pytest.approx(expect_load, rel=1e-4, abs=1e-6)


def test_hierarchical_losses_are_the_leaf_terms_and_the_primary_gate_only_when_asked():
    e, _, _, extra = SPECS["hierarchical"]
    router = build_router("hierarchical", seed=120)
    router.train()
    n = 32
    torch.manual_seed(121)
    rec = router(torch.randn(n, D))
    paper = routing_losses(rec)  # Importance_H and Load_H of the leaf experts only (Appendix B)
    both = routing_losses(rec, include_group=True)  # moe.balance_primary: the primary gate's terms added
    leaf = routing_losses(dataclasses.replace(rec, group=None))
    primary = routing_losses(rec.group)
    for name in both:
        assert float(paper[name]) == float(leaf[name]), name
        assert float(both[name]) == pytest.approx(float(leaf[name]) + float(primary[name]), rel=1e-6), name
    # The primary level's own terms, written out: importance and load over the G groups.
    g = extra["num_groups"]
    gate = torch.zeros(n, g).scatter(1, rec.group.expert_idx, rec.group.weights)
    assert float(primary["importance"]) == pytest.approx(cv2(gate.sum(0).tolist()), rel=1e-4)
    assert float(primary["load"]) == pytest.approx(cv2(rec.group.load.tolist()), rel=1e-4)
    leaf_gate = torch.zeros(n, e).scatter(1, rec.expert_idx, rec.weights)
    assert float(leaf["importance"]) == pytest.approx(cv2(leaf_gate.sum(0).tolist()), rel=1e-4)
    assert float(leaf["load"]) == pytest.approx(cv2(rec.load.tolist()), rel=1e-4)
    assert float(primary["importance"]) > 1e-4 and float(primary["load"]) > 1e-4


def test_hierarchical_layer_output_is_the_two_level_mixture():
    layer = build_layer("hierarchical", seed=130)
    layer.eval()
    n = 20
    x = torch.randn(n, D)
    y, rec = layer(x)
    expect = torch.zeros(n, D)
    for t in range(n):
        for slot in range(rec.top_k):
            ex = int(rec.expert_idx[t, slot])
            expect[t] += rec.weights[t, slot] * swiglu_expert(layer, ex, x[t : t + 1])[0]
    torch.testing.assert_close(y, expect, **TOL)


# ----------------------------------------------------------------------------- 8. sigmoid (V3)


def test_sigmoid_bias_steers_selection_but_not_weights():
    e, k, n = 8, 2, 40
    router = build_router("sigmoid", seed=140)
    x = torch.randn(n, D)
    s = (x.double() @ router.weight.detach().double().t()).sigmoid()
    plain = router(x)
    top = s.topk(k, dim=-1)
    assert torch.equal(plain.expert_idx, top.indices)
    torch.testing.assert_close(plain.weights.double(), top.values / top.values.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    biased = router(x)
    assert bool((biased.expert_idx == 3).any(-1).all())  # the bias forces expert 3 into every token
    assert torch.equal(biased.probs, plain.probs) and torch.equal(biased.logits, plain.logits)
    for t in range(n):
        row = s[t].tolist()
        other = max((i for i in range(e) if i != 3), key=lambda i: row[i])
        expect = {3: row[3] / (row[3] + row[other]), other: row[other] / (row[3] + row[other])}
        got = dict(zip(biased.expert_idx[t].tolist(), biased.weights[t].tolist()))
        assert got == pytest.approx(expect, rel=1e-5)  # sigmoid(logit), the bias left out
        if 3 in plain.expert_idx[t].tolist():  # already chosen without the bias: identical weights
            assert got == pytest.approx(dict(zip(plain.expert_idx[t].tolist(), plain.weights[t].tolist())), rel=1e-6)
    assert not bool((plain.expert_idx == 3).any(-1).all())


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("impl", ["sorted", "loop"])
def test_routed_scale_multiplies_the_routed_output_and_nothing_else(kind, impl):
    """moe.routed_scaling for every router: y = scale * sum_k w_k E_k(x) + shared(x); None means the
    router's K; the routing itself (choices, weights, losses) does not change."""
    x = torch.randn(30, D)
    base = build_layer(kind, seed=7, shared_hidden=8, impl=impl).eval()
    y0, rec0 = base(x)
    shared = base.shared(x)
    for scale, expect in ((2.5, 2.5), (None, base.router.active_experts)):
        layer = build_layer(kind, seed=7, shared_hidden=8, routed_scale=scale, impl=impl).eval()
        assert layer.routed_scale == expect
        y, rec = layer(x)
        torch.testing.assert_close(y - shared, expect * (y0 - shared), rtol=1e-5, atol=1e-6)
        assert torch.equal(rec.expert_idx, rec0.expert_idx) and torch.equal(rec.weights, rec0.weights)
    assert (y0 - shared).abs().max() > 1e-3
    with pytest.raises(ValueError, match="routed_scale"):
        build_layer(kind, routed_scale=0.0)


def test_sigmoid_renormalised_and_raw_weights():
    x = torch.randn(10, D)
    torch.testing.assert_close(build_router("sigmoid", seed=141)(x).weights.sum(-1), torch.ones(10), rtol=0, atol=1e-5)
    raw = build_router("sigmoid", seed=141, renormalize=False)
    rec = raw(x)
    s = (x.double() @ raw.weight.detach().double().t()).sigmoid()
    torch.testing.assert_close(rec.weights.double(), s.gather(1, rec.expert_idx), rtol=0, atol=1e-6)


def test_sigmoid_update_bias_is_sign_rule_exactly():
    router = build_router("sigmoid", bias_update_rate=1e-3)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    before = router.expert_bias.clone()
    counts = torch.tensor([9, 1, 3, 3, 0, 3, 4, 1])  # mean 3
    router.update_bias(counts)
    sign = [-1.0, 1.0, 0.0, 0.0, 1.0, 0.0, -1.0, 1.0]
    expect = [float(b) + 1e-3 * sg for b, sg in zip(before.tolist(), sign)]
    assert router.expert_bias.tolist() == pytest.approx(expect, rel=0, abs=1e-7)
    assert torch.equal(router.expert_bias[[2, 3, 5]], before[[2, 3, 5]])  # at the mean: unchanged
    assert router.expert_bias.dtype == torch.float32


def test_sigmoid_bias_updates_balance_a_skewed_router():
    e, k, n = 8, 2, 256
    router = build_router("sigmoid", seed=150, bias_update_rate=5e-3)
    with torch.no_grad():
        router.weight.mul_(0.3)
        router.weight[:, 0] = torch.linspace(1.5, -1.5, e)  # a constant input feature favours low experts
    torch.manual_seed(151)
    x = torch.randn(n, D)
    x[:, 0] = 1.0

    def counts_cv() -> float:
        c = router(x).chosen_per_expert().double()
        return float(c.std(unbiased=False) / c.mean())

    start = counts_cv()
    for _ in range(200):
        router.update_bias(router(x).chosen_per_expert())
    end = counts_cv()
    assert start > 0.5
    assert end < 0.25 * start, (start, end)
    assert float(router.expert_bias[0]) < 0 < float(router.expert_bias[-1])  # favoured experts pushed down


def test_sigmoid_bias_is_a_saved_buffer():
    layer = build_layer("sigmoid")
    assert "expert_bias" not in dict(layer.router.named_parameters())
    assert "expert_bias" in dict(layer.router.named_buffers())
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.125)
    state = layer.state_dict()
    assert torch.equal(state["router.expert_bias"], torch.full((8,), 0.125))
    other = build_layer("sigmoid", seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.router.expert_bias, torch.full((8,), 0.125))
    assert layer.router.balances_with_bias and not build_router("topk").balances_with_bias


# ----------------------------------------------------------------------- 9. capacity features


def topk_layer(e=4, k=2, cf=0.5, seed=160, **kw) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, e, k, H, "swiglu", capacity_factor=cf, init_std=0.5, **kw)


def test_eval_capacity_factor():
    n, e, k = 64, 4, 2
    x = torch.randn(n, D)
    same = topk_layer(cf=0.5)  # "train" (default): eval reuses the training factor
    dropless = topk_layer(cf=0.5, eval_capacity_factor=None)
    wider = topk_layer(cf=0.5, eval_capacity_factor=2.0)
    for layer in (same, dropless, wider):
        layer.train()
        assert layer.capacity(n) == math.ceil(0.5 * n * k / e) == 16
        assert int(layer(x)[1].num_dropped) > 0
        layer.eval()
    assert same.capacity(n) == 16 and int(same(x)[1].num_dropped) > 0
    assert dropless.capacity(n) is None
    _, rec = dropless(x)
    assert int(rec.num_dropped) == 0 and bool(rec.kept.all())
    assert wider.capacity(n) == math.ceil(2.0 * n * k / e) == 64
    _, rec = wider(x)
    assert torch.equal(rec.tokens_per_expert, rec.chosen_per_expert().clamp(max=64))


@pytest.mark.parametrize("value,expected", [(None, 16), ("dropless", None), (2.0, 64)])
def test_eval_capacity_factor_from_config(value, expected):
    cfg = config.from_dict(
        {"model": {"d_model": D}, "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 0.5,
                                          "eval_capacity_factor": value}}
    )
    layer = build_moe_layer(cfg.model, cfg.moe)
    assert layer.capacity(64) == 16  # ceil(0.5 * 64 * 2 / 4)
    layer.eval()
    assert layer.capacity(64) == expected


def test_min_capacity_raises_the_capacity():
    n, e, k = 40, 4, 2
    x = torch.randn(n, D)
    low = topk_layer(cf=0.01)
    high = topk_layer(cf=0.01, min_capacity=5)
    assert low.capacity(n) == 1 and high.capacity(n) == 5
    assert topk_layer(cf=2.0, min_capacity=5).capacity(n) == 40  # a floor, not a cap
    _, rec = high(x)
    assert torch.equal(rec.tokens_per_expert, rec.chosen_per_expert().clamp(max=5))
    assert int(rec.tokens_per_expert.max()) == 5


# Token logits over E = 4 (K = 1, N = 8, capacity factor 1 -> capacity 2): tokens 0-5 all pick
# expert 0 with these margins, tokens 6 and 7 pick experts 1 and 2.
OVERFULL_MARGINS = [1.0, 3.0, 0.5, 2.5, 2.0, 1.5]


def overfull_layer(router_kind: str, drop_policy: str, renormalize: bool = True) -> tuple[MoELayer, torch.Tensor]:
    e, n = 4, 8
    torch.manual_seed(170)
    router = make_router(router_kind, D, e, 1, renormalize=renormalize, jitter_eps=0.0)
    layer = MoELayer(D, e, 1, H, capacity_factor=1.0, router=router, drop_policy=drop_policy, init_std=0.5)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :e] = torch.eye(e)  # logits = x[:, :4]
    x = torch.randn(n, D) * 0.1
    x[:, :e] = 0.0
    for t, m in enumerate(OVERFULL_MARGINS):
        x[t, 0] = m
    x[6, 1], x[7, 2] = 2.0, 2.0
    assert layer.capacity(n) == 2
    return layer, x


def expected_probability_kept() -> list[int]:
    """The two tokens of expert 0 with the highest router probability p_0 = softmax(logits)_0."""
    p0 = [softmax_list([m, 0.0, 0.0, 0.0])[0] for m in OVERFULL_MARGINS]
    return sorted(sorted(range(6), key=lambda t: -p0[t])[:2])  # tokens 1 and 3


@pytest.mark.parametrize("router_kind,renormalize", [("switch", True), ("topk", False)])
def test_drop_policy_probability_keeps_the_most_confident_tokens(router_kind, renormalize):
    layer, x = overfull_layer(router_kind, "probability", renormalize)
    _, rec = layer(x)
    assert rec.expert_idx[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2]
    kept0 = [t for t in range(6) if rec.kept[t, 0]]
    assert kept0 == expected_probability_kept() == [1, 3]
    assert bool(rec.kept[6:].all()) and int(rec.num_dropped) == 4
    # Position priority keeps the earliest two instead.
    layer.drop_policy = "position"
    _, rec = layer(x)
    assert [t for t in range(6) if rec.kept[t, 0]] == [0, 1]


def test_hierarchical_capacity_counts_every_assignment():
    cfg = config.from_dict(
        {"model": {"d_model": D}, "moe": {"router": "hierarchical", "num_experts": 16, "num_groups": 4,
                                          "group_top_k": 2, "top_k": 2, "capacity_factor": 1.0}}
    )
    layer = build_moe_layer(cfg.model, cfg.moe)
    n = 64
    _, rec = layer(torch.randn(n, D))
    assert rec.top_k == 4
    # capacity = ceil(cf * N * (assignments per token) / E): 1.0 * 64 * 4 / 16 = 16
    assert layer.capacity(n) == math.ceil(1.0 * n * rec.top_k / 16) == 16


# -------------------------------------------------------------------------- 10. shared experts


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_add_a_dense_ffn(gate):
    e, k, s, n = 4, 2, 20, 30
    torch.manual_seed(180)
    layer = MoELayer(D, e, k, H, "swiglu", init_std=0.5, shared_hidden=s, shared_gate=gate)
    routed_only = MoELayer(D, e, k, H, "swiglu", init_std=0.5)
    missing = routed_only.load_state_dict(layer.state_dict(), strict=False)
    assert not missing.missing_keys
    assert {key.split(".")[0] for key in missing.unexpected_keys} == ({"shared", "shared_gate"} if gate else {"shared"})
    x = torch.randn(n, D)
    y, _ = layer(x)
    routed, _ = routed_only(x)
    sh = layer.shared
    assert sh.w_up.shape == (D, s)
    g = x @ sh.w_gate
    shared = ((g * torch.sigmoid(g)) * (x @ sh.w_up)) @ sh.w_down  # the shared SwiGLU FFN written out
    if gate:
        shared = torch.sigmoid(x @ layer.shared_gate.weight.t()) * shared  # (N, 1) * (N, D)
    torch.testing.assert_close(y, routed + shared, **TOL)
    assert shared.abs().max() > 1e-2


# -------------------------------------------------------------------------- 11. expert dropout


def test_expert_dropout_only_acts_in_training():
    torch.manual_seed(190)
    with_dropout = MoELayer(D, 4, 2, H, "swiglu", init_std=0.5, expert_dropout=0.5)
    torch.manual_seed(190)
    without = MoELayer(D, 4, 2, H, "swiglu", init_std=0.5)
    for a, b in zip(with_dropout.state_dict().values(), without.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(30, D)
    with_dropout.eval()
    without.eval()
    assert torch.equal(with_dropout(x)[0], without(x)[0])
    with_dropout.train()
    without.train()
    torch.manual_seed(191)
    y1 = with_dropout(x)[0]
    torch.manual_seed(192)
    y2 = with_dropout(x)[0]
    ref = without(x)[0]
    assert (y1 - ref).abs().max() > 1e-3 and (y1 - y2).abs().max() > 1e-3
    loop = MoELayer(D, 4, 2, H, "swiglu", init_std=0.5, expert_dropout=0.5, impl="loop")
    loop.load_state_dict(with_dropout.state_dict())
    for layer in (with_dropout, loop):  # both paths drop
        torch.manual_seed(193)
        assert (layer(x)[0] - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------- 12. config validation


@pytest.mark.parametrize(
    "moe,message",
    [
        ({"router": "switch", "top_k": 2}, "moe.top_k=2 must be 1 for moe.router=switch"),
        ({"router": "gshard_top2", "top_k": 1}, "moe.top_k=1 must be 2 for moe.router=gshard_top2"),
        ({"router": "gshard_top2", "top_k": 3}, "moe.top_k=3 must be 2 for moe.router=gshard_top2"),
        ({"router": "hierarchical", "num_experts": 6, "num_groups": 4},
         "moe.num_experts=6 must be a multiple of moe.num_groups=4"),
        ({"router": "hierarchical", "num_experts": 8, "num_groups": 4, "top_k": 3},
         "moe.top_k=3 must be <= experts per group = moe.num_experts / moe.num_groups = 2"),
        ({"router": "hierarchical", "num_experts": 8, "num_groups": 4, "top_k": 1, "group_top_k": 5},
         "moe.group_top_k=5 must be <= moe.num_groups=4"),
        ({"router": "topk", "load_loss_coef": 0.1},
         "moe.load_loss_coef=0.1 needs moe.router=noisy_topk or hierarchical"),
        ({"router": "sigmoid", "load_loss_coef": 0.1}, "needs moe.router=noisy_topk or hierarchical"),
        ({"router": "switch", "top_k": 1, "load_loss_coef": 0.5}, "needs moe.router=noisy_topk or hierarchical"),
    ],
)
def test_router_config_errors(moe, message):
    with pytest.raises(ConfigError) as exc:
        config.from_dict({"moe": moe})
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "moe",
    [
        {"router": "switch", "top_k": 1},
        {"router": "gshard_top2", "top_k": 2},
        {"router": "hierarchical", "num_experts": 8, "num_groups": 4, "top_k": 2, "group_top_k": 4},
        {"router": "noisy_topk", "load_loss_coef": 0.1, "importance_loss_coef": 0.1},
        {"router": "hierarchical", "num_experts": 8, "num_groups": 2, "load_loss_coef": 0.1},
        {"router": "soft", "num_experts": 4, "top_k": 8},
    ],
)
def test_valid_router_configs(moe):
    cfg = config.from_dict({"moe": moe})
    assert cfg.moe.router == moe["router"]


# ------------------------------------------------------------------- 13. training, every router


ROUTER_MOE = {
    "topk": {},
    "noisy_topk": {"importance_loss_coef": 0.1, "load_loss_coef": 0.1},
    "switch": {"top_k": 1, "capacity_factor": 1.25},
    "gshard_top2": {"top_k": 2, "capacity_factor": 2.0},
    "expert_choice": {},
    "soft": {},
    "hierarchical": {"num_groups": 2, "top_k": 2, "group_top_k": 2, "load_loss_coef": 0.1},
    "sigmoid": {"bias_update_rate": 1e-3},
}


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict:
    """One corpus for every run, so the data and tokenizer are prepared once and cached."""
    return tiny_config(tmp_path_factory.mktemp("router-corpus"))


def test_training_moe_cover_every_router():
    assert set(ROUTER_MOE) == set(ROUTERS)


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
@pytest.mark.parametrize("kind", ROUTERS)
def test_every_router_trains_both_backbones(base_config, tmp_path, kind, arch):
    cfg = copy.deepcopy(base_config)
    cfg["run"] = {"name": f"{kind}-{arch}", "dir": str(tmp_path / "runs")}
    cfg["model"]["arch"] = arch
    cfg["moe"].update({"router": kind, **ROUTER_MOE[kind]})
    cfg["train"].update(max_steps=3, eval_every=1000)
    cfg["checkpoint"]["every"] = 1000
    result = fit(config.from_dict(cfg))
    assert result.step == 3 and not result.interrupted
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)

    acc = EventAccumulator(str(result.run_dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert losses[-1].step == 3 and math.isfinite(losses[-1].value)
    assert "routing/layer00/experts" in acc.Tags()["histograms"]
    hist = acc.Histograms("routing/layer00/experts")[-1]
    assert hist.step == 3 and hist.histogram_value.num > 0

    weights = load_file(str(result.checkpoint / "model.safetensors"))
    biases = {name: t for name, t in weights.items() if name.endswith("expert_bias")}
    if kind == "sigmoid":
        assert biases and all(bool((t != 0).any()) for t in biases.values())
        # Every step moves each bias by 0 or +-rate: after 3 steps |b| <= 3 * rate.
        assert all(float(t.abs().max()) <= 3e-3 + 1e-9 for t in biases.values())
    else:
        assert not biases


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
@pytest.mark.parametrize("kind", ROUTERS)
def test_every_parameter_gets_a_gradient_in_every_training_step(kind, arch):
    # DDP (find_unused_parameters off) needs a gradient for every parameter from every
    # backward, even when a micro-batch leaves some experts or groups without tokens.
    moe = {"router": kind, **ROUTER_MOE[kind], "num_experts": 8, "shared_experts": 1, "shared_expert_gate": True}
    if kind == "hierarchical":
        moe["num_groups"] = 4
    cfg = config.from_dict({"model": {"arch": arch, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32},
                            "moe": moe})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, vocab_size=50)
    ids = torch.randint(0, 50, (1, 3))  # 3 tokens: most experts get none
    model(ids, ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
