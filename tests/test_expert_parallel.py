"""Expert parallelism on CPU with gloo processes.

What must hold: a layer whose experts are sharded over 2 processes computes, for each process's
tokens, the outputs and gradients of the whole layer, with and without shadowed experts
(FasterMoE); `moectl train` with train.expert_parallel gives the weights and losses of one
process on the same global batch (EP=2 on 2 processes, EP=2 x DP=2 on 4, dropless and with a
capacity factor, with and without shadowing and the overlapped exchange); checkpoints are in the one-process layout, so
a run moves between expert-parallel sizes on resume; impossible layouts are refused before any
process starts.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from conftest import scalar_series, tiny_config, weights, write_config
from moectl import config
from moectl.services import checkpoint, expert_parallel
from moectl.common.errors import ConfigError
from moectl.moe import MoELayer
from moectl.moe.router import ExpertChoiceRouter, SoftRouter
from moectl.common.runtime import Dist
from moectl.cli import app
from moectl.commands.train import fit
from test_distributed import EXACT, assert_close_weights, moectl

runner = CliRunner()

# ----------------------------------------------------------------------------- the sharded layer

D, E, H = 16, 4, 8
TOKENS = (13, 6)  # rank 0 and rank 1 route different numbers of tokens


def _layers() -> dict[str, MoELayer]:
    torch.manual_seed(0)
    return {
        "topk": MoELayer(D, E, 2, H),
        "capacity 1.0": MoELayer(D, E, 2, H, capacity_factor=1.0),
        "shared expert, gelu": MoELayer(D, E, 1, H, activation="gelu", renormalize=False, shared_hidden=H),
        "expert choice": MoELayer(D, E, 2, H, router=ExpertChoiceRouter(D, E, 2, 1.0)),
        "soft (every expert)": MoELayer(D, E, E, H, router=SoftRouter(D, E)),
    }


def _sharded_layer_worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # No shadows; the hottest expert; every expert, shadowed on every rank; each with and
        # without the overlapped exchange.
        for shadow, overlap in (("off", False), (1, False), (E, False), ("off", True), (1, True)):
            for name, full in _layers().items():
                _check_sharded_layer(name, full, rank, world, shadow, overlap)
        dist.barrier()  # leave together (gloo aborts a rank whose peer left first)
    finally:
        dist.destroy_process_group()


def _check_sharded_layer(name: str, full: MoELayer, rank: int, world: int, shadow, overlap: bool) -> None:
    name = f"{name}, shadow {shadow}, overlap {overlap}"
    sharded = copy.deepcopy(full)
    ep = expert_parallel.shard(sharded, world, Dist(rank=rank, world_size=world), shadow, overlap=overlap)
    assert sharded.experts.w_up.shape[0] == E // world, name
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, D, generator=gen) for n in TOKENS]  # (n_r, D): every rank's tokens
    cs = [torch.randn(n, D, generator=gen) for n in TOKENS]  # a fixed linear loss per rank
    # Reference: the whole layer, every rank's tokens through it, the losses summed.
    x_ref = [x.clone().requires_grad_() for x in xs]
    ys = [full(x)[0] for x in x_ref]
    sum((y * c).sum() for y, c in zip(ys, cs)).backward()
    # Sharded: this rank's tokens only; the exchange brings each expert its tokens from both ranks.
    x = xs[rank].clone().requires_grad_()
    y, record = sharded(x)
    (y * cs[rank]).sum().backward()
    shadowed = [e for e, _ in sharded.experts._shadowed]
    assert len(set(shadowed)) == (0 if shadow == "off" else shadow), name
    sharded.experts.reduce_shadow_gradients()  # the copies' gradients back to their owners
    torch.testing.assert_close(y, ys[rank], msg=name)
    torch.testing.assert_close(x.grad, x_ref[rank].grad, msg=name)
    mine = slice(rank * E // world, (rank + 1) * E // world)
    for w in ("w_up", "w_gate", "w_down"):
        if getattr(full.experts, w) is not None:
            torch.testing.assert_close(getattr(sharded.experts, w).grad, getattr(full.experts, w).grad[mine], msg=f"{name} {w}")
    if name == "capacity 1.0":
        assert any(int(full(x)[1].num_dropped) > 0 for x in xs), "the capacity case must drop tokens"
    # The full layout round trip: gathered experts equal the unsharded layer's, and a shard survives.
    before = sharded.experts.w_down.detach().clone()
    with ep.full_experts(gather=True):
        torch.testing.assert_close(sharded.experts.w_down, full.experts.w_down.detach(), msg=name)
    assert torch.equal(sharded.experts.w_down, before)


def test_a_sharded_layer_computes_the_whole_layer_on_two_processes(tmp_path):
    mp.spawn(_sharded_layer_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_arrivals_are_regrouped_by_expert_then_source_rank():
    # 2 source ranks, 3 local experts: rank 0 sends 1, 0, 2 rows; rank 1 sends 2, 1, 0.
    received = torch.tensor([[1, 0, 2], [2, 1, 0]])
    order = expert_parallel._by_expert(received, 6)
    # Rows arrive as r0e0 | r0e2 r0e2 | r1e0 r1e0 | r1e1 -> e0: r0, r1, r1; e1: r1; e2: r0, r0.
    assert order.tolist() == [0, 3, 4, 5, 1, 2]


def test_shadow_policies_pick_the_hottest_experts():
    from moectl.moe.experts import GroupedExperts
    from moectl.common.perf_model import Hardware

    experts = GroupedExperts(4, 64, 64, "swiglu")
    skewed = torch.tensor([[500, 10, 10, 10], [500, 10, 20, 10]])  # (N, E) rows per rank and expert
    assert expert_parallel.shadow_policy(experts, 2, "off", None) is None
    assert expert_parallel.shadow_policy(experts, 2, 2, None)(skewed) == (0, 2)
    slow_net = Hardware("slow", flops=1e8, intra_bandwidth=1e9, inter_bandwidth=1e9, latency=0.0,
                        devices_per_node=8, memory=1e9)
    auto = expert_parallel.shadow_policy(experts, 2, "auto", slow_net)
    assert auto(skewed)[:1] == (0,)  # FasterMoE's greedy policy: the hot expert first
    assert auto(torch.tensor([[500, 0, 0, 0], [500, 0, 0, 0]])) == (0,)  # and only what pays
    assert auto(torch.full((2, 4), 10)) == ()


# ------------------------------------------------------------------------------- moectl train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One config trained by 1 process, by 2 with EP=2, by 2 with EP=2 and FasterMoE's shadowing
    (the hottest expert) and overlapped exchange, and by 4 with EP=2 x DP=2 and both; and with a
    capacity factor, by 1 process and by 2 with EP=2."""
    tmp = tmp_path_factory.mktemp("ep")
    cfg_file = write_config(tmp / "tiny.yaml", tiny_config(tmp, **EXACT))
    cf_file = write_config(tmp / "cf.yaml", tiny_config(tmp, **{**EXACT, "moe": {**EXACT["moe"], "capacity_factor": 1.0}}))
    out = {"cfg": cfg_file, "cf": cf_file, "single": fit(config.load(cfg_file, ["run.name=single"])).run_dir,
           "cf_single": fit(config.load(cf_file, ["run.name=cf_single"])).run_dir}
    fastermoe = ["train.ep_overlap=true", "train.shadow_experts=1"]
    # EP x DP runs once, with FasterMoE's options on: 4 processes on the 2 CI cores are the costliest job here.
    layouts = (("ep2", cfg_file, "2", []), ("cf_ep2", cf_file, "2", []),
               ("ep2_fastermoe", cfg_file, "2", fastermoe), ("ep2dp2_fastermoe", cfg_file, "4", fastermoe))
    for name, file, nproc, extra in layouts:
        sets = [a for kv in ["train.expert_parallel=2", *extra] for a in ("--set", kv)]
        proc = moectl("train", str(file), "--nproc-per-node", nproc, "--run-name", name, *sets)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[name] = tmp / "runs" / name
        out[f"{name}_log"] = proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("single,sharded", [("single", "ep2"), ("cf_single", "cf_ep2"),
                                            ("single", "ep2_fastermoe"), ("single", "ep2dp2_fastermoe")])
def test_expert_parallel_training_equals_one_process(runs, single, sharded):
    for step in (2, 4, 6):
        assert_close_weights(checkpoint.step_dir(runs[single], step), checkpoint.step_dir(runs[sharded], step))
    for tag in ("train/loss", "eval/loss"):
        one, many = scalar_series(runs[single], tag), scalar_series(runs[sharded], tag)
        assert [s for s, _ in one] == [s for s, _ in many]
        assert [v for _, v in many] == pytest.approx([v for _, v in one], rel=1e-5), tag
    assert "experts sharded over groups of 2 (2 per process per layer)" in " ".join(runs[f"{sharded}_log"].split())
    meta = checkpoint.read_meta(checkpoint.latest(runs[sharded]))
    assert meta["expert_parallel"] == 2


def test_the_capacity_runs_drop_tokens(runs):
    drops = [v for _, v in scalar_series(runs["cf_single"], "routing/layer00/drop_fraction")]
    assert drops and max(drops) > 0
    assert [v for _, v in scalar_series(runs["cf_ep2"], "routing/layer00/drop_fraction")] == pytest.approx(drops)


def test_checkpoints_hold_every_expert_and_evaluate_as_one_process_would(runs):
    full, sharded = weights(checkpoint.latest(runs["single"])), weights(checkpoint.latest(runs["ep2"]))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in sharded.items()}
    assert sharded["blocks.0.ffn.inner.experts.w_up"].shape[0] == 4
    saved = checkpoint.load_state(checkpoint.latest(runs["ep2"]))["optimizer"]["state"]
    assert {tuple(s["exp_avg"].shape) for s in saved.values()} >= {(4, 32, 32)}  # the optimizer state is whole too
    # `moectl eval` in this process (a single process, as a subprocess would be): no start-up to pay.
    res = runner.invoke(app, ["eval", str(runs["ep2"]), "--json"])
    assert res.exit_code == 0, res.output
    res_single = runner.invoke(app, ["eval", str(runs["single"]), "--json"])
    assert res_single.exit_code == 0, res_single.output
    assert json.loads(res.stdout)["loss"] == pytest.approx(json.loads(res_single.stdout)["loss"], rel=1e-5)


def _stopped_after_step_2(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    for step in (4, 6):
        shutil.rmtree(checkpoint.step_dir(dest, step))
    return dest


@pytest.mark.parametrize("source,nproc,ep", [("ep2", None, "1"), ("single", "2", "2")])
def test_a_run_moves_between_expert_parallel_sizes_on_resume(runs, tmp_path, source, nproc, ep):
    run_dir = _stopped_after_step_2(runs[source], tmp_path / "runs" / source)
    if nproc is None:
        fit(config.load(run_dir / "config.yaml", [f"train.expert_parallel={ep}", f"run.dir={run_dir.parent}"],
                        saved=True), resume=True)
    else:
        proc = moectl("train", str(run_dir), "--resume", "--nproc-per-node", nproc, "--set", f"train.expert_parallel={ep}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in (4, 6):
        assert_close_weights(checkpoint.step_dir(runs["single"], step), checkpoint.step_dir(run_dir, step))


# --------------------------------------------------------------------------------- bad layouts


def test_config_refuses_a_size_that_does_not_divide_the_experts_a_dense_model_or_shadows_without_ep(tmp_path):
    cfg_file = write_config(tmp_path / "t.yaml", tiny_config(tmp_path))
    with pytest.raises(ConfigError, match=r"train.expert_parallel=3 must divide moe.num_experts=4"):
        config.load(cfg_file, ["train.expert_parallel=3"])
    with pytest.raises(ConfigError, match=r"train.expert_parallel=2 shards experts, but model.arch=transformer_dense"):
        config.load(cfg_file, ["train.expert_parallel=2", "model.arch=transformer_dense"])
    with pytest.raises(ConfigError, match=r"train.ep_overlap=true overlaps the expert-parallel exchange"):
        config.load(cfg_file, ["train.ep_overlap=true"])
    with pytest.raises(ConfigError, match=r"train.shadow_experts=1 shadows experts of expert-parallel groups"):
        config.load(cfg_file, ["train.shadow_experts=1"])
    with pytest.raises(ConfigError, match=r"train.shadow_experts=5 must be in \[1, moe.num_experts=4\]"):
        config.load(cfg_file, ["train.expert_parallel=2", "train.shadow_experts=5"])
    assert config.load(cfg_file, ["train.expert_parallel=2", "train.shadow_experts=off"]).train.shadow_experts == "off"


def test_a_size_that_does_not_fit_the_processes_is_refused_before_any_starts(tmp_path):
    cfg = config.load(write_config(tmp_path / "t.yaml", tiny_config(tmp_path)), ["train.expert_parallel=2"])
    with pytest.raises(ConfigError, match=r"this is a single process"):
        fit(cfg)
    with pytest.raises(ConfigError, match=r"must divide the 3 processes"):
        expert_parallel.check_layout(cfg.train.expert_parallel, 3)
    expert_parallel.check_layout(cfg.train.expert_parallel, 4)
    assert not (tmp_path / "runs").exists()
    proc = moectl("train", str(tmp_path / "t.yaml"), "--nproc-per-node", "3", "--set", "train.expert_parallel=2")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.expert_parallel=2 must divide the 3 processes" in lines[0], proc.stderr
    assert "rank 0:" not in proc.stderr and "2 processes" not in proc.stderr  # no process was started
