"""What a checkpoint keeps so that a run continues exactly, as parts that each save and restore
themselves (torchtitan's `Stateful`, lingua's `TrainState`).

A part has two methods:
  state_dict()            on every rank at each save (a part may gather from the ranks first);
                          what rank 0 writes under the part's name in state.pt, None: nothing
  load_state_dict(saved)  on every rank at resume, with what was written (None for an optional
                          part the checkpoint lacks)

`TrainState` holds the parts by their names in state.pt; the weights a checkpoint keeps apart
(model.safetensors), and `TrainState.weights` puts every expert in place for them. The loop's
save and restore name no part: a new feature that must
survive a resume adds a part where the run is set up, and nothing else. `LoopState` holds the loop's
step and counters, which a checkpoint keeps in its metadata (meta.json), where eval reads them too.

Every saved part is in the one-process layout (all experts, all streams, all ranks' RNG), so a run
resumes under another number of processes or expert-parallel groups.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional, Protocol

import numpy as np
import torch

from moectl.common import console
from moectl.common.runtime import Dist
from moectl.common.stats import Sums, perplexity
from moectl.data import IGNORE, Rows, StreamSampler
from moectl.services import distributed
from moectl.services.expert_parallel import ExpertParallel

# The loop's counters that a checkpoint's meta.json keeps (eval and route-stats read them there too).
COUNTERS = ("tokens_seen", "first_eval_loss", "eval_loss", "best_eval_loss", "best_step", "evals_since_best",
            "seconds_trained")


@dataclass
class LoopState:
    """What the loop changes. A checkpoint keeps the step and COUNTERS in its metadata and the
    collapse flags as a part of the resumable state; the rest is this session's."""

    step: int = 0
    tokens_seen: int = 0
    first_eval_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    collapsed: list[bool] = field(default_factory=list)  # per routing record: over log.collapse_threshold last window
    checkpoint: Optional[Path] = None  # the newest checkpoint
    stopping: bool = False  # Ctrl-C on any rank: save after this step and return
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0  # evaluations in a row without a lower eval loss (train.early_stopping)
    early_stopped: bool = False
    seconds_trained: float = 0.0  # in the steps alone, over every session (equal-time comparisons read it)
    train_seconds: float = 0.0  # in this session
    session_tokens: int = 0
    window_seconds: float = 0.0
    window_tokens: int = 0

    def counters(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def record_eval(self, loss: float, patience: Optional[int]) -> Optional[str]:
        """Track the best eval loss so far and the evaluations since it (the starting model's
        evaluation is the first best); when that makes train.early_stopping (`patience`) stop, says so."""
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step, self.evals_since_best = loss, self.step, 0
            return None
        self.evals_since_best += 1
        self.early_stopped = patience is not None and self.evals_since_best >= patience
        if not self.early_stopped:
            return None
        return (f"step {self.step}: stopping early (train.early_stopping={patience}): no eval loss below "
                f"{self.best_eval_loss:.4f} (step {self.best_step}) in {self.evals_since_best} evaluations")

    def load_counters(self, meta: dict) -> None:
        """From a checkpoint's metadata; a counter it lacks (saved before it existed) keeps its default."""
        self.step = meta["step"]
        for name in COUNTERS:
            setattr(self, name, meta.get(name, getattr(self, name)))


@dataclass
class RunResult(LoopState):
    """What fit() returns: the loop's final state, and what describes the run."""

    run_dir: Path = Path()
    max_steps: int = 0
    world_size: int = 1
    params_total: int = 0
    params_active: int = 0
    params_trained: int = 0  # under train.lora or train.freeze: what the optimizer updates (0: everything)

    @property
    def interrupted(self) -> bool:
        return self.stopping and self.step < self.max_steps

    @property
    def tokens_per_sec(self) -> float:
        return self.session_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def eval_ppl(self) -> Optional[float]:
        return perplexity(self.eval_loss) if self.eval_loss is not None else None


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, saved: Any) -> None: ...


class TrainState:
    """The run's resumable parts, saved and restored in one order on every rank (some gather)."""

    def __init__(self, ep: Optional[ExpertParallel], parts: dict[str, Stateful], optional: tuple[str, ...] = ()):
        self.ep, self.parts, self.optional = ep, parts, optional

    def weights(self, gather: bool) -> ContextManager:
        """The model with every expert in place, to save (`gather`) or to load into (see
        expert_parallel.ExpertParallel.full_experts); the model as it is without expert parallelism."""
        return self.ep.full_experts(gather) if self.ep is not None else nullcontext()

    def state_dict(self) -> dict[str, Any]:
        saved = {name: part.state_dict() for name, part in self.parts.items()}
        return {name: value for name, value in saved.items() if value is not None}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Raises KeyError for a part the checkpoint lacks, unless it is optional."""
        for name, part in self.parts.items():
            part.load_state_dict(saved.get(name) if name in self.optional else saved[name])


class OptimizerState:
    """The optimizer's moments and step counts; with expert parallelism, gathered to all E experts
    on saving and cut to this rank's experts on loading. The LR multipliers stay the config's."""

    def __init__(self, optimizer: torch.optim.Optimizer, ep: Optional[ExpertParallel]):
        self.optimizer, self.ep = optimizer, ep

    def state_dict(self) -> dict:
        return self.ep.full_optimizer_state(self.optimizer) if self.ep is not None else self.optimizer.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        mults = [group.get("lr_mult", 1.0) for group in self.optimizer.param_groups]
        if self.ep is not None:
            self.ep.load_optimizer_state(self.optimizer, saved)
        else:
            self.optimizer.load_state_dict(saved)
        for group, mult in zip(self.optimizer.param_groups, mults):
            group["lr_mult"] = mult


class RankSums:
    """An accumulator whose sums are saved added up over the ranks; rank 0 carries them on at
    resume (the others start from zero, so the next all-reduce counts each sum once)."""

    def __init__(self, sums: Sums, dp: Dist):
        self.sums, self.dp = sums, dp

    def state_dict(self) -> dict[str, torch.Tensor]:
        summed = [t.clone() for t in self.sums.tensors()]
        distributed.all_reduce_sum_(summed, self.dp)
        return {name: t.cpu() for name, t in zip(self.sums.FIELDS, summed)}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        if self.dp.is_main:
            self.sums.load_state_dict(saved)


class Flags:
    """A list of flags kept in place (LoopState.collapsed)."""

    def __init__(self, values: list):
        self.values = values

    def state_dict(self) -> list:
        return list(self.values)

    def load_state_dict(self, saved: Optional[list]) -> None:
        if saved is not None:
            self.values[:] = saved


def seed_rank(seed: int, dp: Dist) -> None:
    """Each rank its own dropout and routing noise (the weights were initialised alike before)."""
    torch.manual_seed(seed + 7919 * (dp.rank + 1))


class RNGStates:
    """Every rank's random state (dropout, routing noise): one per rank, in rank order."""

    def __init__(self, dp: Dist, seed: int):
        self.dp, self.seed = dp, seed

    def state_dict(self) -> list[dict]:
        state: dict[str, object] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return distributed.gather_objects(state, self.dp)

    def load_state_dict(self, saved) -> None:
        states = saved if isinstance(saved, list) else [saved]  # older checkpoints hold one
        if len(states) != self.dp.world_size:
            console.warn(
                f"the checkpoint was saved by {len(states)} processes and this run has {self.dp.world_size}: the data "
                "order continues exactly, but dropout and routing noise take fresh random streams"
            )
            seed_rank(self.seed, self.dp)
            return
        torch.set_rng_state(states[self.dp.rank]["torch"])
        if "cuda" in states[self.dp.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states[self.dp.rank]["cuda"])


class LSTMCarry:
    """train.lstm_stateful: the LSTM state each of this rank's micro-batches carries from one block
    of its streams to the next, (layers, 2, micro, D), or None where the streams start afresh.

    Saved as all streams' state in stream order, (layers, 2, batch_size, D): stream order does not
    depend on the number of processes, so the run resumes under any world size."""

    def __init__(self, accum: int, micro: int, sampler: StreamSampler, dp: Dist, device: torch.device):
        self.micro, self.sampler, self.dp, self.device = micro, sampler, dp, device
        self.streams: list[Optional[torch.Tensor]] = [None] * accum

    def reset(self) -> None:
        """The streams start again: a zero state."""
        self.streams = [None] * len(self.streams)

    def state_dict(self) -> Optional[torch.Tensor]:
        local = None if any(c is None for c in self.streams) else torch.cat(self.streams, dim=2).cpu()
        parts = distributed.gather_objects(local, self.dp)
        if not self.dp.is_main or any(p is None for p in parts):
            return None
        return torch.cat(parts, dim=2)

    def load_state_dict(self, saved: Optional[torch.Tensor]) -> None:
        if self.sampler.fresh:  # the checkpoint ended an epoch of the streams: they start again anyway
            return
        if saved is None:
            raise ValueError("it holds no carried LSTM state, which train.lstm_stateful needs to continue the streams")
        if saved.shape[2] != self.sampler.batch_size:
            raise ValueError(f"the carried LSTM state holds {saved.shape[2]} streams, not train.batch_size")
        mine = len(self.streams) * self.micro
        rows = saved[:, :, self.dp.rank * mine : (self.dp.rank + 1) * mine]
        self.streams = [c.to(self.device) for c in rows.split(self.micro, dim=2)]


class StartRoutes:
    """train.init_from: the starting model's top-1 expert of each scored validation token, per MoE
    layer, to measure how far fine-tuning moves the routers. `start` holds an (MoE layers, tokens)
    tensor per validation batch this rank scores (None until the first evaluation).

    Saved in the order of the validation batches, (MoE layers, scored tokens), whatever the number
    of processes."""

    def __init__(self, layers: int, dp: Dist, device: torch.device, val_blocks: Rows, val_batches: list):
        self.layers, self.dp, self.device, self.val_blocks, self.val_batches = layers, dp, device, val_blocks, val_batches
        self.start: Optional[list] = None

    def observe(self, routes: list) -> Optional[list[float]]:
        """`routes`: mean_loss's top-1 lists of the validation batches (MoE layers, then a mixture
        head's gate). The first call records them as the start; later ones return `changed`."""
        routes = [r[: self.layers] if r is not None else None for r in routes]  # the MoE layers' rows
        if self.start is None:
            self.start = routes
            return None
        return self.changed(routes)

    def changed(self, now: list) -> list[float]:
        """Per MoE layer, the fraction of scored validation tokens (over all ranks) whose top-1
        expert differs between the start and `now` (a list like `start`, of the same batches)."""
        sums = torch.zeros(2, self.layers, dtype=torch.float64)  # (changed, tokens) per layer
        for a, b in zip(self.start, now):
            if a is not None and b is not None:
                sums[0] += (a != b).sum(dim=1).double()
                sums[1] += a.shape[1]
        if self.dp.enabled:
            sums = sums.to(self.device)
            distributed.all_reduce_sum_([sums], self.dp)
            sums = sums.cpu()
        return (sums[0] / sums[1].clamp_min(1.0)).tolist()

    def state_dict(self) -> Optional[torch.Tensor]:
        if self.start is None:
            return None
        ranks, w = distributed.gather_objects(self.start, self.dp), self.dp.world_size
        return torch.cat([ranks[i % w][i // w] for i in range(len(self.val_batches))], dim=1)

    def load_state_dict(self, saved: Optional[torch.Tensor]) -> None:
        """This rank's share of the saved tensor, cut at its validation batches."""
        if saved is None:
            return
        counts = [int((self.val_blocks.batch(ids)[1] != IGNORE).sum()) for ids in self.val_batches]
        if sum(counts) != saved.shape[1]:
            console.warn("the validation batches changed since the start (train.eval_batches?): router drift against "
                         "the starting checkpoint is no longer measured")
            return
        ends = np.cumsum(counts)
        self.start = [saved[:, ends[i] - counts[i] : ends[i]] for i in range(self.dp.rank, len(counts), self.dp.world_size)]
