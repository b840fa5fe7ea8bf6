"""Checkpoints: `<run>/checkpoints/step_NNNNNN/` with

  model.safetensors   the weights (tied tensors stored once)
  state.pt            optimizer, LR schedule, RNG, data position and logging window; tensors and
                      plain containers only, read with torch.load(weights_only=True)
  meta.json           step, tokens seen, config hash, versions, last eval loss

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
never leaves a half-written `step_*` directory that resume would pick up. Loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from moectl.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "state.pt", "meta.json")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(
    run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], meta: dict[str, Any], keep_last: int
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`."""
    from safetensors.torch import save_model

    final = step_dir(run_dir, step)
    if final.is_dir():  # this exact step is already saved (e.g. Ctrl-C right after a periodic save)
        return final
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2) + "\n")
    for name in FILES:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftovers of interrupted saves."""
    root = checkpoints_dir(run_dir)
    for old in root.glob(".tmp-*"):
        if not old.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(old, ignore_errors=True)
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        # Rename first: an interrupted delete must not leave a partial step_* behind.
        trash = root / f".tmp-trash-{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _corrupt(path: Path, what: str, exc: BaseException) -> CheckpointError:
    reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return CheckpointError(
        f"checkpoint {path} is corrupt: {what}: {reason}; delete that directory to fall back to an earlier "
        "checkpoint, or start over with --overwrite"
    )


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise _corrupt(path, "meta.json", exc) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise _corrupt(path, "meta.json", ValueError("no integer 'step'"))
    return meta


def load_model(path: Path, model: nn.Module) -> None:
    """Load weights into `model`; every tensor must be present with the right shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load

    file = Path(path) / "model.safetensors"
    try:
        missing, unexpected = st_load(model, str(file), strict=False)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise _corrupt(path, "model.safetensors", exc) from None
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise CheckpointError(
            f"checkpoint {path} does not match this model ({detail[:160]}); was it trained with another config?"
        ) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, "model.safetensors", exc) from None
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(
            f"checkpoint {path} does not match this model ({detail}); was it trained with another config?"
        )


def tensor_shape(path: Path, name: str) -> Optional[list[int]]:
    """The shape of one stored tensor (None if absent or unreadable; load_model reports why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
            return list(f.get_slice(name).get_shape()) if name in f.keys() else None
    except Exception:  # a corrupt file: load_model gives the one-line error
        return None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or tampered pickles
        raise _corrupt(path, "state.pt", exc) from None
