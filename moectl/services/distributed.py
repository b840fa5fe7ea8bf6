"""Data parallelism on PyTorch's own engine: the process group, DDP, the few collectives the
training loop needs, and the `--nproc-per-node` launcher.

The same `moectl train` runs with one process or many. Under torchrun (WORLD_SIZE > 1 in the
environment moectl/common/runtime.py reads) `init` starts a process group (NCCL when the device is
CUDA, gloo otherwise) and the loop wraps the model in DistributedDataParallel.
Without torchrun every helper here is a no-op, so single-process code pays nothing.

Failure handling: work that only rank 0 should do first (preparing data, checking the run
directory) goes through `main_first` / `from_main`, which tell the other ranks whether it
worked, so a failure on rank 0 stops every rank at once instead of leaving them waiting. Every
collective has the process group's timeout (`train.dist_timeout`), so a rank that hangs or
dies ends the job within that bound; torchrun also stops the others when one exits.
"""

from __future__ import annotations

import inspect
import logging
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moectl.common import console, runtime
from moectl.common.errors import ConfigError, DistributedError, PeerFailed
from moectl.common.runtime import Dist
from moectl.config import TrainConfig

T = TypeVar("T")


def init(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when there is one; return this rank's place and device."""
    env = runtime.torchrun_env()
    if not env.enabled:
        return Dist(), device
    if device.type == "mps":
        raise ConfigError("multi-process training does not support train.device=mps; use train.device=cpu")
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return env, device


@contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[tuple[Dist, torch.device]]:
    """This process's place in the job and its device, for the block's duration: the process group
    is joined (`init`) and left afterwards; a collective that fails because another rank went away
    becomes one DistributedError line instead of a torch traceback."""
    d, device = init(device, timeout_s)
    try:
        yield d, device
        if d.enabled:
            # Leave together: a rank that tears its process group down while another still uses
            # it (rank 0 writing the last checkpoint) has been seen to abort in gloo's threads.
            dist.barrier()
    except RuntimeError as exc:
        text = str(exc).lower()
        markers = ("connection closed by peer", "connection reset by peer", "broken pipe", "aborted", "timed out", "timeout")
        if not d.enabled or not (isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in markers)):
            raise
        raise DistributedError(
            "lost contact with the other processes: one of them failed (its error is above), was killed, or did not "
            f"answer within train.dist_timeout={timeout_s:g} s"
        ) from exc
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: torch.device, ignore: Sequence[str] = ()) -> nn.Module:
    """DDP over the model. Buffers are not re-broadcast each forward: the only one that changes
    in training, the sigmoid router's expert bias, is updated from global counts on every rank.
    DDP neither broadcasts nor averages the parameters named in `ignore` (sharded experts)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))

    ids = [device.index] if device.type == "cuda" else None
    # Newer PyTorch renamed the switch (and syncs buffers once at init, which is harmless here).
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    buffers_at_init_only = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **buffers_at_init_only)


def gradient_sync(model: nn.Module, last_micro_step: bool):
    """Context for one micro-step's forward and backward: DDP all-reduces the gradients only on
    the last micro-step of an optimizer step; the others accumulate locally (`no_sync`)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not last_micro_step:
        return model.no_sync()
    return nullcontext()


# ---------------------------------------------------------------------------------- collectives


def all_reduce_sum_(tensors: Sequence[Tensor], d: Dist) -> None:
    """Sum each tensor over ranks, in place (one flattened all-reduce per dtype)."""
    if not d.enabled or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_over_ranks(t: Tensor) -> Tensor:
    """A new tensor: `t` summed over ranks; not differentiable (used on counts).

    Takes no `Dist`: the model calls it inside its forward, only ever under a process group.
    """
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def gather_objects(obj: T, d: Dist) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: object) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], T], d: Dist) -> T:
    """Rank 0 computes; every rank gets its result. If rank 0 raises, the others raise PeerFailed."""
    if not d.enabled:
        return fn()
    if d.is_main:
        try:
            result = fn()
        except BaseException:
            _broadcast(("failed", None))
            raise
        _broadcast(("ok", result))
        return result
    status, result = _broadcast(None)
    if status != "ok":
        raise PeerFailed("rank 0 failed")
    return result


def main_first(fn: Callable[[], T], d: Dist) -> T:
    """Rank 0 runs `fn` (filling caches), then the others run it too (reading them)."""
    if not d.enabled:
        return fn()
    result = from_main(fn, d)
    return result if d.is_main else fn()


# ------------------------------------------------------------------------------------- launcher


def launch(nproc_per_node: int, module_args: list[str]) -> int:
    """Run `python -m moectl <module_args>` in `nproc_per_node` processes with torchrun's launcher
    (standalone, one node) and return the exit code; a failed rank becomes one line on stderr."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    runtime.share_cores(nproc_per_node)
    # The launcher's own log lines repeat what the ranks and the line below say.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc_per_node}", "--max-restarts=0", "--module", "moectl", *module_args]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        if failure.exitcode < 0:
            console.error(f"rank {rank} was killed by signal {-failure.exitcode}")
        else:
            console.error(f"rank {rank} exited with code {failure.exitcode}; its error is above")
        return code
    except (KeyboardInterrupt, SignalException):
        return 130  # Ctrl-C reached the ranks too: they finished the step and saved
    sys.stdout.flush()
    return 0


def batch_layout(tr: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for each of `world_size` processes: train.batch_size is
    the global batch, split over processes, then into micro-batches of train.micro_batch_size."""
    if tr.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} is the global batch and must be divisible by the {world_size} processes"
        )
    share = tr.batch_size // world_size
    micro = tr.micro_batch_size or share
    if share % micro:
        raise ConfigError(
            f"each of the {world_size} processes gets {share} sequences of train.batch_size={tr.batch_size}, "
            f"not a multiple of train.micro_batch_size={micro}; change either"
        )
    return micro, share // micro
