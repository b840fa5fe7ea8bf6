"""Checkpoints and run directories: where they are, what they hold, and what may be replaced.

A run directory `<run.dir>/<run.name>/` holds config.yaml, tokenizer.json, TensorBoard events
and `checkpoints/step_NNNNNN/`, each with

  model.safetensors   the weights (tied tensors stored once)
  state.pt            the resumable state's parts by name (moectl/training/state.py): optimizer,
                      sampler position, RNG state of every rank, the logging window's loss and
                      routing sums, collapse flags, and where used the carried LSTM state and the
                      starting routes; tensors and plain containers only, read with
                      torch.load(weights_only=True)
  meta.json           `metadata()`: step, tokens seen, config hash, versions, time, eval loss, ...

A LoRA run's checkpoints hold adapter.safetensors instead of model.safetensors: what the run
trains alone (models/lora.py trained_state), with meta.json's `lora_base` naming the frozen base
(its path and sha256), which is loaded first. An export bundle of a LoRA run holds both files.

A checkpoint is staged in a hidden directory and renamed into place (fileio.staged_directory),
so a crash never leaves a half-written `step_*` that resume would pick up. Loading never
unpickles arbitrary objects. An export bundle (export.py) is a checkpoint directory that also
holds its config and tokenizer; `resolve` accepts both, and run directories, and refuses a
transformers directory (`moectl export --format hf`'s, or any other) in one line that says what to use.
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

from moectl import __version__, config
from moectl.common import quant, runtime
from moectl.common.errors import CheckpointError, ConfigError
from moectl.common.fileio import staged_directory
from moectl.config import Config, RunConfig

STEP_DIR = re.compile(r"^step_(\d+)$")
# meta.json "format" of what `moectl export` writes (commands/export.py), by --format
BUNDLE_FORMATS = {"safetensors": "moectl-safetensors-bundle-1", "hf": "moectl-hf-export-1"}
BEST = "best"  # checkpoints/best -> step_NNNNNN with checkpoint.keep_best
ADAPTER = "adapter.safetensors"  # a LoRA run's trained tensors (its checkpoints hold no model.safetensors)
# A resumed run must keep what defines its model and data; length, LR, logging and checkpoint
# settings may change, and so may where and how fast the data is tokenised.
FIXED_ON_RESUME = ("model", "moe", "tokenizer", "data")
FREE_ON_RESUME = ("data.num_proc", "data.cache_dir")
FIXED_TRAIN_KEYS = ("train.seed", "train.lstm_stateful", "train.lora")  # the data order; what trains


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


def resolve(path: Path) -> tuple[Path, Path]:
    """(checkpoint directory, the directory with its config.yaml and tokenizer.json) for a run
    directory (its latest checkpoint), a checkpoint directory or an export bundle."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; give a run directory (runs/NAME) or a checkpoint directory")
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        raise CheckpointError(_transformers_directory(path))
    if (path / "model.safetensors").is_file() or (path / ADAPTER).is_file():
        if (path / "config.yaml").is_file():  # an exported bundle holds everything itself
            _check_bundle_format(path)
            return path, path
        return path, path.parent.parent
    found = latest(path)
    if found is None:
        if (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} holds a run that never saved a checkpoint; train it (moectl train {path} --resume)")
        raise CheckpointError(f"{path} is neither a run directory (config.yaml, checkpoints/) nor a checkpoint directory")
    return found, path


def _transformers_directory(path: Path) -> str:
    """Why a transformers model directory (config.json, no config.yaml) is not read, and what to give instead."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    use = f'load it in transformers with AutoModelForCausalLM.from_pretrained("{path}") and generate there'
    if isinstance(meta, dict) and meta.get("format") == BUNDLE_FORMATS["hf"]:
        source = meta.get("source_checkpoint") or "the run it was exported from"
        return (f"{path} is a transformers export (moectl export --format hf), which moectl's commands do not read: "
                f"give them the checkpoint it came from ({source}) or a safetensors bundle of it "
                f"(moectl export --format safetensors), or {use}")
    return (f"{path} is a transformers model directory (config.json, no config.yaml), which moectl's commands do "
            f"not read: give them a moectl run, checkpoint or safetensors bundle, or {use}")


def _check_bundle_format(path: Path) -> None:
    """A bundle written by a moectl whose bundle format this one does not read is one clear line."""
    try:
        fmt = json.loads((path / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return  # read_meta reports a missing or damaged meta.json
    if fmt is not None and fmt != BUNDLE_FORMATS["safetensors"]:
        raise CheckpointError(
            f"{path} is a bundle of format {fmt!r}, written by another moectl version; this one reads "
            f"{BUNDLE_FORMATS['safetensors']!r}: export it again from its run with this moectl"
        )


# ------------------------------------------------------------------------------------- writing


def metadata(cfg: Config, **fields: Any) -> dict[str, Any]:
    """meta.json of a checkpoint or an export: what made it, then the caller's fields."""
    return {
        "config_hash": config.config_hash(cfg),
        "moectl_version": __version__,
        "torch_version": torch.__version__,
        "source": runtime.source_version(),  # the code that trained it: commit, and whether it was modified
        "saved_at": time.time(),
        **fields,
    }


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (Path(directory) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def save(run_dir: Path, step: int, model: nn.Module, state: dict[str, Any], meta: dict[str, Any], keep_last: int,
         keep: Optional[int] = None, adapter: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last` (and step `keep`).
    `adapter`: a LoRA run's trained tensors, saved instead of the whole model."""
    from safetensors.torch import save_file, save_model

    final = step_dir(run_dir, step)
    if final.is_dir():  # this exact step is already saved (e.g. Ctrl-C right after a periodic save)
        return final
    with staged_directory(final) as tmp:
        if adapter is not None:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER), metadata={"step": str(step)})
        else:
            save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save(state, tmp / "state.pt")
        write_meta(tmp, {**meta, "step": step})
    prune(run_dir, keep_last, keep)
    return final


def mark_best(run_dir: Path, step: int) -> None:
    """Point `checkpoints/best` (a relative symlink, replaced atomically) at checkpoint `step`."""
    link = checkpoints_dir(run_dir) / BEST
    tmp = link.with_name(f".tmp-best-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(step_dir(run_dir, step).name, tmp)
    os.replace(tmp, link)


def prune(run_dir: Path, keep_last: int, keep: Optional[int] = None) -> None:
    """Delete all but the newest `keep_last` checkpoints (and step `keep`), and what killed saves
    left behind."""
    root = checkpoints_dir(run_dir)
    for old in root.glob(".tmp-*"):
        if not old.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(old, ignore_errors=True)
    for step, path in list_checkpoints(run_dir)[:-keep_last]:
        if step == keep:
            continue
        # Rename first: an interrupted delete must not leave a partial step_* behind.
        trash = root / f".tmp-trash-{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------- reading


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


def load_model(path: Path, model: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Load weights into `model`; every tensor must be present with the right shape. Tensors whose
    names start with one of `skip` are neither read nor expected (offloaded experts read their own)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load

    file = Path(path) / "model.safetensors"
    if quant.QUANT_KEY in _file_metadata(file):  # a quantised bundle (moectl quantize): dequantised here
        return _load_quantized(path, file, model)
    if skip:
        return _load_some(path, file, model, skip)
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


def holds_adapter(path: Path) -> bool:
    """A LoRA run's checkpoint (or a bundle of one): adapters beside, or instead of, the weights."""
    return (Path(path) / ADAPTER).is_file()


def load_adapter(path: Path, model: nn.Module) -> None:
    """Load a LoRA checkpoint's trained tensors into `model`, whose base is loaded and adapters
    attached: each tensor must exist in the model with its shape, and every adapter must be there."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(Path(path) / ADAPTER))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise _corrupt(path, ADAPTER, exc) from None
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if ".adapters." in f".{k}" and k not in state]
    if wrong or missing:
        detail = f"unexpected {wrong[:2]}" if wrong else f"missing {missing[:2]}"
        raise CheckpointError(f"checkpoint {path}: its adapters do not fit this model ({detail}); was it trained "
                              "with another train.lora?")
    model.load_state_dict(state, strict=False)


def _file_metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a corrupt file: the loader below gives the one-line error
        return {}


def _load_some(path: Path, file: Path, model: nn.Module, skip: tuple[str, ...]) -> None:
    """Read only the tensors not under `skip`; a tensor tied to a loaded one (stored once) counts as loaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise _corrupt(path, "model.safetensors", exc) from None
    own = model.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise CheckpointError(f"checkpoint {path} does not match this model ({shapes[0]}); was it trained with another config?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if not k.startswith(skip) and own[k].data_ptr() not in loaded]
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"checkpoint {path} does not match this model ({detail}); was it trained with another config?")


def _load_quantized(path: Path, file: Path, model: nn.Module) -> None:
    """Load a quantised weights file (common/quant.py), every tensor dequantised to the model's dtype."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
        state = quant.unpack(tensors, _file_metadata(file))
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise _corrupt(path, "model.safetensors (quantised)", exc) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(
            f"checkpoint {path} does not match this model ({detail[:160]}); was it trained with another config?"
        ) from None


def tensor_shape(path: Path, name: str) -> Optional[list[int]]:
    """The shape of one stored tensor (None if absent or unreadable; load_model reports why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
            if name in f.keys():
                return list(f.get_slice(name).get_shape())
            stored = json.loads((f.metadata() or {}).get(quant.QUANT_KEY, "{}")).get("tensors", {})
            return stored[name]["shape"] if name in stored else None  # a quantised tensor's own shape
    except Exception:  # a corrupt file: load_model gives the one-line error
        return None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or tampered pickles
        raise _corrupt(path, "state.pt", exc) from None


# ------------------------------------------------------------------------------ run directories


def run_directory(run: RunConfig) -> Path:
    """`<run.dir>/<run.name>`."""
    return Path(run.dir) / run.name


def _looks_like_a_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() or checkpoints_dir(run_dir).is_dir()


def resume_conflicts(saved: Config, cfg: Config) -> list[str]:
    """The changes from the run's saved config that resuming may not make."""
    return [
        f"{key}: {old!r} -> {new!r}"
        for key, (old, new) in config.changed(saved, cfg).items()
        if (key.split(".")[0] in FIXED_ON_RESUME and key not in FREE_ON_RESUME) or key in FIXED_TRAIN_KEYS
        or (key == "train.batch_size" and saved.train.lstm_stateful)  # it sets the streams
    ]


def finished(cfg: Config) -> Optional[str]:
    """For --resume: why there is nothing to train, when the run's latest checkpoint is at or past
    train.max_steps (said before any data is loaded), else None."""
    run_dir = run_directory(cfg.run)
    ckpt = latest(run_dir) if run_dir.is_dir() else None
    if ckpt is None or (step := read_meta(ckpt)["step"]) < cfg.train.max_steps:
        return None
    saved = run_dir / "config.yaml"
    if saved.is_file() and resume_conflicts(config.load(saved, saved=True), cfg):
        return None  # not this run: check_run_dir refuses the resume and says what changed
    return (f"--resume: {run_dir} is already finished at step {step} (train.max_steps={cfg.train.max_steps}), "
            f"nothing to train; to train it further, raise train.max_steps, e.g. moectl train {run_dir} --resume "
            f"--set train.max_steps={2 * step}")


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to clobber anything. Returns the checkpoint to resume from, or None to start at
    step 0: a new run, or with --resume a run of this config killed before its first checkpoint."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory; choose another run.dir or run.name")
    here = Path.cwd().resolve()
    if run_dir.resolve() in (here, *here.parents):
        raise CheckpointError(f"the run directory {run_dir} is the current directory or one of its parents; choose a run.dir")
    ckpt = latest(run_dir)
    saved_path = run_dir / "config.yaml"
    if resume:
        if ckpt is None and not saved_path.is_file():
            raise CheckpointError(
                f"--resume: no checkpoint in {checkpoints_dir(run_dir)} to resume; drop --resume to start a new run"
            )
        if not saved_path.is_file():
            raise CheckpointError(f"--resume: {saved_path} is missing, so the run's config is unknown")
        changed = resume_conflicts(config.load(saved_path, saved=True), cfg)
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run's in what defines the model or data ({'; '.join(changed)}); "
                "resume with the same settings, or start a new run with --run-name"
            )
        if ckpt is not None and not (run_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"--resume: {run_dir / 'tokenizer.json'} is missing; the run cannot be continued")
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):
        if not _looks_like_a_run(run_dir):
            raise CheckpointError(
                f"{run_dir} is not empty and does not look like a moectl run (no config.yaml or checkpoints/); "
                "moectl will not write into it or delete it: choose another run.dir or run.name"
            )
        if not overwrite:
            if ckpt is None:
                raise CheckpointError(
                    f"{run_dir} holds a run that never saved a checkpoint; pass --resume to start it again from "
                    "step 0, --overwrite to replace it, or --run-name NAME to start another run"
                )
            raise CheckpointError(
                f"{run_dir} already holds checkpoints up to {ckpt.name}; pass --resume to continue it, "
                "--overwrite to replace it, or --run-name NAME to start another run"
            )
    return None
