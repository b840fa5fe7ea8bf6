"""Checkpoints: atomic writes, pruning, and loading that never runs pickled code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from moectl.services import checkpoint
from moectl.common.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once by safetensors


RNG = torch.Generator().manual_seed(5).get_state()


def save(run_dir, step, model=None, keep_last=3):
    state = {"optimizer": {"state": {}, "param_groups": []}, "rng": {"torch": RNG}}
    return checkpoint.save(run_dir, step, model or Tiny(), state, {"tokens_seen": step * 10}, keep_last)


def test_save_load_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    path = save(tmp_path, 7, model)
    assert path == tmp_path / "checkpoints" / "step_000007"
    other = Tiny()
    checkpoint.load_model(path, other)
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight
    meta = checkpoint.read_meta(path)
    assert meta["step"] == 7 and meta["tokens_seen"] == 70
    assert torch.equal(checkpoint.load_state(path)["rng"]["torch"], RNG)


def test_keep_last_prunes_oldest_and_latest_is_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 5]
    assert checkpoint.latest(tmp_path).name == "step_000005"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_crash_while_saving_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    # The failed save removed its staging directory: resume picks step 1.
    assert checkpoint.latest(tmp_path).name == "step_000001"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    # A killed process leaves its half-written staging directory: never read as a checkpoint, and
    # the next save removes it.
    killed = tmp_path / "checkpoints" / ".tmp-step_000002-999999"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "step_000001"
    save(tmp_path, 2)
    assert checkpoint.latest(tmp_path).name == "step_000002" and not killed.exists()
    assert sorted(p.name for p in checkpoint.latest(tmp_path).iterdir()) == ["meta.json", "model.safetensors", "state.pt"]


def test_saving_the_same_step_twice_keeps_the_first(tmp_path):
    first = save(tmp_path, 3)
    stamp = (first / "meta.json").read_text()
    assert save(tmp_path, 3) == first
    assert (first / "meta.json").read_text() == stamp


class Payload:
    """A pickle that runs code when loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_runs_pickled_code(tmp_path):
    path = save(tmp_path, 1)
    marker = tmp_path / "pwned"
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"optimizer": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="state.pt"):
        checkpoint.load_state(path)
    assert not marker.exists()


def test_corrupt_or_mismatched_weights_are_clear_errors(tmp_path):
    path = save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="is corrupt: model.safetensors"):
        checkpoint.load_model(path, Tiny())

    path = save(tmp_path, 2)

    class Bigger(Tiny):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    with pytest.raises(CheckpointError, match="does not match this model"):
        checkpoint.load_model(path, Bigger())
    (path / "meta.json").write_text('{"no_step": 1}')
    with pytest.raises(CheckpointError, match="meta.json"):
        checkpoint.read_meta(path)
