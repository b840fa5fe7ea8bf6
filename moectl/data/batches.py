"""Batches for either task: which rows (blocks of text, or rows of examples) make up each global
batch in training, shuffled per epoch or dealt as contiguous streams (train.lstm_stateful), and
which rows evaluation scores. Everything here is block ids; the rows themselves turn ids into tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from moectl.common.errors import DataError

if TYPE_CHECKING:
    from moectl.data.lm import Blocks
    from moectl.data.sft import ExampleBlocks


class BatchSampler:
    """Shuffled global batches of block ids, a fresh permutation per epoch, resumable.

    Epoch e's order is randperm(num_blocks) under seed + e; a batch never straddles two
    epochs (the tail that does not fill a batch is skipped). The state is (epoch, cursor).
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int):
        if num_blocks < batch_size:
            raise DataError(
                f"the training split has {num_blocks} blocks, fewer than train.batch_size={batch_size}; "
                "lower train.batch_size or data.seq_len, or add data"
            )
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm: Optional[np.ndarray] = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_blocks, generator=g).numpy()
        return self._perm

    def next(self) -> np.ndarray:
        """The next global batch: (batch_size,) block ids."""
        if self.cursor + self.batch_size > self.num_blocks:
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        ids = self._order()[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return ids

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


class StreamSampler:
    """Batches for truncated backpropagation through time (train.lstm_stateful): the blocks are
    cut into batch_size contiguous streams of `per` = num_blocks // batch_size blocks, and step j
    of a pass takes block j of every stream, so row s of each batch continues row s of the
    previous one. A new pass starts the streams again from a zero state (`fresh`). The state is
    (epoch, cursor), as BatchSampler's."""

    def __init__(self, num_blocks: int, batch_size: int):
        self.per = num_blocks // batch_size
        if self.per < 1:
            raise DataError(
                f"the training split has {num_blocks} blocks, fewer than train.batch_size={batch_size} streams; "
                "lower train.batch_size or data.seq_len, or add data"
            )
        self.batch_size = batch_size
        self.epoch = 0
        self.cursor = 0

    def next(self) -> np.ndarray:
        """The next global batch: (batch_size,) block ids, one per stream, in stream order."""
        if self.cursor == self.per:
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = np.arange(self.batch_size, dtype=np.int64) * self.per + self.cursor
        self.cursor += 1
        return ids

    @property
    def fresh(self) -> bool:
        """Whether the batch next() returns starts the streams (a zero state)."""
        return self.cursor in (0, self.per)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def stream_batches(blocks: Blocks | ExampleBlocks, batch_size: int, max_batches: Optional[int]) -> list[np.ndarray]:
    """Validation batches for a model that carries state: batch_size contiguous streams spread
    over the split, and batch j holds block j of each; the first `max_batches` of them (all when None)."""
    per = len(blocks) // batch_size
    if per < 1:
        raise DataError(
            f"the {blocks.split.name} split has {len(blocks)} blocks, fewer than {batch_size} streams of one; "
            "lower the batch size or data.seq_len"
        )
    columns = per if max_batches is None else min(per, max_batches)
    return [np.arange(batch_size, dtype=np.int64) * per + j for j in range(columns)]


def eval_batches(blocks: Blocks | ExampleBlocks, batch_size: int, max_batches: Optional[int]) -> list[np.ndarray]:
    """Validation batches, the same at every evaluation.

    All blocks in order, or, when max_batches caps them, blocks spread evenly over the whole split
    (not its first documents), so a capped evaluation still samples all of it.
    """
    n = len(blocks)
    if max_batches is None or max_batches * batch_size >= n:
        ids = np.arange(n)
    else:
        ids = np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64)  # distinct: step >= 1
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def eval_chunks(batches: list, size: int) -> list:
    """The validation set's batches re-cut to `size` sequences (each process's micro-batch), so
    every world size evaluates the same sequences."""
    if not batches:
        return []
    ids = np.concatenate(batches)
    return [ids[i : i + size] for i in range(0, len(ids), size)]
