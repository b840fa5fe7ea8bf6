"""The FasterMoE performance model: exact values of its formulas on small layouts, and the
orderings it must get right (shadowing a hot expert helps, overlap hides the shorter part,
expert memory falls as 1/N, impossible layouts are named)."""

from __future__ import annotations

import dataclasses

import pytest

from moectl.common.perf_model import ExpertShape, Hardware, Layout, estimate, greedy_shadow, owner, top_shadow

SHAPE = ExpertShape(d_model=8, hidden=16, num_experts=4, matrices=3, bytes_per_value=4)
HW = Hardware("test", flops=1e9, intra_bandwidth=1e6, inter_bandwidth=1e5, latency=1e-3, devices_per_node=8, memory=1e9)
FWD = 2 * 8 * 16 * 3  # forward FLOPs per routed row: 768
ROW = 8 * 4  # bytes per row on the wire: 32


def test_owners_are_consecutive_blocks_of_experts_within_each_group():
    layout = Layout(world=4, ep=2)
    assert [owner(e, 0, layout, 4) for e in range(4)] == [0, 0, 1, 1]
    assert [owner(e, 3, layout, 4) for e in range(4)] == [2, 2, 3, 3]


def test_expert_parallel_step_time_follows_the_formulas():
    counts = [[10, 0, 0, 5], [0, 0, 20, 0]]  # rank 0 holds experts 0-1, rank 1 experts 2-3
    est = estimate(SHAPE, HW, Layout(world=2, ep=2), counts)
    assert est.rows == [10, 25]  # rank 1 computes its own 20 and rank 0's 5
    assert est.compute == pytest.approx(3 * 25 * FWD / 1e9)
    # Rank 0 sends 5 rows and receives none: 5 x 32 bytes over NVLink-like 1e6 B/s, one peer.
    assert est.exchange == pytest.approx(4 * (5 * ROW / 1e6 + 1e-3))
    assert est.reduce == 0 and est.shadow == 0
    assert est.total == pytest.approx(est.compute + est.exchange)
    assert est.imbalance == pytest.approx(25 / 17.5)


def test_plain_ddp_all_reduces_every_expert_and_exchanges_nothing():
    counts = [[4, 4, 4, 4]] * 4
    est = estimate(SHAPE, HW, Layout(world=4, ep=1), counts)
    assert est.exchange == 0 and est.rows == [16] * 4
    expert_bytes = 8 * 16 * 3 * 4
    assert est.reduce == pytest.approx(2 * 3 / 4 * 4 * expert_bytes / 1e6 + 2 * 3 * 1e-3)
    # EP=2 x DP=2 reduces half the experts over 2 replicas.
    half = estimate(SHAPE, HW, Layout(world=4, ep=2), counts)
    assert half.reduce == pytest.approx(2 * 1 / 2 * 2 * expert_bytes / 1e6 + 2 * 1e-3)


def test_expert_memory_falls_as_one_over_n_and_shadows_add_to_it():
    counts = [[1, 1, 1, 1]] * 4
    mem = {n: estimate(SHAPE, HW, Layout(world=4, ep=n), counts).memory for n in (1, 2, 4)}
    assert mem[1] == 2 * mem[2] == 4 * mem[4] == 4 * 4 * SHAPE.parameter_bytes
    shadowed = estimate(SHAPE, HW, Layout(world=4, ep=4, shadow=(0,)), counts).memory
    assert shadowed == mem[4] + 4 * SHAPE.parameter_bytes


def test_shadowing_a_hot_expert_moves_its_rows_to_where_they_were_routed():
    counts = [[30, 0, 0, 0], [30, 0, 0, 0]]  # everyone wants expert 0, on rank 0
    plain = estimate(SHAPE, HW, Layout(world=2, ep=2), counts)
    shadowed = estimate(SHAPE, HW, Layout(world=2, ep=2, shadow=(0,)), counts)
    assert plain.rows == [60, 0] and shadowed.rows == [30, 30]
    assert shadowed.compute == pytest.approx(plain.compute / 2)
    assert shadowed.exchange == pytest.approx(4 * 1e-3)  # nothing travels, one latency per peer
    assert shadowed.shadow == pytest.approx(2 * (SHAPE.parameter_bytes / 1e6 + 1e-3))


def test_overlap_hides_the_shorter_part_but_for_the_pipelines_fill():
    counts = [[10, 0, 0, 5], [0, 0, 20, 0]]
    plain = estimate(SHAPE, HW, Layout(world=2, ep=2), counts)
    over = estimate(SHAPE, HW, Layout(world=2, ep=2, overlap=True, chunks=4), counts)
    longer, shorter = max(plain.compute, plain.exchange), min(plain.compute, plain.exchange)
    assert over.total == pytest.approx(longer + shorter / 4)
    assert over.total < plain.total
    # A CPU's gloo transfers use the cores that compute: overlapping hides nothing there.
    cpu = dataclasses.replace(HW, overlaps=False)
    assert estimate(SHAPE, cpu, Layout(world=2, ep=2, overlap=True), counts).total == estimate(
        SHAPE, cpu, Layout(world=2, ep=2), counts).total


def test_groups_that_span_nodes_pay_the_inter_node_bandwidth():
    hw = Hardware("2 per node", 1e9, intra_bandwidth=1e6, inter_bandwidth=1e5, latency=0.0, devices_per_node=2, memory=1e9)
    counts = [[0, 0, 0, 8]] + [[0, 0, 0, 0]] * 3  # rank 0 sends 8 rows to expert 3, on rank 3 (another node)
    est = estimate(SHAPE, hw, Layout(world=4, ep=4), counts)
    assert est.exchange == pytest.approx(4 * 8 * ROW / 1e5)
    near = [[0, 8, 0, 0]] + [[0, 0, 0, 0]] * 3  # expert 1 is on rank 1, the same node
    assert estimate(SHAPE, hw, Layout(world=4, ep=4), near).exchange == pytest.approx(4 * 8 * ROW / 1e6)


def test_greedy_policy_shadows_hot_experts_and_leaves_balanced_routing_alone():
    big = ExpertShape(d_model=64, hidden=64, num_experts=4)
    slow_net = Hardware("slow", flops=1e8, intra_bandwidth=1e9, inter_bandwidth=1e9, latency=0.0, devices_per_node=8,
                        memory=1e9)
    skewed = [[500, 10, 10, 10], [500, 10, 10, 10]]
    assert greedy_shadow(big, slow_net, Layout(world=2, ep=2), skewed) == (0,)
    balanced = [[10, 10, 10, 10], [10, 10, 10, 10]]
    assert greedy_shadow(big, slow_net, Layout(world=2, ep=2), balanced) == ()
    assert top_shadow(skewed, 2) == (0, 1)  # ties go to the lower id
    assert greedy_shadow(big, slow_net, Layout(world=2, ep=1), skewed) == ()


@pytest.mark.parametrize("layout,message", [
    (Layout(world=3, ep=2), "EP=2 does not divide 3 processes"),
    (Layout(world=6, ep=3), "EP=3 does not divide 4 experts"),
    (Layout(world=2, ep=1, shadow=(0,)), "shadowing needs EP > 1"),
])
def test_impossible_layouts_are_named(layout, message):
    assert layout.check(4) == message
    with pytest.raises(ValueError, match=message):
        estimate(SHAPE, HW, layout, [[0] * 4] * layout.world)
