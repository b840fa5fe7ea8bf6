"""Experts offloaded behind a cache: each policy evicts the expert its definition names, the
offloaded model computes bit-identical logits under every policy, with and without prefetch, and
route-stats replays a routing trace through the same cache without loading weights."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from moectl import config
from moectl.cli import app
from moectl.commands.train import fit
from moectl.moe.cache import ExpertCache, simulate
from moectl.services.loaded_model import load
from moectl.services.offload import Offload, OffloadedExperts, offloaded_layers

runner = CliRunner()


def passes(cache: ExpertCache, seq: list[list[int]]) -> list[bool]:
    hits = []
    for experts in seq:
        cache.begin_pass()
        hits += [cache.use(e) for e in experts]
    return hits


def test_lru_evicts_the_oldest_last_use():
    cache = ExpertCache(4, 2, "lru")
    assert passes(cache, [[0], [1], [0], [2]]) == [False, False, True, False]
    assert cache.resident == {0, 2}  # 1 was used longest ago
    assert passes(cache, [[1]]) == [False] and cache.resident == {1, 2}


def test_lfu_evicts_the_fewest_uses_and_lfru_forgets_old_habits():
    seq = [[0], [0], [0]] + [[3]] * 30 + [[1], [1], [2]]  # K=2: 0 used 3 times long ago, 1 twice just now
    lfu, lfru = ExpertCache(4, 2, "lfu"), ExpertCache(4, 2, "lfru")
    passes(lfu, seq)
    passes(lfru, seq)
    assert 0 not in lfu.resident and 3 in lfu.resident  # 3 was used 30 times: never evicted by lfu
    assert lfu.resident == {2, 3}
    lfu_then = ExpertCache(4, 2, "lfu")
    passes(lfu_then, [[0], [0], [0], [1], [1], [2]])
    lfru_then = ExpertCache(4, 2, "lfru")
    passes(lfru_then, [[0], [0], [0]] + [[]] * 40 + [[1], [1], [2]])
    assert lfu_then.resident == {0, 2}  # 1 (2 uses) goes before 0 (3 uses)
    assert lfru_then.resident == {1, 2}  # 0's uses are 40 passes old: worth 3 * 2^-5 < 2


def test_a_cache_of_all_experts_misses_each_expert_once_and_the_baselines_count():
    counts = simulate([[0, 1], [1, 2], [0, 2], [3, 1]], 4, 4, "lru")
    assert (counts.requests, counts.hits, counts.loads) == (8, 4, 4)
    assert counts.by_expert == [2, 3, 2, 1] and counts.static_hit_rate(2) == pytest.approx(5 / 8)


def test_prefetch_loads_ahead_and_recall_counts_the_needed_experts_it_predicted():
    cache = ExpertCache(6, 2, "lru")
    passes(cache, [[4, 5]])
    assert cache.prefetch([0, 1, 2]) == [0, 1]  # at most K
    assert passes(cache, [[1, 3]]) == [True, False]
    counts = cache.finish()
    assert counts.prefetched == 2 and (counts.needed, counts.predicted_needed) == (2, 1)
    assert counts.prefetch_recall == pytest.approx(0.5)


# ------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    made = {}
    for arch in ("transformer_moe", "lstm_moe"):
        cfg = tiny_config(tmp, arch, run={"name": arch}, moe={"num_experts": 6, "top_k": 2},
                          train={"max_steps": 4, "eval_every": 4})
        made[arch] = fit(config.from_dict(cfg)).run_dir
    return made


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
@pytest.mark.parametrize("offload", [Offload(2, "lru"), Offload(2, "lfu", True), Offload(3, "lfru", True), Offload(6)])
def test_offloaded_logits_are_bit_identical_under_every_policy(runs, arch, offload):
    resident, offloaded = load(runs[arch]), load(runs[arch], offload=offload)
    experts = offloaded_layers(offloaded.model)
    assert len(experts) == len(offloaded.slots) and all(isinstance(m, OffloadedExperts) for m in experts)
    assert not any("experts" in name for name, _ in offloaded.model.named_parameters())  # no expert weights made
    x = torch.randint(0, resident.tokenizer.get_vocab_size(), (3, 32))
    for _ in range(2):  # the second pass finds some experts resident
        with torch.no_grad():
            assert torch.equal(offloaded.model(x).logits, resident.model(x).logits)
    assert all(len(m.weights) <= offload.capacity for m in experts)
    counts = experts[-1].cache.finish()
    assert counts.requests > 0 and 0 <= counts.hit_rate <= 1
    if offload.prefetch and len(experts) > 1:  # the LSTM's one MoE layer has no layer before it to predict it
        assert counts.prefetched > 0 and counts.needed > 0


def test_a_pass_uses_its_resident_experts_before_reading_others(runs):
    offloaded = load(runs["transformer_moe"], offload=Offload(3, "lru"))
    x = torch.randint(0, offloaded.tokenizer.get_vocab_size(), (4, 32))
    with torch.no_grad():
        offloaded.model(x)
        offloaded.model(x)
    counts = offloaded_layers(offloaded.model)[0].cache.finish()
    assert counts.requests == 12  # 128 tokens, top-2 of 6: every expert in both passes
    assert counts.hits == 3  # in id order LRU would evict each expert just before its turn: no hit at all


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_eval_with_offloaded_experts_reports_the_cache_and_the_same_loss(runs):
    run = runs["transformer_moe"]
    plain = json.loads(invoke("eval", run, "--json").stdout)
    res = invoke("eval", run, "--json", "--offload-experts", "--expert-cache", 6)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["loss"] == plain["loss"]
    for layer, stats in zip(rep["offload"]["layers"], plain["layers"]):
        used = sum(1 for n in stats["load"] if n)  # K = E: each expert the passes use is read once
        assert layer["loads"] == used and layer["hit_rate"] == pytest.approx(1 - used / layer["requests"])
        assert layer["random_hit_rate"] == 1.0 and layer["bytes_read"] > 0
    assert rep["offload"]["peak_rss_bytes"] > 0
    assert "hit rate" in invoke("eval", run, "--offload-experts", "--expert-cache", 2, "--prefetch").stdout


def test_route_stats_replays_the_trace_through_a_cache(runs):
    run = runs["transformer_moe"]
    rep = json.loads(invoke("route-stats", run, "--json", "--cache-sim", 6).stdout)
    full = json.loads(invoke("route-stats", run, "--json", "--cache-sim", 2, "--policy", "lfu").stdout)
    for a, b, layer in zip(rep["cache_sim"]["layers"], full["cache_sim"]["layers"], rep["layers"]):
        assert a["requests"] == b["requests"] == sum(layer["stats"]["load"])  # one request per computed assignment
        assert a["loads_per_token"] <= 6 / layer["stats"]["tokens"] + 1e-12  # K = E: each expert read once at most
        assert b["hit_rate"] < a["hit_rate"] and b["random_hit_rate"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("args, message", [
    (["eval", "--offload-experts", "--expert-cache", 1], "--expert-cache 1: a layer needs room for a token's moe.top_k=2"),
    (["eval", "--prefetch"], "--expert-cache, --cache-policy and --prefetch need --offload-experts"),
    (["eval", "--offload-experts", "--cache-policy", "fifo"], "--cache-policy 'fifo': choose lru, lfu, lfru"),
    (["route-stats", "--policy", "lfu"], "--policy picks the cache policy of --cache-sim K"),
    (["route-stats", "--cache-sim", 9], "--cache-sim 9: choose 1 to the 6 experts"),
])
def test_bad_offload_requests_get_one_line(runs, args, message):
    res = invoke(args[0], runs["transformer_moe"], *args[1:])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_a_quantised_bundle_is_not_offloaded(runs, tmp_path):
    assert invoke("quantize", runs["transformer_moe"], "--out", tmp_path / "q").exit_code == 0
    res = invoke("eval", tmp_path / "q", "--offload-experts")
    assert res.exit_code == 2 and "is quantised; offload the unquantised run" in res.output
