"""Process facts, each read in one place: where this process sits in a torchrun job, which
device and precision it computes in, how its threads and memory allocator are set, and what ran
it (the machine and the source version, for results files).

Nothing here imports torch at module level: the CLI reads the torchrun environment before a
command has loaded torch, and `moectl --help` must stay fast.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from moectl import __version__
from moectl.common.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> Dist:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (a single process without torchrun)."""
    get = lambda name, default: int(os.environ.get(name, default) or default)  # noqa: E731
    return Dist(rank=get("RANK", 0), world_size=get("WORLD_SIZE", 1), local_rank=get("LOCAL_RANK", 0))


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """False in torchrun's ranks other than 0: they keep quiet, so every line is printed once."""
    return torchrun_env().is_main


# --------------------------------------------------------------------------- device and precision


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str) -> "torch.device":
    """`auto` is CUDA, then MPS, then CPU; a named device must exist here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=auto or cpu")
    if name == "mps" and not _mps_available():
        raise ConfigError("train.device='mps' but MPS is not available here; use train.device=auto or cpu")
    return torch.device(name)


def autocast_dtype(device: "torch.device", precision: str) -> Optional["torch.dtype"]:
    """The autocast dtype of `train.precision` on `device`; None means plain fp32. The router
    computes in fp32 under any of them (moe/router.py)."""
    import torch

    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not bf16_ok and device.type != "mps":
            raise ConfigError(f"train.precision=bf16 is not supported on {device}; use train.precision=fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and bf16_ok else None


def autocast(device: "torch.device", dtype: Optional["torch.dtype"]):
    """The autocast context for `dtype` (a no-op for fp32)."""
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# ------------------------------------------------------------------------- threads and allocator


def share_cores(processes: int) -> None:
    """Give each of `processes` local processes its share of the cores (torchrun would set one
    thread each and say so); an OMP_NUM_THREADS the user set wins."""
    if processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed large blocks for reuse; False where it does not apply.

    glibc maps every block above its mmap threshold afresh and unmaps it on free, so the large
    tensors training allocates every step (the weight gradients above all) are zero-filled page
    by page each time: a third of an MoE layer's backward on the 2-core benchmark. Raising the
    thresholds does what tcmalloc or jemalloc do in PyTorch's CPU performance guide.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def machine() -> dict[str, object]:
    """What ran this, for a results file: the CPU model, its cores, and the versions that matter."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@functools.lru_cache(maxsize=1)
def source_version() -> dict[str, object]:
    """The moectl version, and when it runs from a git checkout its commit and whether tracked
    files differ from it (results from uncommitted code say so). Read once per process."""
    import subprocess

    where = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"version": __version__, "commit": None, "modified": None}
    if commit.returncode != 0:
        return {"version": __version__, "commit": None, "modified": None}
    return {"version": __version__, "commit": commit.stdout.strip(), "modified": bool(dirty.stdout.strip())}
