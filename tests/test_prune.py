"""Expert pruning and dynamic skipping: the pruned router and experts are the kept rows of the
originals, each criterion scores as its paper defines it, NAEE's search finds the subset whose
real pruned layer reconstructs best, and `moectl prune` writes a bundle every command reads."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, weights
from moectl import config
from moectl.cli import app
from moectl.commands.train import fit
from moectl.moe import MoELayer
from moectl.moe import prune as criteria
from moectl.moe.record import make_record, skip_weak
from moectl.moe.router import HierarchicalRouter, SigmoidRouter, make_router

runner = CliRunner()
D = 16


def layer(router: str = "topk", e: int = 6, k: int = 2, **kw) -> MoELayer:
    torch.manual_seed(0)
    r = make_router(router, D, e, k, **kw)
    for p in r.parameters():  # noisy and hierarchical gates start at zero: give them a routing to keep
        torch.nn.init.normal_(p, std=0.5)
    return MoELayer(D, e, k, 8, router=r).eval()


def test_best_per_group_orders_by_score_ties_to_the_lower_id_and_keeps_groups_even():
    assert criteria.best_per_group(torch.tensor([0.1, 0.3, 0.3, 0.2]), 2) == [1, 2]
    assert criteria.best_per_group(torch.tensor([0.5, 0.5, 0.5, 0.1]), 2) == [0, 1]
    assert criteria.best_per_group(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2, groups=2) == [1, 3]  # not [2, 3]
    assert criteria.keep_count(8, None, 0.25) == 6 and criteria.keep_count(8, 5, None) == 5
    with pytest.raises(ValueError, match="one of --keep"):
        criteria.keep_count(8, 4, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        criteria.keep_count(8, None, 1.0)


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "switch", "gshard_top2", "sigmoid", "soft", "expert_choice"])
def test_a_pruned_router_holds_the_kept_rows_and_a_k_that_fits(kind):
    full = layer(kind, e=6, k=1 if kind == "switch" else 2).router
    keep = [0, 2, 5]
    small = full.pruned(keep)
    assert small.num_experts == 3 and small.weight.shape == (3, D)
    assert small.weight.equal(full.weight[keep])
    if kind == "noisy_topk":
        assert small.noise_weight.equal(full.noise_weight[keep])
    assert small.top_k == {"soft": 3, "switch": 1}.get(kind, 2)
    x = torch.randn(10, D)
    assert small(x).expert_idx.max() < 3  # routes over the kept experts alone


def test_sigmoid_bias_and_hierarchical_groups_are_sliced_per_expert():
    sig = SigmoidRouter(D, 8, 2, n_group=2, topk_group=1)
    sig.expert_bias.copy_(torch.arange(8.0))
    small = sig.pruned([1, 3, 4, 6])
    assert small.expert_bias.tolist() == [1.0, 3.0, 4.0, 6.0] and small.n_group == 2 and small.top_k == 2
    with pytest.raises(ValueError, match="same number of experts in each of the 2 groups"):
        sig.pruned([0, 1, 2, 4])
    h = HierarchicalRouter(D, 8, num_groups=2, group_top_k=2, top_k=2)
    torch.nn.init.normal_(h.weight)
    small = h.pruned([0, 3, 5, 6])  # group 0 keeps its experts 0 and 3, group 1 its 1 and 2
    assert small.weight.shape == (2, 2, D) and small.per_group == 2
    assert small.weight[0].equal(h.weight[0, [0, 3]]) and small.weight[1].equal(h.weight[1, [1, 2]])
    assert small.primary.weight.equal(h.primary.weight)  # the gate over groups is unchanged
    with pytest.raises(ValueError, match="at least 2"):
        make_router("gshard_top2", D, 4, 2).pruned([1])


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "sigmoid"])
def test_pruning_experts_no_token_chooses_leaves_the_layer_output_unchanged(kind):
    # Feature 0 of every token is 1 and gates on it: +2 to the kept experts' logits, -20 to the others'.
    m = layer(kind, e=6, k=2)
    keep = [1, 2, 4]
    with torch.no_grad():
        m.router.weight[:, 0] = torch.tensor([-20.0 if e not in keep else 2.0 for e in range(6)])
    x = torch.randn(32, D) * 0.1
    x[:, 0] = 1.0
    pruned = copy.deepcopy(m)
    pruned.prune_experts(keep)
    y_full, rec = m(x)
    y_small, rec_small = pruned(x)
    assert set(rec.expert_idx.unique().tolist()) <= set(keep)
    torch.testing.assert_close(y_small, y_full, rtol=1e-5, atol=1e-6)
    assert torch.tensor(keep)[rec_small.expert_idx].equal(rec.expert_idx)  # the same choices, renumbered


def test_pruned_experts_compute_what_the_kept_originals_did():
    m = layer()
    pruned = m.experts.pruned([3, 5])
    x = torch.randn(7, D)
    assert pruned.num_experts == 2 and pruned.w_up.shape[0] == 2
    torch.testing.assert_close(pruned.forward_expert(1, x), m.experts.forward_expert(5, x))


def test_frequency_and_reap_scores_equal_their_definitions_by_hand():
    m = layer("topk", e=4, k=2)
    x = torch.randn(20, D)
    _, rec = m(x)
    scores = criteria.LayerScores(4)
    scores.observe(m, x, rec)
    counts, reap = torch.zeros(4), torch.zeros(4)
    with torch.no_grad():
        for n, k in itertools.product(range(20), range(2)):
            e = int(rec.expert_idx[n, k])
            counts[e] += 1
            reap[e] += float(rec.weights[n, k]) * float(m.experts.forward_expert(e, x[n : n + 1]).norm())
    torch.testing.assert_close(scores.scores("frequency").float(), counts / 40)
    expected = torch.where(counts > 0, reap / counts.clamp_min(1), torch.zeros(4))  # REAP: mean over X_j, 0 when empty
    torch.testing.assert_close(scores.scores("reap").float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["topk", "sigmoid"])
def test_naee_picks_the_subset_whose_real_pruned_layer_reconstructs_best(kind):
    m = layer(kind, e=5, k=2)
    batches = [torch.randn(24, D), torch.randn(16, D)]
    search = criteria.SubsetSearch(m, 3)
    for x in batches:
        search.observe(m, x)
    assert len(search.candidates) == 10  # C(5, 3)
    errors = {}
    for subset in itertools.combinations(range(5), 3):
        pruned = copy.deepcopy(m)
        pruned.prune_experts(list(subset))
        errors[subset] = sum(float(torch.linalg.norm(m(x)[0] - pruned(x)[0]).detach()) for x in batches)  # Frobenius per batch
    best, error = search.best()
    assert tuple(best) == min(errors, key=errors.get)
    assert error == pytest.approx(errors[tuple(best)], rel=1e-4)
    assert search.loss.tolist() == pytest.approx([errors[tuple(c)] for c in search.candidates], rel=1e-4)


@pytest.mark.parametrize("renormalize", [True, False])
def test_naee_batched_softmax_path_equals_each_pruned_router(renormalize):
    m = layer("topk", e=6, k=2, renormalize=renormalize)
    batched = criteria.SubsetSearch(m, 3)
    assert batched.batched
    generic = criteria.SubsetSearch(m, 3)
    generic.batched, generic.routers = False, [m.router.pruned(c) for c in generic.candidates]
    for x in (torch.randn(40, D), torch.randn(25, D)):
        batched.observe(m, x)
        generic.observe(m, x)
    torch.testing.assert_close(batched.loss, generic.loss, rtol=1e-5, atol=1e-6)
    assert batched.best()[0] == generic.best()[0]


def test_naee_refuses_a_search_past_its_limit_and_says_the_limit():
    assert criteria.naee_subsets(16, 8) == 12_870 and criteria.naee_subsets(8, 4, groups=2) == 36
    with pytest.raises(ValueError, match=r"601,080,390 subsets .* limit of 20,000"):
        criteria.SubsetSearch(layer("topk", e=32, k=2), 16)


def test_skip_weak_leaves_out_choices_below_beta_times_the_first_and_renormalises():
    probs = torch.full((3, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])  # the third token's first choice is its second slot
    rec = skip_weak(make_record(probs.log(), probs, idx, w), beta=0.5)
    assert rec.skipped.tolist() == [[False, True], [False, False], [True, False]]
    torch.testing.assert_close(rec.weights, torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.0, 1.0]]))
    assert rec.tokens_per_expert.tolist() == [2, 0, 1, 1]  # expert 1 lost both its choices
    assert not skip_weak(make_record(probs.log(), probs, idx, w), beta=0.0).skipped.any()


def test_a_layer_skips_in_eval_only_and_then_equals_its_top1_reference():
    m = layer("topk", e=4, k=2)
    x = torch.randn(30, D)
    m.skip_threshold = 1.0  # keep only each token's first choice
    y, rec = m(x)
    assert int(rec.skipped.sum()) == 30 and int(rec.kept.sum()) == 30
    first = rec.expert_idx[:, 0]
    ref = torch.stack([m.experts.forward_expert(int(e), x[n : n + 1])[0] for n, e in enumerate(first)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)  # weight 1 on the first choice
    m.train()
    assert m(x)[1].skipped is None


# ------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    cfg = tiny_config(tmp, moe={"num_experts": 6, "top_k": 2, "expert_hidden": 32, "routed_scaling": "top_k"},
                      train={"max_steps": 6, "eval_every": 6})
    return fit(config.from_dict(cfg))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("criterion", ["frequency", "reap", "naee", "random"])
def test_moectl_prune_writes_a_bundle_that_every_command_reads(run, tmp_path, criterion):
    out = tmp_path / "pruned"
    res = invoke("prune", run.run_dir, "--keep", 4, "--criterion", criterion, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    keep = report["kept_expert_ids"]
    assert len(keep) == 2 and all(len(ids) == 4 for ids in keep) and report["criterion"] == criterion
    scored = criterion in ("frequency", "reap")
    assert [len(s) for s in report["scores"]] == ([6, 6] if scored else [])
    assert len(report["naee_error"]) == (2 if criterion == "naee" else 0)
    if scored:  # the kept experts are the best scored ones
        assert all(min(s[e] for e in ids) >= max(s[e] for e in range(6) if e not in ids)
                   for s, ids in zip(report["scores"], keep))
    cfg = config.load(out / "config.yaml")
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2 and cfg.moe.routed_scaling == 2.0  # the trained scale
    full, small = weights(run.checkpoint), weights(out)
    for i, ids in enumerate(keep):
        prefix = f"blocks.{i}.ffn.inner."
        assert small[prefix + "experts.w_up"].equal(full[prefix + "experts.w_up"][ids])
        assert small[prefix + "router.weight"].equal(full[prefix + "router.weight"][ids])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["derived"][0]["kept_expert_ids"] == keep and meta["eval_loss"] == pytest.approx(report["eval_loss_after"])
    assert f"layer 0: {keep[0]}" in (out / "README.md").read_text()
    ev = json.loads(invoke("eval", out, "--json").stdout)
    assert ev["loss"] == pytest.approx(report["eval_loss_after"], abs=1e-6)
    assert ev["derived"] == [f"pruned to 4 of 6 experts per MoE layer by {criterion} (moectl prune)"]
    assert "derived: pruned to 4 of 6" in invoke("eval", out).stdout  # the header says so too
    assert all(len(layer["load"]) == 4 for layer in ev["layers"])
    assert invoke("route-stats", out, "--json").exit_code == 0
    assert invoke("generate", out, "--max-new-tokens", 5, "--seed", 1).exit_code == 0


def test_an_lstm_moe_prunes_and_evaluates(tmp_path):
    cfg = tiny_config(tmp_path, "lstm_moe", train={"max_steps": 2, "eval_every": 2})
    lstm = fit(config.from_dict(cfg))
    res = invoke("prune", lstm.run_dir, "--keep", 2, "--criterion", "reap", "--out", tmp_path / "p", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(invoke("eval", tmp_path / "p", "--json").stdout)
    assert ev["loss"] == pytest.approx(json.loads(res.stdout)["eval_loss_after"], abs=1e-6) and len(ev["layers"][0]["load"]) == 2


def test_a_pruned_bundle_exports_to_transformers_with_the_same_logits(run, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "pruned"
    assert invoke("prune", run.run_dir, "--ratio", 0.5, "--criterion", "frequency", "--out", out).exit_code == 0
    res = invoke("export", out, "--format", "hf", "--out", tmp_path / "hf")  # the export checks the logits itself
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 3


def test_eval_reports_the_expert_calls_skipping_saved(run):
    plain = json.loads(invoke("eval", run.run_dir, "--json").stdout)
    assert plain["skip_threshold"] is None and plain["expert_calls_saved"] is None
    top1 = json.loads(invoke("eval", run.run_dir, "--json", "--skip-threshold", 1.0).stdout)
    assert top1["expert_calls_saved"] == pytest.approx(0.5)  # top-2 down to the first choice
    assert all(layer["calls_saved"] == pytest.approx(0.5) for layer in top1["layers"])
    assert top1["loss"] != plain["loss"]
    off = json.loads(invoke("eval", run.run_dir, "--json", "--skip-threshold", 0.0).stdout)
    assert off["loss"] == plain["loss"]


def test_pruning_nothing_leaves_the_logits_identical(run, tmp_path):
    res = invoke("prune", run.run_dir, "--ratio", 0, "--out", tmp_path / "same", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept_expert_ids"] == [list(range(6))] * 2
    full, same = weights(run.checkpoint), weights(tmp_path / "same")
    assert full.keys() == same.keys() and all(full[k].equal(same[k]) for k in full)
    gen = ("--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3")
    assert invoke("generate", tmp_path / "same", *gen).stdout == invoke("generate", run.run_dir, *gen).stdout


@pytest.mark.parametrize("args, message", [
    (["--keep", 7], "keep at least 1 and at most all"),
    (["--keep", 1], "leaves fewer than moe.top_k=2 to route each token to (moe.router=topk); keep at least 2"),
    (["--keep", 3, "--ratio", 0.5], "give one of --keep N"),
    (["--ratio", 0.5, "--criterion", "best"], "--criterion 'best': choose frequency, reap, naee or random"),
])
def test_bad_prune_requests_get_one_line(run, tmp_path, args, message):
    res = invoke("prune", run.run_dir, "--out", tmp_path / "x", *args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_prune_refuses_a_non_empty_out_before_any_work(run, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    res = invoke("prune", run.run_dir, "--keep", 4, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "not empty" in res.output
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_a_bundle_of_another_format_gets_one_line(run, tmp_path):
    out = tmp_path / "b"
    assert invoke("prune", run.run_dir, "--ratio", 0, "--out", out).exit_code == 0
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": "moectl-safetensors-bundle-0"}))
    res = invoke("eval", out)
    assert res.exit_code == 2 and "written by another moectl version" in res.output and "Traceback" not in res.output
