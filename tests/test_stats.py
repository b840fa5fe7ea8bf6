"""Routing statistics (moectl.common.stats): `summarize` on hand-made loads, router entropy, and the
window accumulator `RoutingStats`."""

from __future__ import annotations

import math

import pytest
import torch

from moectl.moe import MoELayer, RoutingRecord
from moectl.common.stats import RoutingStats, summarize

# float() on a loss that requires grad is fine here: the tests only read values.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")


def record_from(probs: torch.Tensor, expert_idx: torch.Tensor, kept: torch.Tensor | None = None) -> RoutingRecord:
    n, k = expert_idx.shape
    e = probs.shape[1]
    kept = torch.ones(n, k, dtype=torch.bool) if kept is None else kept
    tpe = torch.bincount(expert_idx[kept], minlength=e)
    return RoutingRecord(
        logits=probs.clamp_min(1e-30).log(),
        probs=probs,
        expert_idx=expert_idx,
        weights=probs.gather(1, expert_idx),
        chosen=torch.ones_like(kept),
        kept=kept,
        tokens_per_expert=tpe,
        num_dropped=(~kept).sum(),
    )


# ------------------------------------------------------------------------------------ summarize


@pytest.mark.parametrize("e", [2, 4, 8])
def test_summarize_uniform_load(e):
    s = summarize(torch.full((e,), 5, dtype=torch.int64), entropy_sum=0.0, tokens=0, dropped=0)
    assert s.load == [5] * e
    assert s.share == pytest.approx([1 / e] * e, abs=1e-12)
    assert s.cv == 0.0
    assert s.max_over_mean == 1.0 and s.min_over_mean == 1.0
    assert s.load_entropy == pytest.approx(1.0, abs=1e-12)
    assert s.dead_experts == 0
    assert s.drop_fraction == 0.0


@pytest.mark.parametrize("e", [2, 4, 8])
def test_summarize_one_hot_load(e):
    load = torch.zeros(e, dtype=torch.int64)
    load[e // 2] = 12
    s = summarize(load, entropy_sum=0.0, tokens=12, dropped=0)
    assert s.max_over_mean == pytest.approx(e, abs=1e-12)
    assert s.min_over_mean == 0.0
    assert s.load_entropy == 0.0
    assert s.dead_experts == e - 1
    assert s.cv == pytest.approx(math.sqrt(e - 1), rel=1e-12)
    assert s.share[e // 2] == 1.0 and sum(s.share) == 1.0


def test_summarize_specific_load_by_hand():
    load = [3, 1, 0, 0]
    dropped = 4
    s = summarize(torch.tensor(load), entropy_sum=2.0, tokens=4, dropped=dropped)
    mean = sum(load) / 4  # 1.0
    pop_std = math.sqrt(sum((v - mean) ** 2 for v in load) / 4)  # sqrt((4 + 0 + 1 + 1) / 4)
    assert s.cv == pytest.approx(pop_std / mean, rel=1e-12)
    assert s.cv == pytest.approx(math.sqrt(1.5), rel=1e-12)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s.load_entropy == pytest.approx(h / math.log(4), rel=1e-12)
    assert s.share == [0.75, 0.25, 0.0, 0.0]
    assert s.max_over_mean == 3.0 and s.min_over_mean == 0.0
    assert s.dead_experts == 2
    assert s.drop_fraction == pytest.approx(dropped / (sum(load) + dropped))  # 0.5
    assert s.drop_fraction == 0.5
    assert s.router_entropy == pytest.approx((2.0 / 4) / math.log(4), rel=1e-12)
    assert s.tokens == 4 and s.load == load
    d = s.to_dict()
    assert d["cv"] == s.cv and d["load"] == load


def test_summarize_empty_window_is_all_zero_not_nan():
    s = summarize(torch.zeros(4), entropy_sum=0.0, tokens=0, dropped=0)
    values = [s.cv, s.max_over_mean, s.min_over_mean, s.load_entropy, s.router_entropy, s.drop_fraction]
    assert all(v == 0.0 for v in values)
    assert s.dead_experts == 4


# ---------------------------------------------------------------------------------- router entropy


@pytest.mark.parametrize("e", [2, 4, 8])
def test_router_entropy_uniform_is_one(e):
    n = 6
    stats = RoutingStats(1, e)
    stats.update([record_from(torch.full((n, e), 1.0 / e), torch.zeros(n, 1, dtype=torch.int64))])
    (s,) = stats.summary()
    assert s.router_entropy == pytest.approx(1.0, abs=1e-6)
    assert s.tokens == n


def test_router_entropy_one_hot_is_zero():
    n, e = 6, 4
    probs = torch.zeros(n, e)
    probs[torch.arange(n), torch.arange(n) % e] = 1.0
    stats = RoutingStats(1, e)
    stats.update([record_from(probs, (torch.arange(n) % e)[:, None])])
    (s,) = stats.summary()
    assert s.router_entropy == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(s.router_entropy)


def test_router_entropy_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    stats = RoutingStats(1, 4)
    stats.update([record_from(probs, torch.tensor([[0], [0]]))])
    h = [-(sum(p * math.log(p) for p in row if p > 0)) for row in probs.tolist()]
    assert stats.summary()[0].router_entropy == pytest.approx(sum(h) / 2 / math.log(4), rel=1e-9)


# ------------------------------------------------------------------------------------ RoutingStats


def _records(seed: int, layers: list[MoELayer], n: int) -> list[RoutingRecord]:
    torch.manual_seed(seed)
    x = torch.randn(n, 8)
    return [layer(x)[1] for layer in layers]


def test_update_over_steps_equals_summarize_of_concatenated_counts():
    torch.manual_seed(0)
    e = 4
    layers = [MoELayer(8, e, 2, 6, capacity_factor=cf, init_std=1.0) for cf in (0.75, None)]
    stats = RoutingStats(len(layers), e)
    steps = [_records(s, layers, n) for s, n in ((1, 20), (2, 12), (3, 30))]
    for records in steps:
        stats.update(records)
    summary = stats.summary()
    assert len(summary) == 2
    assert sum(int(r.num_dropped) for r in (rs[0] for rs in steps)) > 0  # layer 0 really drops
    for i, got in enumerate(summary):
        recs = [rs[i] for rs in steps]
        load = torch.stack([r.tokens_per_expert for r in recs]).sum(0)
        probs = torch.cat([r.probs.detach() for r in recs]).double()
        entropy = float(-(probs * probs.clamp_min(1e-20).log()).sum())
        tokens = sum(r.num_tokens for r in recs)
        dropped = sum(int(r.num_dropped) for r in recs)
        expected = summarize(load, entropy, tokens, dropped)
        assert got.load == expected.load == load.tolist()
        assert got.tokens == tokens == 62 and got.dead_experts == expected.dead_experts
        # rel 1e-6: the per-step entropy sum is taken in fp32 before it is accumulated in fp64.
        for field in ("cv", "max_over_mean", "min_over_mean", "load_entropy", "router_entropy", "drop_fraction"):
            assert getattr(got, field) == pytest.approx(getattr(expected, field), rel=1e-6, abs=1e-12), field
        assert got.share == pytest.approx(expected.share)
        assert got.drop_fraction == pytest.approx(dropped / (62 * 2))


def test_batch_imbalance_z_and_logit_spread_by_hand():
    """batch max/mean averages each pass's own ratio (not the ratio of the summed load); z and the
    logit spread are means over real tokens; shifting every logit moves z, not the spread."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])  # (N=3, E=2)
    probs = logits.softmax(-1)
    first = record_from(probs, torch.tensor([[0], [0], [0]]))  # load [3, 0]: max/mean 2
    first.logits = logits
    second = record_from(probs, torch.tensor([[0], [1], [1]]))  # load [1, 2]: max/mean 4/3
    second.logits = logits + 5.0
    stats = RoutingStats(1, 2)
    stats.update([first])
    stats.update([second])
    s = stats.summary()[0]
    assert s.max_over_mean == pytest.approx(4 / 3)  # summed load [4, 2]
    assert s.batch_max_over_mean == pytest.approx((2 + 4 / 3) / 2)
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in logits.tolist()]
    z = (sum(v**2 for v in lse) + sum((v + 5) ** 2 for v in lse)) / 6
    assert s.router_z == pytest.approx(z)
    assert s.logit_spread == pytest.approx((1 + 0 + 1) / 3)  # population std of two logits: |a - b| / 2
    # Padding counts in none of them.
    padded = record_from(probs, torch.tensor([[0], [0], [1]]))
    padded.logits, padded.valid = logits, torch.tensor([True, True, False])
    padded.tokens_per_expert = torch.tensor([2, 0])
    alone = RoutingStats(1, 2)
    alone.update([padded])
    s = alone.summary()[0]
    assert s.router_z == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2)
    assert s.logit_spread == pytest.approx(0.5) and s.batch_max_over_mean == pytest.approx(2.0)


def test_state_dict_round_trip_and_reset():
    torch.manual_seed(0)
    e = 4
    layers = [MoELayer(8, e, 1, 6, capacity_factor=1.0, init_std=1.0)]
    stats = RoutingStats(1, e)
    stats.update(_records(1, layers, 16))
    stats.update(_records(2, layers, 16))
    state = stats.state_dict()
    assert set(state) == {"load", "entropy_sum", "tokens", "dropped", "z_sum", "spread_sum", "batch_peak_sum", "passes",
                          "skipped"}
    assert all(t.device.type == "cpu" for t in state.values())

    restored = RoutingStats(1, e)
    assert restored.empty()
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    assert restored.load.dtype == torch.float64
    assert not restored.empty()
    assert restored.summary() == stats.summary()
    # A restored window keeps accumulating like the original.
    more = _records(3, layers, 16)
    stats.update(more)
    restored.update(more)
    assert restored.summary() == stats.summary()
    assert restored.summary()[0].tokens == 48

    stats.reset()
    assert stats.empty()
    (s,) = stats.summary()
    assert s.load == [0] * e and s.tokens == 0 and s.drop_fraction == 0.0 and s.router_entropy == 0.0
    assert float(stats.load.sum() + stats.entropy_sum.sum() + stats.dropped.sum()) == 0.0


def test_empty():
    assert RoutingStats(0, 4).empty()
    assert RoutingStats(0, 4).summary() == []
    stats = RoutingStats(2, 4)
    assert stats.empty()
    probs = torch.full((3, 4), 0.25)
    stats.update([record_from(probs, torch.zeros(3, 1, dtype=torch.int64))])  # fewer records than layers
    assert not stats.empty()
    s0, s1 = stats.summary()
    assert s0.tokens == 3 and s0.load == [3, 0, 0, 0]
    assert s1.tokens == 0 and s1.load == [0, 0, 0, 0]
    stats.reset()
    assert stats.empty()
