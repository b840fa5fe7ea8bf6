"""Routing exactly as published (../shared/MOE_MATH.md): each rule below is transcribed from its
paper in plain Python and compared with moectl on random inputs, and each test also shows the
case the earlier convention got wrong, so it cannot pass by accident.

Notation: N tokens, D model dim, E experts, K experts per token, T tokens per sequence.
"""

from __future__ import annotations

import re

import pytest
import torch

from moectl import config
from moectl.services.hf import refusal
from moectl.models import build_model
from moectl.moe import MoELayer, make_router, routing_losses
from moectl.moe.dispatch import plan

D, H = 12, 8


def kept_batch_prioritised(expert_idx: list[list[int]], weights: list[list[float]], chosen, capacity: int, e: int):
    """Riquelme et al. 2021 (V-MoE), as MOE_MATH.md states it: a token's priority is the largest
    routing weight it was given; capacity is filled rank by rank, every token's k-th choice (its
    k-th largest weight) in descending priority before any token's (k+1)-th choice."""
    n, k = len(expert_idx), len(expert_idx[0])
    priority = [max(w for w, c in zip(weights[t], chosen[t]) if c) for t in range(n)]
    order = sorted(range(n), key=lambda t: -priority[t])  # stable: ties keep token order
    ranked = [sorted(range(k), key=lambda s: -weights[t][s]) for t in range(n)]  # slots by weight
    used, kept = [0] * e, [[False] * k for _ in range(n)]
    for rank in range(k):
        for t in order:
            slot = ranked[t][rank]
            ex = expert_idx[t][slot]
            if chosen[t][slot] and used[ex] < capacity:
                kept[t][slot] = True
                used[ex] += 1
    return kept


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "gshard_top2", "sigmoid", "hierarchical"])
def test_batch_prioritised_routing_fills_capacity_rank_by_rank(kind):
    e, n, differs = 8, 40, 0
    for seed in range(6):
        torch.manual_seed(seed)
        router = make_router(kind, D, e, 2, init_std=1.0, num_groups=2, group_top_k=2)
        for name, p in router.named_parameters():  # noisy gates start at zero, which would tie every weight
            if "weight" in name:
                torch.nn.init.normal_(p, std=1.0 if "noise" not in name else 0.5)
        layer = MoELayer(D, e, 2, H, capacity_factor=0.75, router=router, drop_policy="probability").train()
        x = torch.randn(n, D)
        torch.manual_seed(100 + seed)  # the noise and random routing this forward draws ...
        _, rec = layer(x)
        torch.manual_seed(100 + seed)  # ... drawn again for the router alone
        raw = router(x)
        cap = layer.capacity(n)
        expect = kept_batch_prioritised(raw.expert_idx.tolist(), raw.weights.tolist(), raw.chosen.tolist(), cap, e)
        assert rec.kept.tolist() == expect, seed
        # No later choice ever holds a slot that an earlier choice of the same expert was refused.
        first = rec.weights.argmax(dim=1, keepdim=True)  # each token's first choice
        is_first = torch.zeros_like(rec.kept).scatter_(1, first, True)
        for ex in range(e):
            first_dropped = bool(((rec.expert_idx == ex) & is_first & rec.chosen & ~rec.kept).any())
            later_kept = bool(((rec.expert_idx == ex) & ~is_first & rec.kept).any())
            assert not (first_dropped and later_kept), (seed, ex)
        # The token-major order (a token's 2nd choice right after its 1st) keeps other assignments.
        _, token_major = plan(raw, cap, -raw.weights.max(dim=-1).values, by_rank=False)
        differs += int(not torch.equal(token_major.kept, rec.kept))
    assert differs > 0


def test_batch_priority_is_the_noisy_weight_not_the_clean_probability():
    # Noisy top-k: the clean softmax ranks tokens one way, the weights the noisy gate gave another.
    torch.manual_seed(3)
    router = make_router("noisy_topk", D, 4, 2)
    torch.nn.init.normal_(router.weight, std=0.3)
    torch.nn.init.normal_(router.noise_weight, std=1.0)
    layer = MoELayer(D, 4, 2, H, capacity_factor=0.5, router=router, drop_policy="probability").train()
    x = torch.randn(64, D)
    torch.manual_seed(7)
    _, rec = layer(x)
    by_weight = (-rec.weights.max(dim=-1).values).argsort(stable=True)
    by_clean = (-rec.probs.max(dim=-1).values).argsort(stable=True)
    assert not torch.equal(by_weight, by_clean)
    _, by_clean_plan = plan(rec, layer.capacity(64), -rec.probs.max(dim=-1).values, by_rank=True)
    assert not torch.equal(by_clean_plan.kept, rec.kept)  # the clean priority would keep other tokens


def test_gshard_aux_loss_counts_first_choices_only():
    """GShard Algorithm 1: c_e = tokens whose first choice is e, m_e = mean_x p_e(x),
    loss = E * sum_e (c_e / N) * m_e."""
    e, n = 6, 50
    torch.manual_seed(11)
    router = make_router("gshard_top2", D, e, 2, init_std=1.0).train()
    with torch.no_grad():
        rec = router(torch.randn(n, D))
    assert not bool(rec.chosen[:, 1].all())  # random routing dropped some second experts
    c = [sum(1 for t in range(n) if rec.expert_idx[t, 0] == ex) for ex in range(e)]
    m = rec.probs.mean(0).tolist()
    expect = e * sum(c[ex] / n * m[ex] for ex in range(e))
    assert float(routing_losses(rec)["load_balance"]) == pytest.approx(expect, rel=1e-6)
    both = [sum(1 for t in range(n) for s in (0, 1) if rec.chosen[t, s] and rec.expert_idx[t, s] == ex) for ex in range(e)]
    total = sum(both)
    assert abs(expect - e * sum(both[ex] / total * m[ex] for ex in range(e))) > 1e-4  # counting both slots differs


def sigmoid_router(e: int, k: int, n_group: int = 1, topk_group: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    router = make_router("sigmoid", D, e, k, init_std=1.0, n_group=n_group, topk_group=topk_group)
    router.expert_bias.copy_(torch.randn(e) * 0.3)
    return router


def test_sigmoid_group_limited_routing_matches_deepseek_v3():
    """V3 §2.1.2 and its model code: a group's score is the sum of its two largest s_i + b_i; the
    top-K of s_i + b_i is taken among the topk_group best groups only; weights are the chosen
    s_i renormalised (the routed scaling is the layer's, tested with the layer)."""
    e, k, g, m, n = 16, 4, 4, 2, 30
    router = sigmoid_router(e, k, g, m, seed=21)
    x = torch.randn(n, D)
    rec = router(x)
    s = torch.sigmoid(x @ router.weight.t()).tolist()
    b = router.expert_bias.tolist()
    per, outside = e // g, 0
    for t in range(n):
        sel = [s[t][i] + b[i] for i in range(e)]
        score = [sum(sorted(sel[a * per : (a + 1) * per], reverse=True)[:2]) for a in range(g)]
        groups = sorted(range(g), key=lambda a: -score[a])[:m]
        eligible = [i for i in range(e) if i // per in groups]
        top = sorted(eligible, key=lambda i: -sel[i])[:k]
        assert sorted(rec.expert_idx[t].tolist()) == sorted(top), t
        total = sum(s[t][i] for i in top)
        got = dict(zip(rec.expert_idx[t].tolist(), rec.weights[t].tolist()))
        for i in top:
            assert got[i] == pytest.approx(s[t][i] / total, rel=1e-5)
        outside += sorted(range(e), key=lambda i: -sel[i])[:k] != top
    assert outside > 0  # the limit really changes choices for some tokens
    # One group of everything (the default) is plain top-K of s + b.
    plain = sigmoid_router(e, k, seed=21)
    assert torch.equal(plain(x).expert_idx, (torch.sigmoid(x @ plain.weight.t()) + plain.expert_bias).topk(k).indices)


def test_sigmoid_sequence_wise_balance_loss_matches_deepseek_v3():
    """V3 eq. 17-20, per sequence of T tokens: s' = s / sum_j s_j, f_i = E / (K T) * sum_t
    1[s_{i,t} in TopK({s_{j,t}})], P_i = mean_t s'_i, loss = sum_i f_i P_i; averaged over
    sequences. The indicator is the top-K of the raw affinities s, not the router's choice (which
    adds the bias b and may be group-limited)."""
    e, k, t_len, b = 8, 2, 5, 3
    router = sigmoid_router(e, k, n_group=4, topk_group=2, seed=31)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.6, 0.6, e))
        rec = router(torch.randn(b * t_len, D))
    s = torch.sigmoid(rec.logits).tolist()
    raw_top = [sorted(range(e), key=lambda i: -s[t][i])[:k] for t in range(b * t_len)]
    assert any(sorted(raw_top[t]) != sorted(rec.expert_idx[t].tolist()) for t in range(b * t_len))  # bias matters
    per_sequence = []
    for q in range(b):
        tokens = range(q * t_len, (q + 1) * t_len)
        f = [e / (k * t_len) * sum(i in raw_top[t] for t in tokens) for i in range(e)]
        p = [sum(s[t][i] / sum(s[t]) for t in tokens) / t_len for i in range(e)]
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    expect = sum(per_sequence) / b
    assert float(routing_losses(rec, seq_len=t_len)["seq_balance"]) == pytest.approx(expect, rel=1e-6)
    batch_level = float(routing_losses(rec, seq_len=b * t_len)["seq_balance"])
    assert abs(batch_level - expect) > 1e-5  # per sequence, not over the whole batch
    assert float(routing_losses(rec)["seq_balance"]) == 0.0  # without sequences there is none


def test_deepseek_v3_config_defaults_and_refusals():
    v3 = config.from_dict({"moe": {"router": "sigmoid", "num_experts": 16, "top_k": 4, "n_group": 4, "topk_group": 2}})
    assert v3.moe.aux_loss_coef == 0.0 and v3.moe.seq_aux_loss_coef == 1e-4  # no Switch loss unless asked for
    asked = config.from_dict({"moe": {"router": "sigmoid", "aux_loss_coef": 0.01}})
    assert asked.moe.aux_loss_coef == 0.01
    assert "moe.router=sigmoid" in refusal(v3.model, v3.moe)  # transformers' Mixtral / Qwen2-MoE cannot express it
    for bad, message in [
        ({"n_group": 3}, "must split into moe.n_group=3 groups"),
        ({"n_group": 4, "topk_group": 5}, "moe.topk_group=5 must be <= moe.n_group=4"),
        ({"n_group": 4, "topk_group": 1, "top_k": 5}, "moe.top_k=5 must be <= the experts of moe.topk_group=1 groups (4)"),
        ({"router": "topk", "n_group": 2}, "set moe.router=sigmoid"),
        ({"router": "topk", "seq_aux_loss_coef": 1e-4}, "needs moe.router=sigmoid"),
    ]:
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            config.from_dict({"moe": {"router": "sigmoid", "num_experts": 16, "top_k": 4, **bad}})


def test_each_router_gets_its_papers_losses_by_default():
    coefs = {r: config.from_dict({"moe": {"router": r, "top_k": 2 if r != "switch" else 1, "num_groups": 2}}).moe.loss_coefs
             for r in config.ROUTERS}
    assert coefs["switch"]["load_balance"] == coefs["topk"]["load_balance"] == coefs["gshard_top2"]["load_balance"] == 0.01
    for shazeer in ("noisy_topk", "hierarchical"):
        assert coefs[shazeer] == {"load_balance": 0.0, "importance": 0.1, "load": 0.1, "seq_balance": 0.0, "z": 0.0}
    for balanced in ("expert_choice", "soft"):
        assert coefs[balanced]["load_balance"] == coefs[balanced]["importance"] == 0.0
    assert coefs["sigmoid"]["load_balance"] == 0.0 and coefs["sigmoid"]["seq_balance"] == 1e-4
    # The router z-loss is ST-MoE's, whose router is softmax top-k: no other router's paper has one.
    assert {r: c["z"] for r, c in coefs.items()} == {r: 0.001 if r == "topk" else 0.0 for r in config.ROUTERS}
    assert config.from_dict({"moe": {"router": "sigmoid", "z_loss_coef": 0.01}}).moe.loss_coefs["z"] == 0.01
    dense = config.from_dict({"model": {"arch": "transformer_dense"}})
    assert dense.moe.aux_loss_coef == 0.0


def test_top1_renormalised_weights_are_refused_and_the_raw_default_trains_the_router():
    for moe, fix in [
        ({"top_k": 1, "renormalize": True}, "set moe.renormalize=false"),
        ({"router": "sigmoid", "top_k": 1, "renormalize": True}, "set moe.renormalize=false"),
        ({"router": "noisy_topk", "top_k": 1}, "use moe.top_k >= 2"),
    ]:
        with pytest.raises(config.ConfigError, match=fix):
            config.from_dict({"moe": moe})
    cfg = config.from_dict({"model": {"d_model": D, "n_layers": 1, "n_heads": 2, "ffn_hidden": 16},
                            "moe": {"num_experts": 4, "top_k": 1, "aux_loss_coef": 0.0, "z_loss_coef": 0.0}})
    assert cfg.moe.renormalize is False
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50)
    ids = torch.randint(0, 50, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    assert model.blocks[0].ffn.inner.router.weight.grad.abs().max() > 0
    # What the refusal prevents: renormalised top-1 weights are all 1, and the router's gradient is
    # 0 up to rounding (d(p / p) / dp = 0), against O(1e-2) with the raw weight.
    layer = MoELayer(D, 4, 1, H, renormalize=True)
    y, rec = layer(torch.randn(20, D))
    y.sum().backward()
    assert torch.equal(rec.weights, torch.ones_like(rec.weights)) and float(layer.router.weight.grad.abs().max()) < 1e-8


def _hierarchical_gate_grads(cfg: config.Config) -> dict[str, float]:
    """The largest |gradient| the language-model loss alone gives each gate of the first MoE layer."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50).train()
    router = model.blocks[0].ffn.inner.router
    with torch.no_grad():  # the paper's gates start at zero: give them something to differ by
        for w in (router.primary.weight, router.weight):
            w.normal_(0.0, 0.5)
    ids = torch.randint(0, 50, (2, 9))
    model(ids[:, :-1], ids[:, 1:]).lm_loss.backward()
    return {"primary": float(router.primary.weight.grad.abs().max()), "groups": float(router.weight.grad.abs().max())}


def test_hierarchical_uses_k_2_at_each_level_and_both_gates_learn_from_the_lm_loss():
    """Shazeer et al. 2017, App. C.1: k = 2 at each level. A level with k = 1 renormalises its one
    kept weight to 1, and its gate gets no gradient from the language-model loss: refused."""
    model = {"d_model": D, "n_layers": 1, "n_heads": 2, "ffn_hidden": 16}
    moe = {"router": "hierarchical", "num_experts": 8, "num_groups": 4, "z_loss_coef": 0.0,
           "importance_loss_coef": 0.0, "load_loss_coef": 0.0}
    cfg = config.from_dict({"model": model, "moe": moe})
    assert (cfg.moe.group_top_k, cfg.moe.top_k) == (2, 2)  # the paper's, by default
    grads = _hierarchical_gate_grads(cfg)
    assert grads["primary"] > 1e-6 and grads["groups"] > 1e-6
    for key, fix in (("group_top_k", "set moe.group_top_k=2"), ("top_k", "set moe.top_k=2")):
        with pytest.raises(config.ConfigError, match=re.escape(fix)):
            config.from_dict({"model": model, "moe": {**moe, key: 1}})
        # What the refusal prevents: that level's gate learns nothing from the language-model loss.
        read = config.from_dict({"model": model, "moe": {**moe, key: 1}}, trained=True)  # a run that exists loads
        starved = _hierarchical_gate_grads(read)
        assert starved["primary" if key == "group_top_k" else "groups"] < 1e-9
    with pytest.raises(config.ConfigError, match="which needs moe.num_groups >= 2"):
        config.from_dict({"model": model, "moe": {**moe, "num_groups": 1, "group_top_k": 1}})


def test_lstm_moe_output_passes_a_sigmoid_before_dropout_and_the_residual():
    """Shazeer et al. 2017, App. C.1: h <- h + dropout(sigmoid(MoE(h))) between the LSTM layers."""
    base = {"model": {"arch": "lstm_moe", "d_model": D, "n_layers": 2, "ffn_hidden": 16},
            "moe": {"num_experts": 4, "capacity_factor": 0.5}}
    ids = torch.randint(0, 50, (2, 7))
    for sigmoid in (True, False):
        torch.manual_seed(0)
        cfg = config.from_dict({**base, "model": {**base["model"], "lstm_sigmoid": sigmoid}})
        model = build_model(cfg.model, cfg.moe, 50).eval()
        h0 = model.embed(ids)
        h1 = h0 + model.lstms[0](h0)[0]
        y, rec = model.ffns[0](h1)
        h2 = h1 + (torch.sigmoid(y) if sigmoid else y)
        h3 = h2 + model.lstms[1](h2)[0]
        torch.testing.assert_close(model.body(h0)[0], h3)
        dropped = (~rec.kept).all(dim=1).view(2, 7)  # tokens capacity dropped entirely
        assert bool(dropped.any())
        # What a dropped token adds: sigmoid(0) = 0.5 in every unit, or nothing without the sigmoid.
        torch.testing.assert_close((h2 - h1)[dropped], torch.full_like(h1[dropped], 0.5 if sigmoid else 0.0))
    assert config.from_dict({"model": {"arch": "lstm_moe"}}).model.lstm_sigmoid  # the paper's form by default


def test_the_lstm_sigmoid_comes_before_dropout_in_training():
    # With dropout p the added term is 0 or sigmoid(y) / (1 - p), never sigmoid of a dropped 0 (0.5).
    cfg = config.from_dict({"model": {"arch": "lstm_moe", "d_model": D, "n_layers": 2, "ffn_hidden": 16, "dropout": 0.5},
                            "moe": {"num_experts": 4}})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50).train()
    seen = {}
    model.ffns[0].register_forward_hook(lambda m, args, out: seen.update(h1=args[0], y=out[0]))
    model.lstms[1].register_forward_pre_hook(lambda m, args: seen.update(h2=args[0]))
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 7)))
    added, kept = seen["h2"] - seen["h1"], torch.sigmoid(seen["y"]) / 0.5
    dropped = added.abs() < 1e-7
    assert bool(dropped.any()) and bool((~dropped).any())
    torch.testing.assert_close(added[~dropped], kept[~dropped])


def test_the_sequence_wise_loss_enters_the_model_loss_per_sequence_and_layer():
    cfg = config.from_dict({"model": {"d_model": D, "n_layers": 2, "n_heads": 2, "ffn_hidden": 16},
                            "moe": {"router": "sigmoid", "num_experts": 4, "seq_aux_loss_coef": 0.3, "z_loss_coef": 0.0}})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50)
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
        per_layer = [routing_losses(r, seq_len=8)["seq_balance"] for r in out.routing]
    assert float(out.aux_loss) == pytest.approx(0.3 * float(sum(per_layer)), rel=1e-5) and float(out.aux_loss) > 0


def test_a_run_saved_before_these_rules_is_read_as_the_model_it_trained(tmp_path):
    # Its config.yaml has no lstm_sigmoid (its LSTM had none) and averaged its router losses over
    # the MoE layers: read back, the coefficients are per layer, so the objective is unchanged.
    old = config.from_dict({"model": {"arch": "lstm_moe", "n_layers": 3, "d_model": D, "ffn_hidden": 16},
                            "moe": {"num_experts": 4, "aux_loss_coef": 0.02, "z_loss_coef": 0.001}})
    raw = config.to_dict(old)
    del raw["model"]["lstm_sigmoid"], raw["moe"]["seq_aux_loss_coef"], raw["model"]["head"]
    path = tmp_path / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    assert config.load(path).model.lstm_sigmoid  # as a new config: today's defaults
    read = config.load(path, saved=True)
    assert read.model.lstm_sigmoid is False and len(read.moe.slots(read.model)) == 2
    assert read.moe.aux_loss_coef == pytest.approx(0.01) and read.moe.z_loss_coef == pytest.approx(0.0005)
    torch.manual_seed(0)
    model = build_model(read.model, read.moe, 50)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
    terms = out.aux_terms  # each loss's mean over the layers: what the old convention weighted
    assert float(out.aux_loss) == pytest.approx(0.02 * float(terms["load_balance"]), rel=1e-5)
    assert float(out.z_loss) == pytest.approx(0.001 * float(terms["z"]), rel=1e-5)
    assert read.moe.seq_aux_loss_coef == 0.0 and read.moe.balance_primary  # what the run trained with
    saved_now = tmp_path / "new.yaml"
    config.save(read, saved_now)
    assert config.load(saved_now, saved=True) == read  # a config saved today is read as written
    # A top-1 run with renormalised weights (the old default) still loads: its model exists.
    raw["moe"].update(top_k=1, renormalize=True)
    path.write_text(__import__("yaml").safe_dump(raw))
    assert config.load(path, saved=True).moe.renormalize
    with pytest.raises(config.ConfigError, match="moe.renormalize=false"):
        config.load(path)  # training a new one is refused
