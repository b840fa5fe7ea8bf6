"""moectl/training/state.py: each part of the resumable state saves and restores itself, and the
loop's save and restore name no part (a new feature adds a part, not a branch). The slow tests in
test_train.py, test_context.py, test_distributed.py and test_expert_parallel.py check that whole
runs resume bitwise through these parts."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

from moectl.commands import train
from moectl.common.runtime import Dist
from moectl.data import IGNORE, StreamSampler
from moectl.training import Flags, LoopState, LSTMCarry, OptimizerState, RankSums, RNGStates, StartRoutes, TrainState
from moectl.training.window import LossWindow

ONE = Dist()


class Counter:
    """A part that records what it was given."""

    def __init__(self, value):
        self.value, self.loaded = value, "never"

    def state_dict(self):
        return self.value

    def load_state_dict(self, saved):
        self.loaded = saved


def test_train_state_saves_every_part_by_name_and_skips_none():
    state = TrainState(None, {"a": Counter(1), "b": Counter(None), "c": Counter([3])})
    assert state.state_dict() == {"a": 1, "c": [3]}


def test_a_missing_part_is_an_error_unless_it_is_optional():
    parts = {"a": Counter(1), "b": Counter(2)}
    state = TrainState(None, parts, optional=("b",))
    state.load_state_dict({"a": 5})
    assert parts["a"].loaded == 5 and parts["b"].loaded is None
    with pytest.raises(KeyError, match="a"):
        state.load_state_dict({"b": 7})


def test_rng_states_continue_the_same_random_stream():
    part = RNGStates(ONE, seed=0)
    torch.manual_seed(123)
    saved = part.state_dict()
    expected = torch.rand(4)
    torch.manual_seed(999)
    part.load_state_dict(saved)
    assert torch.equal(torch.rand(4), expected)
    assert isinstance(saved, list) and len(saved) == 1  # one state per rank


def test_rng_states_saved_by_another_world_size_reseed_this_rank(capsys):
    part = RNGStates(Dist(rank=0, world_size=1), seed=5)
    part.load_state_dict([{"torch": torch.get_rng_state()}] * 2)
    draw = torch.rand(3)
    torch.manual_seed(5 + 7919)
    assert torch.equal(draw, torch.rand(3))
    assert "saved by 2 processes" in capsys.readouterr().err


def test_optimizer_state_round_trips_and_keeps_the_configs_lr_multipliers():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr_mult": 2.0}, {"params": [model.bias], "lr_mult": 1.0}])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = OptimizerState(opt, None).state_dict()
    other = torch.optim.AdamW([{"params": [model.weight], "lr_mult": 3.0}, {"params": [model.bias], "lr_mult": 1.0}])
    OptimizerState(other, None).load_state_dict(saved)
    assert [g["lr_mult"] for g in other.param_groups] == [3.0, 1.0]
    assert torch.equal(other.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_rank_sums_load_on_rank_0_only():
    window = LossWindow("cpu")
    window.objective += 2.5
    saved = RankSums(window, ONE).state_dict()
    main, other = LossWindow("cpu"), LossWindow("cpu")
    RankSums(main, ONE).load_state_dict(saved)
    RankSums(other, Dist(rank=1, world_size=2)).load_state_dict(saved)
    assert float(main.objective) == 2.5 and float(other.objective) == 0.0  # the next all-reduce counts it once


def test_flags_restore_in_place():
    values = [False, False]
    Flags(values).load_state_dict([True, False])
    assert values == [True, False]
    Flags(values).load_state_dict(None)  # a checkpoint from before the flags were saved
    assert values == [True, False]


def test_lstm_carry_round_trips_in_stream_order_and_refuses_a_missing_state():
    sampler = StreamSampler(num_blocks=12, batch_size=4)
    sampler.next()  # not fresh: the streams are under way
    carry = LSTMCarry(accum=2, micro=2, sampler=sampler, dp=ONE, device=torch.device("cpu"))
    carry.streams = [torch.randn(3, 2, 2, 5), torch.randn(3, 2, 2, 5)]  # (layers, 2, micro, D) per micro-batch
    saved = carry.state_dict()
    assert saved.shape == (3, 2, 4, 5) and torch.equal(saved[:, :, 2:], carry.streams[1])
    again = LSTMCarry(accum=2, micro=2, sampler=sampler, dp=ONE, device=torch.device("cpu"))
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(again.streams, carry.streams))
    with pytest.raises(ValueError, match="no carried LSTM state"):
        again.load_state_dict(None)
    fresh = LSTMCarry(accum=2, micro=2, sampler=StreamSampler(12, 4), dp=ONE, device=torch.device("cpu"))
    fresh.load_state_dict(None)  # a fresh pass starts from zero: nothing needed
    assert fresh.streams == [None, None]


class Rows:
    """Validation rows whose scored targets per batch are known (IGNORE elsewhere)."""

    def __init__(self, scored: list[int]):
        self.scored = scored

    def batch(self, ids):
        n = self.scored[int(ids[0])]
        y = torch.full((1, 6), IGNORE)
        y[0, :n] = 1
        return y, y


def test_start_routes_record_then_measure_drift_and_round_trip():
    rows, batches = Rows([3, 2]), [np.array([0]), np.array([1])]
    routes = StartRoutes(layers=2, dp=ONE, device=torch.device("cpu"), val_blocks=rows, val_batches=batches)
    start = [torch.tensor([[0, 1, 2], [3, 3, 3], [9, 9, 9]]), torch.tensor([[1, 1], [2, 2], [9, 9]])]  # 3rd row: a head
    assert routes.observe(start) is None  # the first evaluation records the start
    now = [torch.tensor([[0, 1, 0], [3, 3, 3]]), torch.tensor([[1, 0], [2, 2]])]
    assert routes.observe(now) == pytest.approx([2 / 5, 0.0])
    saved = routes.state_dict()
    assert saved.shape == (2, 5)
    again = StartRoutes(layers=2, dp=ONE, device=torch.device("cpu"), val_blocks=rows, val_batches=batches)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b[:2]) for a, b in zip(again.start, start))


def test_loop_state_counters_round_trip_through_metadata():
    state = LoopState(step=7, tokens_seen=70, eval_loss=3.5, best_eval_loss=3.4, best_step=5, evals_since_best=1)
    again = LoopState()
    again.load_counters({"step": 7, **state.counters()})
    assert again.counters() == state.counters() and again.step == 7
    old = LoopState()
    old.load_counters({"step": 3})  # a checkpoint from before the best-loss counters
    assert old.evals_since_best == 0 and old.best_step is None


def test_early_stopping_counts_evaluations_since_the_best():
    state = LoopState()
    assert state.record_eval(3.0, patience=2) is None and state.best_eval_loss == 3.0
    assert state.record_eval(3.1, patience=2) is None
    message = state.record_eval(3.2, patience=2)
    assert state.early_stopped and "no eval loss below 3.0000" in message


def test_the_loops_save_and_restore_name_no_part():
    """A part's name appears only where setup registers it (train._resumable), never in save or restore."""
    def strings(function) -> set:
        return {n.value for n in ast.walk(ast.parse(inspect.getsource(function))) if isinstance(n, ast.Constant)}

    names = {"optimizer", "sampler", "window", "routing_stats", "collapsed", "rng", "lstm_state", "routes_at_start"}
    assert names <= strings(train._resumable)
    for step in (train.save, train.restore):
        assert not strings(step) & names, f"{step.__name__} names a part of the resumable state"
