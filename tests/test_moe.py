"""The MoE layer (moectl.moe): router, dispatch / capacity, experts, combine and router losses.

Notation: N tokens, D model dim, H expert hidden size, E experts, K experts per token.
The formulas are those of /work/shared/MOE_MATH.md (softmax top-k, Switch capacity and
load-balancing loss, ST-MoE z-loss); every test checks a value or an invariant.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_sorted_equals_loop
from moectl.models.layers import FeedForward
from moectl.moe import MoELayer, RoutingRecord, dispatch, load_balancing_loss, router_z_loss
from moectl.moe.record import make_record

# float() on a loss that requires grad is fine here: the tests only read values.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")

D, E, H = 16, 4, 12
TOL = dict(rtol=1e-5, atol=1e-6)


def make_layer(
    k: int = 2, activation: str = "swiglu", cf=None, renormalize: bool = True, seed: int = 0, init_std: float = 0.5,
    impl: str = "sorted",
) -> MoELayer:
    torch.manual_seed(seed)
    # A larger init than the default so router choices and expert outputs are O(1), not O(1e-3).
    return MoELayer(D, E, k, H, activation, renormalize=renormalize, capacity_factor=cf, init_std=init_std, impl=impl)


def hand_record(expert_idx: list[list[int]], num_experts: int) -> RoutingRecord:
    """A dropless record with the given choices and uniform probabilities / weights."""
    idx = torch.tensor(expert_idx, dtype=torch.int64)
    n, k = idx.shape
    return make_record(
        torch.zeros(n, num_experts), torch.full((n, num_experts), 1.0 / num_experts), idx, torch.full((n, k), 1.0 / k)
    )


def reference_kept(expert_idx: torch.Tensor, capacity: int, priority=None) -> torch.Tensor:
    """Capacity priority, written out: tokens by (priority, position), each token's slots in order;
    an expert keeps the first `capacity` assignments it is offered."""
    n, k = expert_idx.shape
    order = sorted(range(n), key=lambda t: (priority[t] if priority is not None else 0, t))
    used = [0] * (int(expert_idx.max()) + 1)
    kept = torch.zeros(n, k, dtype=torch.bool)
    for tok in order:
        for slot in range(k):
            e = int(expert_idx[tok, slot])
            if used[e] < capacity:
                used[e] += 1
                kept[tok, slot] = True
    return kept


# --------------------------------------------------------------------- sorted path == loop path


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 1.25])
def test_sorted_path_equals_loop_reference(activation, k, cf):
    # float64 experts: the two paths sum in different orders, and fp32 rounding would blur a real difference.
    n = 40
    torch.manual_seed(100 + k)
    x = torch.randn(n, D, dtype=torch.float64)
    target = torch.randn(n, D, dtype=torch.float64)

    out_s, rec_s, _, g_s = assert_sorted_equals_loop(
        lambda impl: make_layer(k, activation, cf, seed=k, impl=impl).double(), x, target, tol=TOL
    )
    assert out_s.shape == (n, D)
    assert set(g_s) == {name for name, _ in make_layer(k, activation, cf).named_parameters()}
    # The test has teeth: capacity 0.5 really drops, and outputs are not trivially zero.
    if cf == 0.5:
        assert int(rec_s.num_dropped) > 0
    if cf is None:
        assert int(rec_s.num_dropped) == 0 and bool(rec_s.kept.all())
    assert out_s.abs().max() > 1e-2
    assert g_s["router.weight"].abs().max() > 0 or k == 1  # K=1 renormalised: weights are 1, no router grad


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cf", [None, 0.5])
def test_combine_by_batched_matmul_equals_loop_reference(k, cf, monkeypatch):
    """Beyond a few slots per token the combine contracts by batched matmul instead of a
    multiply-add per slot: force that branch at small K and compare with the loop too."""
    monkeypatch.setattr(dispatch, "_FMA_MAX_K", 0)
    torch.manual_seed(7)
    x, target = torch.randn(40, D, dtype=torch.float64), torch.randn(40, D, dtype=torch.float64)
    assert_sorted_equals_loop(lambda impl: make_layer(k, "swiglu", cf, seed=k, impl=impl).double(), x, target, tol=TOL)


# --------------------------------------------------------------------------- identity with dense


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scale_by", ["weights", "routed_scale"])
def test_k_equals_e_with_zero_router_equals_dense_ffn(activation, renormalize, scale_by):
    """Each weight is 1/E: the experts' down projections times E, or routed_scale=None (K = E), undo it."""
    torch.manual_seed(0)
    dense = FeedForward(D, E * H, activation, init_std=0.3)
    x = torch.randn(24, D)
    fold = E if scale_by == "weights" else 1
    for impl in ("sorted", "loop"):
        scale = 1.0 if scale_by == "weights" else None
        layer = MoELayer(D, E, E, H, activation, renormalize=renormalize, init_std=0.3, routed_scale=scale, impl=impl)
        assert layer.routed_scale == (1.0 if scale_by == "weights" else E)
        with torch.no_grad():
            layer.router.weight.zero_()
            for e in range(E):
                cols = slice(e * H, (e + 1) * H)
                layer.experts.w_up[e].copy_(dense.w_up[:, cols])
                if activation == "swiglu":
                    layer.experts.w_gate[e].copy_(dense.w_gate[:, cols])
                layer.experts.w_down[e].copy_(dense.w_down[cols, :] * fold)
        y, record = layer(x)
        torch.testing.assert_close(record.probs, torch.full_like(record.probs, 1.0 / E), rtol=0, atol=1e-7)
        torch.testing.assert_close(record.weights, torch.full_like(record.weights, 1.0 / E), rtol=0, atol=1e-7)
        assert torch.equal(record.expert_idx.sort(dim=1).values, torch.arange(E).expand(24, E))
        torch.testing.assert_close(y, dense(x), **TOL)
    assert dense(x).abs().max() > 1e-2


# ------------------------------------------------------------------------------------- router


def test_router_is_fp32_softmax_topk_under_bf16_autocast():
    layer = make_layer(k=2, init_std=1.0)
    torch.manual_seed(1)
    x = torch.randn(64, D)
    w = layer.router.weight.detach()
    ref_logits = x.double() @ w.double().t()
    ref_probs = ref_logits.softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The bf16 matmul autocast would do elsewhere is far from the fp32 one.
        assert (x @ w.t()).dtype == torch.bfloat16
        bf16_err = ((x @ w.t()).double() - ref_logits).abs().max()
        record = layer.router(x)
        record_bf16_in = layer.router(x.bfloat16())
    assert bf16_err > 1e-3
    assert record.logits.dtype == torch.float32 and record.probs.dtype == torch.float32
    assert record.weights.dtype == torch.float32
    torch.testing.assert_close(record.logits.double(), ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(record.probs.double(), ref_probs, rtol=0, atol=1e-6)
    assert record_bf16_in.logits.dtype == torch.float32 and record_bf16_in.probs.dtype == torch.float32
    torch.testing.assert_close(record.probs.sum(-1), torch.ones(64), rtol=0, atol=1e-6)

    top_p, top_i = record.probs.topk(2, dim=-1)
    assert torch.equal(record.expert_idx, top_i)  # best first
    assert bool((record.probs.gather(1, record.expert_idx[:, :1]) >= record.probs).all())
    torch.testing.assert_close(record.weights, top_p / top_p.sum(-1, keepdim=True), rtol=0, atol=1e-7)
    torch.testing.assert_close(record.weights.sum(-1), torch.ones(64), rtol=0, atol=1e-6)
    # A fresh router record is dropless and counts its choices.
    assert bool(record.kept.all()) and int(record.num_dropped) == 0
    assert torch.equal(record.tokens_per_expert, torch.bincount(record.expert_idx.flatten(), minlength=E))


@pytest.mark.parametrize("k", [1, 3])
def test_router_without_renormalize_uses_raw_topk_probs(k):
    layer = make_layer(k=k, renormalize=False, init_std=1.0)
    x = torch.randn(32, D)
    record = layer.router(x)
    expected = torch.softmax(x @ layer.router.weight.detach().t(), dim=-1).topk(k, dim=-1)
    assert torch.equal(record.expert_idx, expected.indices)
    torch.testing.assert_close(record.weights, expected.values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(record.weights, record.probs.gather(1, record.expert_idx), rtol=0, atol=0)
    assert bool((record.weights.sum(-1) < 1 - 1e-3).any())


def test_router_rejects_bad_top_k():
    with pytest.raises(ValueError):
        MoELayer(D, E, 0, H)
    with pytest.raises(ValueError):
        MoELayer(D, E, E + 1, H)


# --------------------------------------------------------------------------- routing record


@pytest.mark.parametrize("k,cf", [(1, None), (2, None), (1, 0.5), (2, 0.5), (2, 1.0), (3, 1.25)])
def test_routing_record_is_consistent(k, cf):
    layer = make_layer(k=k, cf=cf, init_std=1.0)
    torch.manual_seed(5)
    n = 50
    _, record = layer(torch.randn(n, D))
    assert record.num_tokens == n and record.top_k == k and record.num_experts == E
    assert record.tokens_per_expert.dtype == torch.int64 and record.num_dropped.dtype == torch.int64
    assert int(record.tokens_per_expert.sum() + record.num_dropped) == n * k
    assert torch.equal(~record.kept, record.combine_weights == 0)
    assert torch.equal(record.tokens_per_expert, torch.bincount(record.expert_idx[record.kept], minlength=E))
    assert int(record.num_dropped) == int((~record.kept).sum())
    cap = layer.capacity(n)
    if cap is not None:
        chosen = record.chosen_per_expert()
        assert torch.equal(record.tokens_per_expert, chosen.clamp(max=cap))
        assert torch.equal(record.kept, reference_kept(record.expert_idx, cap))
    # Weights of kept assignments are untouched by capacity (not renormalised over survivors).
    top = record.probs.gather(1, record.expert_idx)
    ref_w = top / top.sum(-1, keepdim=True)
    torch.testing.assert_close(record.weights[record.kept], ref_w[record.kept], rtol=0, atol=1e-7)


# -------------------------------------------------------------------------------------- capacity


@pytest.mark.parametrize(
    "cf,n,k,e,expected",
    [(1.0, 64, 2, 8, 16), (1.25, 64, 2, 8, 20), (0.5, 10, 1, 4, 2), (1.0, 10, 3, 4, 8), (2.0, 7, 1, 3, 5),
     (1.0, 8, 1, 8, 1), (0.01, 8, 1, 8, 1)],
)
def test_expert_capacity(cf, n, k, e, expected):
    assert dispatch.expert_capacity(cf, n, k, e) == expected == math.ceil(cf * n * k / e)
    layer = MoELayer(D, e, k, H, capacity_factor=cf)
    assert layer.capacity(n) == expected
    assert MoELayer(D, e, k, H).capacity(n) is None


# token: (first, second) choice, with E = 3 and capacity 2.
HAND_IDX = [[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [0, 2]]
HAND_KEPT = [[True, True], [True, True], [False, True], [False, False], [True, False], [False, False]]


def test_capacity_drops_exactly_the_lower_priority_assignments():
    record = hand_record(HAND_IDX, 3)
    plan, out = dispatch.plan(record, capacity=2)
    # Tokens are served in order, each token's first choice before its second. Expert 0 fills with
    # tokens 0 and 1; expert 1 with tokens 0 (second choice) and 2 (second choice); expert 2 with
    # tokens 1 (second) and 4 (first). Tokens 3 and 5 lose both slots.
    assert out.kept.tolist() == HAND_KEPT
    assert out.tokens_per_expert.tolist() == [2, 2, 2]
    assert record.chosen_per_expert().tolist() == [6, 3, 3]
    assert int(out.num_dropped) == 6
    assert torch.equal(out.combine_weights, record.weights * torch.tensor(HAND_KEPT))
    assert torch.equal(out.weights, record.weights)  # the router's weights are kept; capacity masks them
    assert plan.tokens_per_expert == [2, 2, 2]
    # Kept assignments a = n*K + k, grouped by expert, in service order inside an expert.
    assert plan.assignments.tolist() == [0, 2, 1, 5, 3, 8]
    assert plan.tokens.tolist() == [0, 1, 0, 2, 1, 4]
    # The input record is not modified in place.
    assert bool(record.kept.all()) and int(record.num_dropped) == 0


def test_capacity_serves_earlier_tokens_first_and_priority_reorders():
    # Capacity 1: in token order, token 0 takes experts 0 and 1 and token 1 takes expert 2.
    record = hand_record([[0, 1], [2, 0], [2, 1], [1, 2]], 3)
    _, out = dispatch.plan(record, capacity=1)
    assert out.kept.tolist() == [[True, True], [True, False], [False, False], [False, False]]
    assert out.tokens_per_expert.tolist() == [1, 1, 1] and int(out.num_dropped) == 5
    # Reverse priority: token 3 is served first and takes experts 1 and 2; token 1 gets expert 0.
    _, out = dispatch.plan(record, capacity=1, priority=torch.tensor([3, 2, 1, 0]))
    assert out.kept.tolist() == [[False, False], [False, True], [False, False], [True, True]]


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8, 100])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_matches_reference_priority_on_random_routing(capacity, k):
    g = torch.Generator().manual_seed(capacity * 10 + k)
    n, e = 20, 5
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    record = hand_record(idx.tolist(), e)
    priority = torch.randint(0, 4, (n,), generator=g)  # ties are broken by token order
    for prio in (None, priority):
        _, with_prio = dispatch.plan(record, capacity, prio)
        assert torch.equal(with_prio.kept, reference_kept(idx, capacity, None if prio is None else prio.tolist()))
    plan, out = dispatch.plan(record, capacity)
    chosen = record.chosen_per_expert()
    assert torch.equal(out.tokens_per_expert, torch.minimum(chosen, torch.tensor(capacity)))
    assert int(out.num_dropped) == int((chosen - chosen.clamp(max=capacity)).sum())
    assert plan.tokens_per_expert == out.tokens_per_expert.tolist()


def test_fully_dropped_token_outputs_exactly_zero():
    n, e, k = len(HAND_IDX), 3, 2
    torch.manual_seed(3)
    x = torch.randn(n, D)
    logits = torch.zeros(n, e)
    for t, (first, second) in enumerate(HAND_IDX):
        logits[t, first], logits[t, second] = 3.0, 2.0
    x[:, :3] = logits
    for impl in ("sorted", "loop"):
        layer = MoELayer(D, e, k, H, "swiglu", capacity_factor=0.5, init_std=0.5, impl=impl)
        # capacity = ceil(0.5 * 6 * 2 / 3) = 2, as in the hand-checked case above.
        assert layer.capacity(n) == 2
        with torch.no_grad():
            # The router reads the first 3 input features: logits == x[:, :3] exactly.
            layer.router.weight.zero_()
            layer.router.weight[:, :3] = torch.eye(3)
        y, record = layer(x)
        assert record.expert_idx.tolist() == HAND_IDX
        assert record.kept.tolist() == HAND_KEPT
        assert torch.equal(y[3], torch.zeros(D)) and torch.equal(y[5], torch.zeros(D))
        # Kept tokens: y = sum over kept slots of weight * expert(x).
        for t in (0, 1, 2, 4):
            expect = sum(
                record.weights[t, s] * layer.experts.forward_expert(int(record.expert_idx[t, s]), x[t : t + 1])[0]
                for s in range(k)
                if record.kept[t, s]
            )
            torch.testing.assert_close(y[t], expect, **TOL)
            assert y[t].abs().max() > 1e-3


# ------------------------------------------------------------------------------------- losses


def test_load_balancing_loss_matches_switch_formula():
    torch.manual_seed(7)
    n, e, k = 30, 6, 2
    probs = torch.randn(n, e).softmax(-1)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    expected = 0.0
    for i in range(e):
        f_i = sum(int(idx[t, s]) == i for t in range(n) for s in range(k)) / (n * k)
        p_i = sum(float(probs[t, i]) for t in range(n)) / n
        expected += f_i * p_i
    expected *= e
    assert float(load_balancing_loss(probs, idx)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balancing_loss_is_one_under_uniform_routing(k):
    n, e, alpha = 8, 4, 0.01
    probs = torch.full((n, e), 1.0 / e)
    idx = torch.tensor([[(t + s) % e for s in range(k)] for t in range(n)])
    assert torch.bincount(idx.flatten(), minlength=e).tolist() == [n * k // e] * e
    loss = load_balancing_loss(probs, idx)
    assert float(loss) == 1.0
    assert torch.equal(alpha * loss, torch.tensor(alpha))  # alpha in fp32, exactly
    # Collapsed routing (everything on expert 0, which has all the probability) gives E.
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1.0
    idx0 = torch.zeros(n, 1, dtype=torch.int64)
    assert float(load_balancing_loss(collapsed, idx0)) == e


def test_load_balancing_loss_gradient_flows_into_probs_only():
    torch.manual_seed(8)
    n, e, k = 10, 4, 2
    logits = torch.randn(n, e, requires_grad=True)
    probs = logits.softmax(-1)
    probs.retain_grad()
    idx = probs.detach().topk(k, dim=-1).indices
    load_balancing_loss(probs, idx).backward()
    f = torch.bincount(idx.flatten(), minlength=e).float() / (n * k)
    # d/dp[t, i] of E * sum_i f_i * mean_t p[t, i] = E * f_i / N, the same for every token.
    torch.testing.assert_close(probs.grad, (e * f / n).expand(n, e), rtol=0, atol=1e-7)
    assert logits.grad is not None and logits.grad.abs().max() > 0


def test_router_z_loss_matches_hand_computation():
    torch.manual_seed(9)
    logits = torch.randn(12, 5) * 3
    expected = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / logits.shape[0]
    assert float(router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(logits.bfloat16()).dtype == torch.float32
    # Zero logits: logsumexp = log E for every token.
    assert float(router_z_loss(torch.zeros(3, 5))) == pytest.approx(math.log(5) ** 2, rel=1e-6)


# ---------------------------------------------------------------------------------- gradients


def test_aux_loss_alone_reaches_router_weight():
    layer = make_layer(k=2)
    x = torch.randn(32, D)
    _, record = layer(x)  # output unused
    load_balancing_loss(record.probs, record.expert_idx).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().max() > 0
    for p in layer.experts.parameters():
        assert p.grad is None
    layer.zero_grad(set_to_none=True)
    _, record = layer(x)
    router_z_loss(record.logits).backward()
    assert layer.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("impl", ["sorted", "loop"])
def test_lm_path_reaches_router_weight_through_combine_weights(impl):
    layer = make_layer(k=2, impl=impl)
    x = torch.randn(32, D)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    g = layer.router.weight.grad
    assert g is not None and g.abs().max() > 1e-6
    for p in layer.experts.parameters():
        assert p.grad is not None and p.grad.abs().max() > 0
    # The router's only path to the output is the combine weights: with them detached, no gradient.
    layer.zero_grad(set_to_none=True)
    record = layer.router(x)
    plan, record = dispatch.plan(record, None)
    record.weights = record.weights.detach()
    y = dispatch.combine(layer.experts(dispatch.gather(x, plan), plan.tokens_per_expert), plan, record)
    y.sum().backward()
    assert layer.router.weight.grad is None


def test_top1_raw_probs_give_router_gradient():
    layer = make_layer(k=1, renormalize=False)
    y, record = layer(torch.randn(16, D))
    assert bool((record.weights < 1).all())
    (y * torch.randn_like(y)).sum().backward()
    assert layer.router.weight.grad.abs().max() > 0


# --------------------------------------------------------------------------- memory and shapes


@pytest.mark.parametrize("cf", [None, 0.5, 1.0])
def test_plan_is_linear_in_assignments(cf):
    layer = make_layer(k=2, cf=cf, init_std=1.0)
    n = 64
    x = torch.randn(n, D)
    record = layer.router(x)
    plan, record = dispatch.plan(record, layer.capacity(n))
    m = int(record.tokens_per_expert.sum())
    assert plan.assignments.shape == (m,) and plan.tokens.shape == (m,)
    assert plan.assignments.dtype == torch.int64
    assert sum(plan.tokens_per_expert) == m and len(plan.tokens_per_expert) == E
    if cf is None:
        assert m == n * 2
    else:
        assert m < n * 2
    # Grouped by expert, unique, and every kept assignment appears once.
    flat_expert = record.expert_idx.reshape(-1)  # assignment a = n*K + k
    experts = flat_expert[plan.assignments]
    assert bool((experts[1:] >= experts[:-1]).all())
    assert plan.assignments.unique().numel() == m
    assert torch.equal(plan.tokens, plan.assignments // 2)
    assert sorted(plan.assignments.tolist()) == sorted(torch.where(record.kept.reshape(-1))[0].tolist())
    gathered = dispatch.gather(x, plan)
    assert gathered.shape == (m, D) and torch.equal(gathered, x[plan.tokens])
    # The expert computation sees (M, D), never an (N, E, capacity) buffer.
    seen = []
    hook = layer.experts.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.shape)))
    layer(x)
    hook.remove()
    assert seen == [((m, D), (m, D))]


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_grouped_ffn_paths_equal_per_expert_autograd(activation, monkeypatch):
    """The hand-written backward, through torch's grouped_mm and through the per-expert loop,
    equals plain autograd over `ffn` expert by expert (one expert gets no rows)."""
    from moectl.moe import experts as ex

    torch.manual_seed(11)
    e, d, h = 4, 16, 12
    module = ex.GroupedExperts(e, d, h, activation, init_std=0.3).double()
    sizes = [5, 0, 9, 3]
    x = torch.randn(sum(sizes), d, dtype=torch.float64)
    g = torch.randn(sum(sizes), d, dtype=torch.float64)

    def run(fn):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        out.backward(g)
        return [out.detach(), xi.grad] + [p.grad for p in module.parameters()]

    def reference(xi):
        parts, start = [], 0
        for i, n in enumerate(sizes):
            parts.append(module.forward_expert(i, xi[start : start + n]))
            start += n
        return torch.cat(parts)

    expected = run(reference)
    loop = run(lambda xi: module(xi, sizes))  # float64: grouped_mm does not apply, the loop runs
    for got, want in zip(loop, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(loop[2 + 0][1], torch.zeros_like(loop[2][1]))  # the expert with no rows: zero gradient

    # float32 through torch's grouped_mm, against the same reference in float32
    module.float()
    x, g = x.float(), g.float()
    assert ex._grouped_mm_ok(x, module.w_up, module.w_gate, module.w_down) == hasattr(torch.nn.functional, "grouped_mm")
    grouped = run(lambda xi: module(xi, sizes))
    expected32 = run(reference)
    for got, want in zip(grouped, expected32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ex, "_grouped_mm_ok", lambda *a: False)
    for got, want in zip(run(lambda xi: module(xi, sizes)), expected32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
