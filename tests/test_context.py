"""How much context a token gets: stateful LSTM training and evaluation (truncated BPTT over
contiguous streams) and sliding-window evaluation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_config, weights, write_config
from moectl import config, data
from moectl.commands import evaluate
from moectl.common import errors
from moectl.services import checkpoint
from moectl.cli import app
from moectl.services.loaded_model import load
from moectl.models import build_model
from moectl.commands.train import fit

runner = CliRunner()
# Deterministic: no dropout, no routing noise, so runs that differ only in bookkeeping agree.
STATEFUL = dict(
    model={"dropout": 0.0},
    moe={"router": "topk"},
    train={"lstm_stateful": True, "max_steps": 6, "batch_size": 4, "micro_batch_size": 1, "eval_every": 3},
    checkpoint={"every": 2, "keep_last": 5},
)


def assert_same_weights(a, b, **tol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], **(tol or dict(rtol=0, atol=0)), msg=key)


# ----------------------------------------------------------------------------------- batching


def test_stream_sampler_deals_contiguous_streams_and_restarts_them_each_pass():
    sampler = data.StreamSampler(num_blocks=14, batch_size=4)  # 3 blocks per stream, 2 left over
    seen, fresh = [], []
    for _ in range(7):
        fresh.append(sampler.fresh)
        seen.append(sampler.next().tolist())
    assert seen[:3] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]  # row s continues row s
    assert seen[3:6] == seen[:3] and seen[6] == seen[0] and sampler.epoch == 2
    assert fresh == [True, False, False, True, False, False, True]
    again = data.StreamSampler(14, 4)
    again.load_state_dict(sampler.state_dict())
    assert not again.fresh and again.next().tolist() == sampler.next().tolist() == [1, 4, 7, 10]
    with pytest.raises(errors.DataError, match="batch_size=8 streams"):
        data.StreamSampler(7, 8)


def test_stream_batches_cover_consecutive_blocks():
    split = data.Split("validation", np.arange(10 * 8 + 1, dtype=np.int32), 1, 81, True, "k")
    blocks = data.Blocks(split, 8)
    batches = data.stream_batches(blocks, 3, None)
    assert [b.tolist() for b in batches] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert len(data.stream_batches(blocks, 3, 2)) == 2
    x1, _ = blocks.batch(batches[0])
    x2, _ = blocks.batch(batches[1])
    assert torch.equal(x2[:, 0], x1[:, -1] + 1)  # the next block starts where the last one ended


# ------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["lstm_moe", "lstm_dense"])
def test_carried_state_equals_one_long_sequence(tmp_path, arch):
    cfg = config.from_dict(tiny_config(tmp_path, arch=arch, model={"dropout": 0.0}, moe={"router": "topk"}))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50).eval()
    ids = torch.randint(0, 50, (3, 24))
    whole = model(ids).logits
    first = model(ids[:, :10])
    second = model(ids[:, 10:], state=first.state)
    assert first.state.shape == (2, 2, 3, 32)  # (LSTM layers, h and c, B, D)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5, atol=1e-5)
    fresh = model(ids[:, 10:]).logits
    assert (fresh - whole[:, 10:]).abs().max() > 1e-3  # without the state the second half differs


def test_stateful_is_refused_for_a_transformer(tmp_path):
    with pytest.raises(config.ConfigError, match="train.lstm_stateful=true needs an LSTM"):
        config.from_dict(tiny_config(tmp_path, train={"lstm_stateful": True}))


# ---------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def stateful_runs(tmp_path_factory):
    """A stateful LSTM-MoE trained by 1 process and by 2 gloo processes (micro-batches of 1)."""
    tmp = tmp_path_factory.mktemp("stateful")
    cfg_file = write_config(tmp / "lstm.yaml", tiny_config(tmp, arch="lstm_moe", **STATEFUL))
    single = fit(config.load(cfg_file, ["run.name=single"]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(cfg_file), "--nproc-per-node", "2",
                           "--run-name", "double"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"tmp": tmp, "cfg": cfg_file, "single": single, "double": tmp / "runs" / "double"}


def test_stateful_training_carries_state_and_two_processes_match_one(stateful_runs):
    single = stateful_runs["single"]
    state = torch.load(checkpoint.step_dir(single.run_dir, 2) / "state.pt", weights_only=True)
    assert state["lstm_state"].shape == (2, 2, 4, 32)  # every stream's carried state, in stream order
    for step in (2, 4, 6):
        assert_same_weights(checkpoint.step_dir(single.run_dir, step), checkpoint.step_dir(stateful_runs["double"], step),
                            rtol=1e-4, atol=1e-6)


def test_stateful_run_resumes_exactly_under_another_world_size(stateful_runs, tmp_path):
    # Stopped after step 2 of the 2-process run; continued by one process: the carried state of
    # all four streams comes back, so the weights match the straight 2-process run.
    run_dir = tmp_path / "runs" / "double"
    shutil.copytree(stateful_runs["double"], run_dir)
    for step in (4, 6):
        shutil.rmtree(checkpoint.step_dir(run_dir, step))
    cfg = config.load(run_dir / "config.yaml", [f"run.dir={tmp_path / 'runs'}"])
    fit(cfg, resume=True)
    assert_same_weights(checkpoint.step_dir(stateful_runs["double"], 6), checkpoint.step_dir(run_dir, 6),
                        rtol=1e-4, atol=1e-6)
    # Without the carried state the continuation differs: the check has teeth.
    lost = tmp_path / "runs" / "lost"
    shutil.copytree(stateful_runs["double"], lost)
    for step in (4, 6):
        shutil.rmtree(checkpoint.step_dir(lost, step))
    ckpt = checkpoint.step_dir(lost, 2)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["lstm_state"].zero_()
    torch.save(state, ckpt / "state.pt")
    lost_cfg = config.load(lost / "config.yaml", [f"run.dir={tmp_path / 'runs'}", "run.name=lost"])
    fit(lost_cfg, resume=True)
    a, b = weights(checkpoint.step_dir(run_dir, 6)), weights(checkpoint.step_dir(lost, 6))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6
    # A checkpoint without it cannot continue the streams exactly, and says so; the batch size,
    # which lays out the streams, may not change on resume.
    shutil.rmtree(checkpoint.step_dir(lost, 6))
    shutil.rmtree(checkpoint.step_dir(lost, 4))
    del state["lstm_state"]
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no carried LSTM state"):
        fit(lost_cfg, resume=True)
    with pytest.raises(config.ConfigError, match="train.batch_size"):
        fit(config.load(lost / "config.yaml", [f"run.dir={tmp_path / 'runs'}", "run.name=lost", "train.batch_size=8"]),
            resume=True)


def test_stateful_evaluation_carries_state_and_is_the_default_for_a_stateful_run(stateful_runs):
    run_dir = stateful_runs["single"].run_dir
    res = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    carried = json.loads(res.stdout)
    assert carried["context"] == "stateful"
    res = runner.invoke(app, ["eval", str(run_dir), "--json", "--stateless"])
    fresh = json.loads(res.stdout)
    assert fresh["context"] == "block" and fresh["loss"] != carried["loss"]
    # The training run's last evaluation is the stateful one.
    assert carried["loss"] == pytest.approx(stateful_runs["single"].eval_loss, rel=1e-5)
    # By hand: the streams' blocks in order, the state carried.
    loaded = load(run_dir)
    blocks, _, batches = evaluate.split_batches(loaded, "validation", None, stateful=True)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for ids in batches:
            x, y = blocks.batch(ids)
            out = loaded.model(x, state=state)
            state = out.state
            total += float(F.cross_entropy(out.logits.transpose(1, 2), y, reduction="sum"))
            count += y.numel()
    assert carried["loss"] == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------ sliding window


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sliding")
    return fit(config.from_dict(tiny_config(tmp, model={"dropout": 0.0}, train={"max_steps": 3, "eval_every": 3})))


@pytest.mark.parametrize("stride", [32, 13, 1])
def test_sliding_window_scores_each_token_once_with_its_window(transformer_run, stride):
    loaded = load(transformer_run.run_dir)
    blocks, _, batches = evaluate.split_batches(loaded, "validation", 1)
    length, tokens = blocks.seq_len, blocks.split.tokens
    got = evaluate.sliding_loss(loaded.model, blocks, batches, stride, loaded.device, None)
    # Reference, one target at a time: target p (offset a in its block) is scored in the window
    # of seq_len tokens that ends at the end of a's chunk of `stride`.
    losses = []
    with torch.no_grad():
        for block in np.concatenate(batches):
            for a in range(length):
                end = block * length + min((a // stride + 1) * stride, length)  # last scored target
                start = max(0, end - length)
                x = torch.from_numpy(tokens[start : start + length].astype(np.int64))[None]
                p = block * length + 1 + a  # the target's flat position
                logits = loaded.model(x).logits[0, p - start - 1]
                losses.append(float(F.cross_entropy(logits[None], torch.tensor([int(tokens[p])]))))
                assert p - start - 1 >= min(length - stride, block * length + a)  # context of at least L - S
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    if stride == length:  # one window per block: block evaluation exactly
        block_loss = evaluate.mean_loss(loaded.model, blocks, batches, loaded.device, None)
        assert got == pytest.approx(block_loss, rel=1e-6)


def test_eval_stride_reports_the_protocol_and_refuses_bad_values(transformer_run):
    run_dir = str(transformer_run.run_dir)
    res = runner.invoke(app, ["eval", run_dir, "--stride", "16", "--json"])
    assert res.exit_code == 0, res.output
    slid = json.loads(res.stdout)
    plain = json.loads(runner.invoke(app, ["eval", run_dir, "--json"]).stdout)
    assert slid["context"] == "stride 16" and plain["context"] == "block"
    assert slid["tokens"] == plain["tokens"] and slid["bytes"] == plain["bytes"]  # the same tokens scored
    assert slid["loss"] != plain["loss"]
    for args, message in ((["--stride", "33"], "choose 1 to data.seq_len=32"),
                          (["--stateful"], "has no recurrent state")):
        res = runner.invoke(app, ["eval", run_dir, *args])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
