"""`moectl export --format safetensors`: a self-contained bundle of a trained model.

    DIR/model.safetensors   the weights, in fp32, bf16 or fp16
    DIR/config.yaml         the resolved config
    DIR/tokenizer.json      the tokenizer
    DIR/meta.json           what it is: format, source checkpoint, step, dtype, eval loss, versions
    DIR/README.md           a model card: architecture, parameters, data, quality, routing summary

eval, route-stats and generate accept the bundle as they accept a run. The bundle is written
into a hidden temporary directory beside DIR and renamed into place, so DIR is either complete
or absent; an existing DIR is never replaced unless it is itself a moectl bundle and
`overwrite` is set.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from moectl import __version__, config
from moectl.errors import CheckpointError, DataError
from moectl.fileio import staged_directory
from moectl.models import parameter_counts
from moectl.trained import Trained

BUNDLE_FORMAT = "moectl-safetensors-bundle-1"
FORMATS = {"safetensors": BUNDLE_FORMAT, "hf": "moectl-hf-export-1"}  # meta.json "format" of each export
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_bundle(path: Path) -> bool:
    """Whether `path` holds a moectl export (of either format): only those are ever replaced."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("format") in FORMATS.values()
    except (OSError, ValueError, AttributeError):
        return False


def mark_bundle(directory: Path, trained: Trained, dtype: str, fmt: str, **extra) -> dict:
    """Write meta.json: what the export is and where it came from."""
    from moectl import checkpoint

    meta_in = checkpoint.read_meta(trained.checkpoint)
    meta = {
        "format": FORMATS[fmt],
        "source_checkpoint": str(trained.checkpoint),
        "step": trained.step,
        "dtype": dtype,
        "tokens_seen": meta_in.get("tokens_seen", 0),
        "eval_loss": meta_in.get("eval_loss"),
        "config_hash": config.config_hash(trained.cfg),
        "moectl_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": time.time(),
        **extra,
    }
    (Path(directory) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"--out {out} is not empty; choose another directory, or pass --overwrite to replace a bundle")
        if not is_bundle(out):
            raise CheckpointError(f"--overwrite: {out} is not a moectl bundle (no meta.json of one); refusing to replace it")


def model_card(trained: Trained, meta: dict, eval_summary: Optional[dict], note: Optional[str]) -> str:
    cfg, m = trained.cfg, trained.cfg.model
    total, active = parameter_counts(trained.model)
    lines = [
        f"# {trained.run_dir.name}",
        "",
        f"A {m.arch} language model trained with moectl {__version__}, "
        f"exported from `{trained.checkpoint}` (step {trained.step}).",
        "",
        "## Architecture",
        "",
        f"- {m.arch}: {m.n_layers} layers, d_model {m.d_model}, activation {m.activation}, vocabulary {trained.tokenizer.get_vocab_size()}",
        f"- parameters: {total:,} total, {active:,} active per token",
    ]
    if cfg.is_moe:
        moe = cfg.moe
        lines.append(
            f"- MoE: {moe.num_experts} experts of hidden {cfg.expert_hidden}, router `{moe.router}`, top-{moe.top_k}, "
            f"every {moe.every} FFN slot(s), {moe.shared_experts} shared expert(s), capacity factor "
            f"{moe.capacity_factor if moe.capacity_factor is not None else 'none (dropless)'}"
        )
    d = cfg.data
    source = {"hub": f"Hugging Face dataset `{d.name}` ({d.config_name or 'default'})", "files": f"local files `{d.data_files}`",
              "disk": f"a saved dataset at `{d.path}`", "stdlib": "the Python standard library's sources"}[d.source]
    lines += ["", "## Training data", "", f"{source}, text column `{d.text_column}`, blocks of {d.seq_len} tokens; "
              f"{meta.get('tokens_seen', 0):,} tokens seen."]
    lines += ["", "## Quality", ""]
    if meta.get("eval_loss") is not None:
        loss = meta["eval_loss"]
        lines.append(f"Validation loss at export: {loss:.4f} nats/token (perplexity {math.exp(min(loss, 50)):.2f}).")
    if eval_summary is not None:
        lines.append(f"Bits per byte on the validation split: {eval_summary['bits_per_byte']:.4f}.")
    if eval_summary is not None and eval_summary["layers"]:
        lines += ["", "## Routing", "", "| layer | cv | max/mean | min/mean | entropy | dead experts | dropped |",
                  "|---|---|---|---|---|---|---|"]
        for s in eval_summary["layers"]:
            lines.append(f"| {s['slot']} | {s['cv']:.3f} | {s['max_over_mean']:.2f} | {s['min_over_mean']:.2f} | "
                         f"{s['load_entropy']:.3f} | {s['dead_experts']} | {100 * s['drop_fraction']:.2f}% |")
    if note:
        lines += ["", note]
    lines += ["", "## Use", "", "```bash", "moectl eval THIS_DIRECTORY", "moectl route-stats THIS_DIRECTORY",
              'moectl generate THIS_DIRECTORY --prompt "..."', "```", ""]
    return "\n".join(lines)


def export_bundle(trained: Trained, out: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the bundle (see the module docstring); returns its directory."""
    from safetensors.torch import save_model

    from moectl import evaluate

    out = Path(out)
    check_target(out, overwrite)
    try:  # the card's routing summary and bits per byte, from the run's own validation data
        summary, note = evaluate.run(trained).to_dict(), None
    except DataError as exc:
        summary, note = None, f"(No routing summary: the validation data could not be read at export: {exc})"
    with staged_directory(out) as tmp:
        # A cast copy keeps the source model exact (and its tied weights tied, stored once).
        model = trained.model if dtype == "fp32" else copy.deepcopy(trained.model).to(DTYPES[dtype])
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(trained.step)})
        os.chmod(tmp / "model.safetensors", 0o644)  # a bundle is for sharing
        config.save(trained.cfg, tmp / "config.yaml")
        shutil.copyfile(trained.run_dir / "tokenizer.json", tmp / "tokenizer.json")
        measured = {"eval_loss": summary["loss"], "bits_per_byte": summary["bits_per_byte"]} if summary else {}
        meta = mark_bundle(tmp, trained, dtype, "safetensors", **measured)
        (tmp / "README.md").write_text(model_card(trained, meta, summary, note))
    return out
