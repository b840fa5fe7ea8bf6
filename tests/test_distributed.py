"""Data-parallel training on CPU: 2 gloo processes started by `moectl train --nproc-per-node 2`.

What must hold: the same global batch gives the same model with 1 or 2 processes, the logged
routing histograms cover the whole batch, a stopped 2-process run resumes exactly, and failures
end the job promptly with one clear message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import events, interrupt_after_first_checkpoint, scalar_series, tiny_config, weights, write_config
from moectl import config
from moectl.services import checkpoint, distributed
from moectl.common.errors import ConfigError
from moectl.moe import load_balancing_loss
from moectl.data import eval_chunks
from moectl.services.distributed import batch_layout
from moectl.commands.train import fit

# Without router losses and dropout, 1 and 2 processes compute the same gradients.
# Micro-batches of 1: the single process accumulates 4, each of the two processes 2.
EXACT = dict(
    model={"dropout": 0.0},
    moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
    train={"max_steps": 6, "batch_size": 4, "micro_batch_size": 1, "eval_every": 3},
    checkpoint={"every": 2, "keep_last": 5},
)


def moectl(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "moectl", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_close_weights(a: Path, b: Path, **tol) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], **(tol or dict(rtol=1e-4, atol=1e-6)), msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One config trained by 1 process in-process and by 2 gloo processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg_file = write_config(tmp / "tiny.yaml", tiny_config(tmp, **EXACT))
    single = fit(config.load(cfg_file, ["run.name=single"]))
    started = time.perf_counter()
    proc = moectl("train", str(cfg_file), "--nproc-per-node", "2", "--run-name", "double")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"cfg": cfg_file, "single": single.run_dir, "double": tmp / "runs" / "double", "proc": proc,
            "seconds": time.perf_counter() - started}


def test_two_processes_match_one_with_the_same_global_batch(runs):
    single, double = runs["single"], runs["double"]
    for step in (2, 4, 6):
        assert_close_weights(checkpoint.step_dir(single, step), checkpoint.step_dir(double, step))
    meta = checkpoint.read_meta(checkpoint.latest(double))
    assert meta["world_size"] == 2 and meta["tokens_seen"] == 6 * 4 * 32
    # Logged losses are over the whole batch on both.
    for tag in ("train/loss", "eval/loss"):
        one, two = scalar_series(single, tag), scalar_series(double, tag)
        assert [s for s, _ in one] == [s for s, _ in two]
        assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5), tag


def test_two_processes_log_the_same_routing_histograms_as_one(runs):
    one, two = events(runs["single"]), events(runs["double"])
    for tag in ("routing/layer00/experts", "routing/layer01/experts"):
        h1, h2 = one.Histograms(tag), two.Histograms(tag)
        assert [h.step for h in h1] == [h.step for h in h2] == [2, 4, 6]
        for a, b in zip(h1, h2):
            # Global counts: every token of the window, not rank 0's half.
            assert sum(b.histogram_value.bucket) == 2 * 4 * 32 * 2
            assert list(a.histogram_value.bucket) == list(b.histogram_value.bucket), tag
    for tag in ("routing/layer00/router_entropy", "routing/layer01/cv"):
        assert [v for _, v in scalar_series(runs["double"], tag)] == pytest.approx(
            [v for _, v in scalar_series(runs["single"], tag)], rel=1e-5
        )


def test_only_rank_zero_writes_and_prints(runs):
    proc, double = runs["proc"], runs["double"]
    assert proc.stdout.count("moectl train: done") == 1
    assert proc.stderr.count("loading data") == 1
    assert "2 processes" in proc.stderr
    assert len(list(double.glob("events.out.tfevents.*"))) == 1
    assert not list(checkpoint.checkpoints_dir(double).glob(".tmp-*"))


def test_a_stopped_two_process_run_resumes_exactly(runs, tmp_path):
    run_dir = tmp_path / "runs" / "double"
    shutil.copytree(runs["double"], run_dir)
    for step in (4, 6):  # as if it had stopped after step 2
        shutil.rmtree(checkpoint.step_dir(run_dir, step))
    proc = moectl("train", str(run_dir), "--resume", "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming" in proc.stderr
    for step in (4, 6):
        assert_close_weights(checkpoint.step_dir(runs["double"], step), checkpoint.step_dir(run_dir, step), rtol=0, atol=0)
    assert scalar_series(run_dir, "train/loss") == scalar_series(runs["double"], "train/loss")
    # The rank-0 window sums saved at step 2 are carried on without double counting.
    assert [sum(h.histogram_value.bucket) for h in events(run_dir).Histograms("routing/layer00/experts")] == [512] * 3


def test_global_aux_loss_matches_one_process(tmp_path):
    # With the Switch loss on, `global` gives 2 processes the gradients of 1 process that sees
    # the whole batch in one forward (global is over processes, not accumulation steps).
    raw = tiny_config(tmp_path, **{**EXACT, "moe": {"aux_loss_coef": 0.5, "z_loss_coef": 0.0, "aux_loss_scope": "global"},
                                   "train": {**EXACT["train"], "micro_batch_size": None, "max_steps": 3,
                                             "eval_every": 100},
                                   "checkpoint": {"every": 100}})
    cfg_file = write_config(tmp_path / "aux.yaml", raw)
    single = fit(config.load(cfg_file, ["run.name=single"]))
    proc = moectl("train", str(cfg_file), "--nproc-per-node", "2", "--run-name", "double")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # atol 1e-5: AdamW divides each gradient by its own running scale, so an element whose gradient
    # is near 0 turns fp32 rounding of the summed Switch-loss terms into update differences of ~1e-6.
    assert_close_weights(single.checkpoint, checkpoint.latest(tmp_path / "runs" / "double"), rtol=1e-4, atol=1e-5)
    aux1 = scalar_series(single.run_dir, "train/router/load_balance")
    aux2 = scalar_series(tmp_path / "runs" / "double", "train/router/load_balance")
    # The logged value is the mean of the ranks' losses: the same f_i, each rank's own P_i.
    assert [v for _, v in aux2] == pytest.approx([v for _, v in aux1], rel=1e-5)


def test_sigmoid_bias_follows_global_counts_on_every_rank(tmp_path):
    # Rank 0's saved bias equals the single process's only if it was updated from the counts of
    # the whole batch; the weights match only if rank 1 routed with that same bias.
    # An odd number of +-rate bias steps cannot sum to 0, so the saved bias is never trivially 0.
    raw = tiny_config(tmp_path, **{**EXACT, "moe": {**EXACT["moe"], "router": "sigmoid", "bias_update_rate": 0.05},
                                   "train": {**EXACT["train"], "max_steps": 3, "eval_every": 100},
                                   "checkpoint": {"every": 100}})
    cfg_file = write_config(tmp_path / "sigmoid.yaml", raw)
    single = fit(config.load(cfg_file, ["run.name=single"]))
    proc = moectl("train", str(cfg_file), "--nproc-per-node", "2", "--run-name", "double")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    double = checkpoint.latest(tmp_path / "runs" / "double")
    w1, w2 = weights(single.checkpoint), weights(double)
    biases = [k for k in w1 if k.endswith("expert_bias")]
    assert biases and any(bool(w1[k].abs().sum() > 0) for k in biases)
    for key in biases:
        assert torch.equal(w1[key], w2[key]), key
    assert_close_weights(single.checkpoint, double)


def test_global_switch_loss_gradient_equals_the_whole_batch_gradient():
    # The maths behind `global`: two shards whose counts are summed, gradients averaged (as DDP
    # does), give the gradient of the loss over both shards together; `local` does not.
    torch.manual_seed(0)
    logits = torch.randn(64, 8, requires_grad=True)
    idx = logits.detach().topk(2, dim=-1).indices

    def grad(fn) -> torch.Tensor:
        logits.grad = None
        fn().backward()
        return logits.grad.clone()

    whole = grad(lambda: load_balancing_loss(logits.softmax(-1), idx))
    halves = (slice(0, 32), slice(32, 64))

    def counts(s):
        c = torch.zeros(9)
        c.scatter_add_(0, idx[s].reshape(-1), torch.ones(idx[s].numel()))
        c[8] = idx[s].numel()
        return c

    for scope in ("global", "local"):
        total = torch.zeros_like(logits)
        for mine, other in (halves, halves[::-1]):
            reduce = (lambda c, other=other: c + counts(other)) if scope == "global" else None
            total += grad(lambda: load_balancing_loss(logits[mine].softmax(-1), idx[mine], None, reduce)) / 2
        if scope == "global":
            torch.testing.assert_close(total, whole)
        else:
            assert not torch.allclose(total, whole, atol=1e-6)


def run_with_rank1_fault(tmp_path: Path, fault: str, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """Train 2 processes where a sitecustomize makes rank 1 run `fault` at its third step."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import time\n"
        "    import moectl.training as t  # the loop reads lr_at from the package at each step\n"
        "    _lr_at = t.lr_at\n"
        "    def lr_at(step, *args):\n"
        "        if step == 2:\n"
        f"            {fault}\n"
        "        return _lr_at(step, *args)\n"
        "    t.lr_at = lr_at\n"
    )
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, train={"max_steps": 50}))
    started = time.perf_counter()
    pythonpath = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    args = ("train", str(cfg_file), "--nproc-per-node", "2", *(a for o in overrides for a in ("--set", o)))
    proc = moectl(*args, env_extra={"PYTHONPATH": pythonpath}, timeout=240)
    return proc, time.perf_counter() - started


def test_a_failing_rank_ends_the_job_promptly_with_its_error(tmp_path):
    proc, elapsed = run_with_rank1_fault(tmp_path, "raise RuntimeError('injected failure')")
    assert proc.returncode != 0
    assert "error: rank 1: unexpected RuntimeError: injected failure" in proc.stderr, proc.stderr
    assert "rank 1 exited with code 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120
    assert not checkpoint.list_checkpoints(tmp_path / "runs" / "tiny")  # it failed before the first save


def test_a_hung_rank_ends_the_job_after_the_process_group_timeout(tmp_path):
    # 3 s: waits before training (rank 1 waiting while rank 0 prepares uncached data) stay under
    # 1 s here; the steps logged before the hang show that the timeout fired in training.
    proc, elapsed = run_with_rank1_fault(tmp_path, "time.sleep(3600)", "train.dist_timeout=3")
    assert proc.returncode != 0
    assert "error: rank 0: lost contact with the other processes" in proc.stderr, proc.stderr
    assert "train.dist_timeout=3 s" in proc.stderr and "step 2/50" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120


def test_a_config_error_in_every_rank_prints_once(tmp_path):
    # batch_size 5 cannot be split over 2 processes: every rank finds out, rank 0 alone says so.
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, train={"batch_size": 5}))
    proc = moectl("train", str(cfg_file), "--nproc-per-node", "2")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 2, proc.stderr  # the config error, then the launcher's line naming the rank
    assert "train.batch_size=5 is the global batch and must be divisible by the 2 processes" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_bad_config_fails_before_any_process_starts(tmp_path):
    cfg_file = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, moe={"top_k": 9}))
    proc = moectl("train", str(cfg_file), "--nproc-per-node", "2")
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "moe.top_k" in proc.stderr


def test_batch_layout_splits_the_global_batch():
    cfg = config.from_dict({"train": {"batch_size": 32, "micro_batch_size": 4}})
    assert batch_layout(cfg.train, 1) == (4, 8)
    assert batch_layout(cfg.train, 2) == (4, 4)
    assert batch_layout(cfg.train, 8) == (4, 1)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        batch_layout(cfg.train, 3)
    with pytest.raises(ConfigError, match="micro_batch_size=4"):
        batch_layout(config.from_dict({"train": {"batch_size": 8, "micro_batch_size": 4}}).train, 4)
    assert batch_layout(config.from_dict({"train": {"batch_size": 8}}).train, 2) == (4, 1)


def test_eval_chunks_cover_the_same_sequences_for_any_size():
    batches = [np.arange(0, 8), np.arange(8, 16), np.arange(16, 20)]
    for size in (1, 3, 4, 8):
        chunks = eval_chunks(batches, size)
        assert np.array_equal(np.concatenate(chunks), np.arange(20))
        assert all(len(c) == size for c in chunks[:-1])
    assert eval_chunks([], 4) == []


def test_single_process_helpers_are_no_ops():
    d = distributed.Dist()
    t = torch.ones(3)
    distributed.all_reduce_sum_([t], d)
    assert torch.equal(t, torch.ones(3))
    assert distributed.gather_objects("x", d) == ["x"]
    assert distributed.from_main(lambda: 7, d) == 7
    assert distributed.main_first(lambda: 8, d) == 8


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    # A one-process gloo group is enough to count DDP's all-reduces through a comm hook.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 4))
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, hook)
        for accum in (1, 3):
            calls.clear()
            for j in range(accum):
                with distributed.gradient_sync(model, last_micro_step=j == accum - 1):
                    model(torch.randn(2, 4)).sum().backward()
            assert calls == [0], accum  # one bucket, reduced once, whatever the accumulation
        dist.barrier()  # leave together (gloo aborts a rank whose peer left first)
    finally:
        dist.destroy_process_group()


def test_ctrl_c_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    # Ctrl-C reaches torchrun's launcher, which passes it to the ranks; they agree on the step.
    raw = tiny_config(tmp_path, train={"max_steps": 2000, "eval_every": 10000}, checkpoint={"every": 5, "keep_last": 2})
    cfg_file = write_config(tmp_path / "tiny.yaml", raw)
    run_dir = tmp_path / "runs" / "tiny"
    code, output, stopped_at = interrupt_after_first_checkpoint(["train", str(cfg_file), "--nproc-per-node", "2"], run_dir)
    assert code == 130, output
    assert output.count("stopped at step") == 1 and "error" not in output, output
    assert 5 <= stopped_at < 2000
    assert "--resume --nproc-per-node 2" in output


def test_a_two_process_run_resumes_in_one_process(runs, tmp_path, capsys):
    # The data position is global, so any number of processes can continue; the per-rank random
    # streams cannot carry over, and moectl says so.
    run_dir = tmp_path / "runs" / "double"
    shutil.copytree(runs["double"], run_dir)
    for step in (4, 6):
        shutil.rmtree(checkpoint.step_dir(run_dir, step))
    cfg = config.load(run_dir / "config.yaml", [f"run.dir={tmp_path / 'runs'}"])
    result = fit(cfg, resume=True)
    assert result.step == 6 and result.world_size == 1
    assert "saved by 2 processes and this run has 1" in capsys.readouterr().err
    # Without dropout or routing noise, the weights still match the uninterrupted 2-process run.
    assert_close_weights(checkpoint.step_dir(runs["double"], 6), checkpoint.step_dir(run_dir, 6))
