"""Backbones built by `moectl.models.build_model`: shapes, loss assembly, MoE slots, causality,
tied embeddings, overfitting, parameter counts, determinism, RMSNorm and rotary embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from moectl import config
from moectl.models import build_model, moe_slots, parameter_counts
from moectl.models.layers import RMSNorm, RotaryEmbedding, rotate_half
from moectl.moe import MoELayer, load_balancing_loss, router_z_loss

# float() on a loss that requires grad is fine here: the tests only read values.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")

ARCHS = ["transformer_moe", "lstm_moe", "transformer_dense", "lstm_dense"]
V, B, T = 40, 2, 10


def make_cfg(arch: str = "transformer_moe", model: dict | None = None, moe: dict | None = None):
    raw = {
        "model": {"arch": arch, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64, **(model or {})},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, **(moe or {})},
    }
    return config.from_dict(raw)


def make_model(arch: str = "transformer_moe", seed: int = 0, vocab: int = V, **sections):
    cfg = make_cfg(arch, **sections)
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.moe, vocab)


def batch(seed: int = 1, b: int = B, t: int = T, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


# ------------------------------------------------------------------------- outputs and losses


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_loss_assembly(arch):
    model = make_model(arch, moe={"aux_loss_coef": 0.1, "z_loss_coef": 0.01})
    ids, targets = batch()
    out = model(ids)
    assert out.logits.shape == (B, T, V)
    assert out.loss is None and out.lm_loss is None
    out = model(ids, targets)
    assert out.logits.shape == (B, T, V)
    assert torch.equal(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-6, atol=1e-6)
    # Small init: the model starts near the uniform prediction, lm_loss ~ ln V.
    assert abs(float(out.lm_loss.detach()) - math.log(V)) < 0.1
    if arch.endswith("_dense"):
        assert out.routing == []
        assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
        assert moe_slots(model) == []
        assert not any(isinstance(m, MoELayer) for m in model.modules())
    else:
        n_slots = 2 if arch.startswith("transformer") else 1  # LSTM: slots sit between layers
        assert len(out.routing) == n_slots == len(moe_slots(model))
        for r in out.routing:
            assert r.probs.shape == (B * T, 4) and r.expert_idx.shape == (B * T, 2)
        assert out.aux_loss.item() > 0 and out.z_loss.item() > 0


@pytest.mark.parametrize(
    "arch,n_layers,every,slots",
    [
        ("transformer_moe", 4, 2, [1, 3]),
        ("transformer_moe", 4, 1, [0, 1, 2, 3]),
        ("transformer_moe", 3, 3, [2]),
        ("lstm_moe", 3, 1, [0, 1]),
        ("lstm_moe", 3, 2, [1]),
        ("lstm_moe", 4, 2, [1]),
        ("transformer_dense", 4, 1, []),
        ("lstm_dense", 3, 1, []),
    ],
)
def test_moe_slots_match_routing_records(arch, n_layers, every, slots):
    model = make_model(arch, model={"n_layers": n_layers}, moe={"every": every})
    assert moe_slots(model) == slots
    assert sum(isinstance(m, MoELayer) for m in model.modules()) == len(slots)
    # Records come in slot order: record i is the one the i-th MoE layer returned.
    returned = []
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: returned.append(out[1])) for m in layers]
    ids, targets = batch()
    out = model(ids, targets)
    for h in hooks:
        h.remove()
    assert len(out.routing) == len(slots) == len(returned)
    for record, ref in zip(out.routing, returned):
        assert record is ref
        assert record.logits.shape == (B * T, 4)
    if not slots:
        assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0


@pytest.mark.parametrize("arch,n_layers", [("transformer_moe", 4), ("lstm_moe", 3)])
def test_aux_and_z_loss_add_each_layers_term_times_its_coefficient(arch, n_layers):
    # Switch, GShard and ST-MoE: every MoE layer carries its own alpha * loss (not a mean over layers).
    model = make_model(arch, model={"n_layers": n_layers}, moe={"aux_loss_coef": 0.3, "z_loss_coef": 0.07})
    ids, targets = batch()
    out = model(ids, targets)
    assert len(out.routing) == len(moe_slots(model)) >= 2
    lb = [float(load_balancing_loss(r.probs, r.expert_idx)) for r in out.routing]
    z = [float(router_z_loss(r.logits)) for r in out.routing]
    assert float(out.aux_loss) == pytest.approx(0.3 * sum(lb), rel=1e-6)
    assert float(out.z_loss) == pytest.approx(0.07 * sum(z), rel=1e-6)
    # Logged: each term's mean over the layers, unweighted.
    assert float(out.aux_terms["z"]) == pytest.approx(sum(z) / len(z), rel=1e-6)
    # The layers really differ, so a mean or a single layer would not pass.
    assert len(set(z)) == len(z)


def test_zero_coefficients_give_zero_router_losses():
    model = make_model(moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})
    out = model(*batch())
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    assert torch.equal(out.loss, out.lm_loss)


# ---------------------------------------------------------------------------------- causality


@pytest.mark.parametrize(
    "arch, capacity_factor",
    [(a, None) for a in ARCHS] + [("transformer_moe", 0.5), ("transformer_moe", 1.0), ("lstm_moe", 0.5)],
)
def test_changing_a_token_does_not_change_earlier_logits(arch, capacity_factor):
    # With capacity, tokens compete for expert slots across the batch: serving earlier positions
    # first keeps a later token from ever displacing an earlier one.
    model = make_model(arch, model={"n_layers": 2}, moe={"capacity_factor": capacity_factor}).eval()
    if capacity_factor is not None:
        with torch.no_grad():  # a sharp router, so capacity really drops tokens
            for layer in model.modules():
                if isinstance(layer, MoELayer):
                    layer.router.weight.normal_(std=2.0)
    ids, _ = batch(t=12)
    if capacity_factor is not None:
        assert any(int(r.num_dropped) > 0 for r in model(ids).routing)
    base = model(ids).logits
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % V
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        # ... while position t itself does change: the check can fail.
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- tied embeddings


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
def test_tied_embeddings(arch):
    tied = make_model(arch, model={"tie_embeddings": True})
    assert tied.lm_head.weight is tied.embed.weight
    untied = make_model(arch, model={"tie_embeddings": False})
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    d = 32
    assert parameter_counts(untied)[0] - parameter_counts(tied)[0] == V * d


# --------------------------------------------------------------------------------- overfitting


@pytest.mark.parametrize(
    "arch,steps",
    [("transformer_moe", 150), ("lstm_moe", 150)],
)
def test_overfits_a_tiny_fixed_batch(arch, steps):
    vocab = 32
    model = make_model(arch, seed=0, vocab=vocab, model={"d_model": 64, "ffn_hidden": 64, "n_heads": 4},
                       moe={"num_experts": 4, "top_k": 2, "expert_hidden": 64})
    ids, targets = batch(seed=2, b=4, t=16, vocab=vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(steps):
        out = model(ids, targets)
        if first is None:
            first = float(out.lm_loss.detach())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    final = float(model(ids, targets).lm_loss)
    assert abs(first - math.log(vocab)) < 0.1
    assert final < 0.5, f"{arch}: lm_loss {first:.3f} -> {final:.3f}"


# ---------------------------------------------------------------------------- parameter counts


def _expert_params(d: int, h: int, e: int, activation: str) -> int:
    return e * d * h * (3 if activation == "swiglu" else 2)


@pytest.mark.parametrize(
    "arch,n_layers,every,k,slots",
    [("transformer_moe", 4, 2, 2, 2), ("transformer_moe", 2, 1, 1, 2), ("lstm_moe", 3, 1, 3, 2),
     ("transformer_moe", 2, 1, 4, 2)],
)
def test_parameter_counts_moe(arch, n_layers, every, k, slots):
    model = make_model(arch, model={"n_layers": n_layers}, moe={"every": every, "top_k": k})
    total, active = parameter_counts(model)
    unique = {p.data_ptr(): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert total == sum(unique.values())
    all_with_dups = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert total == all_with_dups - V * 32  # the tied embedding counted once
    activation = "swiglu" if arch.startswith("transformer") else "relu"
    per_layer = _expert_params(32, 32, 4, activation)
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == slots
    assert all(sum(p.numel() for p in m.experts.parameters()) == per_layer for m in moe_layers)
    assert active == total - slots * per_layer * (4 - k) // 4
    if k == 4:
        assert active == total


@pytest.mark.parametrize("arch", ["transformer_dense", "lstm_dense"])
def test_parameter_counts_dense(arch):
    model = make_model(arch)
    total, active = parameter_counts(model)
    assert active == total == sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_and_loss(arch):
    a, b = make_model(arch, seed=123), make_model(arch, seed=123)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    ids, targets = batch()
    assert torch.equal(a(ids, targets).loss, b(ids, targets).loss)
    c = make_model(arch, seed=124)
    assert not torch.equal(c.embed.weight, a.embed.weight)


# ------------------------------------------------------------------------------- norm and rotary


def test_rmsnorm_has_unit_rms():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(5, 7, 64) * 3 + 1
    y = norm(x)
    rms = y.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-5)
    # Direction is kept: y is x scaled by a positive per-vector factor.
    scale = (y / x)
    torch.testing.assert_close(scale, scale[..., :1].expand_as(scale), rtol=1e-5, atol=1e-5)
    # The weight scales the output elementwise.
    with torch.no_grad():
        norm.weight.copy_(torch.arange(64.0))
    torch.testing.assert_close(norm(x), torch.arange(64.0) * y)


def _rotate(v: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary application used by CausalSelfAttention, at one position."""
    return v * cos[pos] + rotate_half(v) * sin[pos]


def test_rotary_preserves_norm_and_encodes_relative_position():
    torch.manual_seed(0)
    hd = 16
    rope = RotaryEmbedding(hd, theta=10000.0)
    cos, sin = rope(64, torch.device("cpu"))
    assert cos.shape == sin.shape == (64, hd)
    assert torch.equal(cos[0], torch.ones(hd)) and torch.equal(sin[0], torch.zeros(hd))
    q, k = torch.randn(hd, dtype=torch.float32), torch.randn(hd)
    for pos in (0, 1, 7, 63):
        torch.testing.assert_close(_rotate(q, pos, cos, sin).norm(), q.norm(), rtol=1e-5, atol=1e-5)
    for i, j in ((3, 1), (10, 10), (2, 9)):
        ref = torch.dot(_rotate(q, i, cos, sin), _rotate(k, j, cos, sin))
        for s in (1, 5, 40):
            shifted = torch.dot(_rotate(q, i + s, cos, sin), _rotate(k, j + s, cos, sin))
            torch.testing.assert_close(shifted, ref, rtol=1e-4, atol=1e-4)
    # It is not the identity: the dot product does depend on the offset i - j.
    d1 = torch.dot(_rotate(q, 3, cos, sin), _rotate(k, 1, cos, sin))
    d2 = torch.dot(_rotate(q, 9, cos, sin), _rotate(k, 1, cos, sin))
    assert abs(float(d1 - d2)) > 1e-3
