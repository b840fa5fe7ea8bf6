"""`moectl prune`: remove experts from every MoE layer of a trained model, chosen on calibration data.

Every MoE layer keeps the same number of experts (a config has one moe.num_experts, as the
Mixtral and Qwen2-MoE configs of the transformers export do): their stacked expert tensors,
router rows and balancing bias are sliced (MoELayer.prune_experts), and the routed output keeps
its trained scale (moe.routed_scaling `top_k` becomes the number it stood for). moe.top_k stays:
keeping fewer experts than a token uses is refused (soft routing's K is every expert left). A
mixture head's experts are not pruned. The criteria are in moe/prune.py; calibration routes the
batches eval would score (the run's validation split, or other data through --set data.*).

The result is a safetensors bundle (export.py) that eval, generate, route-stats and export read
as they read a run; its meta.json (`derived`) and model card record the criterion, the ratio,
the calibration data and the experts kept in each layer, by their ids in the source model.

`--json` keys: out, kind, summary, criterion, experts_kept, ratio_removed, calibration,
kept_expert_ids (per MoE layer), eval_loss_before, eval_loss_after (the run's validation
batches, before and after), seconds (choosing the experts), scores (frequency, reap: per MoE
layer, per expert) and naee_error (naee: per MoE layer, the kept subset's summed error).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moectl import config
from moectl.commands.evaluate import run as evaluate_run
from moectl.commands.evaluate import split_batches
from moectl.commands.export import check_target, export_bundle
from moectl.common import console
from moectl.common.errors import ConfigError
from moectl.models import build_model, moe_layers
from moectl.moe import prune as criteria
from moectl.services.loaded_model import LoadedModel


@dataclass
class Pruning:
    criterion: str
    kept: int  # experts per layer after pruning
    of: int  # experts per layer before
    keep: list[list[int]]  # per MoE layer, the source model's ids of the experts kept
    calibration: str  # what the criterion saw
    scores: list[list[float]] = field(default_factory=list)  # per layer, per expert (frequency, reap)
    naee_error: list[float] = field(default_factory=list)  # per layer, the chosen subset's summed error
    seconds: float = 0.0

    def card(self) -> dict:
        """What meta.json's `derived` and the model card say about it."""
        summary = f"pruned to {self.kept} of {self.of} experts per MoE layer by {self.criterion} (moectl prune)"
        return {"kind": "prune", "summary": summary, "criterion": self.criterion, "experts_kept": f"{self.kept} of {self.of} per MoE layer",
                "ratio_removed": round(1 - self.kept / self.of, 4), "calibration": self.calibration,
                "kept_expert_ids": self.keep}


def _calibrate(loaded: LoadedModel, criterion: str, kept: int, calib_batches: Optional[int]):
    """Route the calibration batches once, feeding each MoE layer's input and routing to the criterion."""
    layers = moe_layers(loaded.model)
    if criterion == "naee":
        try:
            observers = [criteria.SubsetSearch(layer, kept) for layer in layers]
        except ValueError as exc:
            raise ConfigError(f"--criterion naee: {exc}") from None
    else:
        observers = [criteria.LayerScores(layer.num_experts) for layer in layers]

    def hook(layer, observer):
        def seen(module, args, output):  # args: (x (N, D), positions, valid (N,) or None); output: (y, record)
            x, valid = args[0], args[2] if len(args) > 2 else None
            if criterion == "naee":
                observer.observe(layer, x if valid is None else x[valid])
            else:
                observer.observe(layer, x, output[1])
        return seen

    blocks, _, batches = split_batches(loaded, "validation", calib_batches)
    handles = [layer.register_forward_hook(hook(layer, obs)) for layer, obs in zip(layers, observers)]
    try:
        with torch.no_grad():
            for i, ids in enumerate(batches):
                x, _ = blocks.batch(ids)
                layout = {k: v.to(loaded.device) for k, v in blocks.layout(ids).items()}
                loaded.model(x.to(loaded.device), **layout)
                if criterion == "naee":  # the search runs inside the forward passes: say where it is
                    console.status(f"naee: calibration batch {i + 1}/{len(batches)} searched")
    finally:
        for h in handles:
            h.remove()
    d = loaded.cfg.data
    source = {"hub": d.name, "files": d.data_files, "disk": d.path, "stdlib": "the Python standard library"}[d.source]
    return observers, (f"{len(batches)} batches of {loaded.cfg.train.micro_batch} x {d.seq_len} tokens from the "
                       f"validation split of {source}")


def choose(loaded: LoadedModel, criterion: str, keep: Optional[int], ratio: Optional[float],
           calib_batches: Optional[int] = None, seed: int = 0) -> Pruning:
    """Which experts each MoE layer keeps, by `criterion` (moe/prune.py)."""
    layers = moe_layers(loaded.model)
    if not layers:
        raise ConfigError(f"{loaded.run_dir} is a dense model: it has no MoE layers to prune")
    if criterion not in criteria.CRITERIA:
        raise ConfigError(f"--criterion {criterion!r}: choose {', '.join(criteria.CRITERIA[:-1])} or {criteria.CRITERIA[-1]}")
    e, router = layers[0].num_experts, layers[0].router
    try:
        kept = criteria.keep_count(e, keep, ratio)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not router.min_experts <= kept <= e:
        raise ConfigError(f"keep {kept} of {e} experts: keep at least {router.min_experts} and at most all")
    if kept % router.groups:
        raise ConfigError(f"keep {kept} of {e} experts: the router's {router.groups} groups each keep as many, so keep a "
                          f"multiple of {router.groups}")
    if router.pruned_top_k(kept) < router.top_k and loaded.cfg.moe.router != "soft":  # soft: K is every expert
        need = next(m for m in range(router.groups, e + 1, router.groups) if router.pruned_top_k(m) >= router.top_k)
        raise ConfigError(f"keep {kept} of {e} experts leaves fewer than moe.top_k={router.top_k} to route each token to "
                          f"(moe.router={loaded.cfg.moe.router}); keep at least {need}, so the pruned model still uses "
                          "as many experts per token")
    start = time.perf_counter()
    if criterion == "random":
        keep_ids = [criteria.random_subset(e, kept, router.groups, seed + i) for i in range(len(layers))]
        return Pruning(criterion, kept, e, keep_ids, f"none (seed {seed})", seconds=time.perf_counter() - start)
    observers, calibration = _calibrate(loaded, criterion, kept, calib_batches)
    result = Pruning(criterion, kept, e, [], calibration)
    for obs in observers:
        if criterion == "naee":
            subset, error = obs.best()
            result.keep.append(subset)
            result.naee_error.append(error)
        else:
            scores = obs.scores(criterion)
            result.keep.append(criteria.best_per_group(scores, kept, router.groups))
            result.scores.append([float(s) for s in scores])
    result.seconds = time.perf_counter() - start
    return result


def own_data(loaded: LoadedModel) -> LoadedModel:
    """The model with its run's own config: its data, not the calibration data of --set data.*."""
    return dataclasses.replace(loaded, cfg=config.load(loaded.run_dir / "config.yaml", saved=True))


def apply(loaded: LoadedModel, pruning: Pruning) -> LoadedModel:
    """The pruned model, rebuilt from its own config (so what is saved loads as any run does)."""
    cfg = own_data(loaded).cfg
    first = moe_layers(loaded.model)[0]
    values = {"moe.num_experts": pruning.kept, "moe.top_k": first.router.pruned_top_k(pruning.kept)}
    if cfg.moe.routed_scaling == "top_k":  # the scale the layers were trained with, which K no longer gives
        values["moe.routed_scaling"] = first.routed_scale
    cfg = config.with_values(cfg, "moectl prune", **values)
    surgery = copy.deepcopy(loaded.model)
    for layer, keep in zip(moe_layers(surgery), pruning.keep):
        layer.prune_experts(keep)
    model = build_model(cfg.model, cfg.moe, loaded.tokenizer.get_vocab_size(), cfg.train.objective)
    model.load_state_dict(surgery.state_dict(), strict=True)  # every tensor present with its pruned shape
    model.to(loaded.device).eval()
    return dataclasses.replace(loaded, cfg=cfg, model=model)


def prune(loaded: LoadedModel, out: Path, criterion: str, keep: Optional[int] = None, ratio: Optional[float] = None,
          calib_batches: Optional[int] = None, seed: int = 0, overwrite: bool = False) -> tuple[Path, Pruning, dict]:
    """`moectl prune`: choose, apply, and write the bundle; returns it, the pruning, and the eval
    loss before and after on the run's validation batches."""
    loaded.refuse_adapters("prune")
    check_target(Path(out), overwrite)  # before any work
    pruning = choose(loaded, criterion, keep, ratio, calib_batches, seed)
    pruned = apply(loaded, pruning)
    before = evaluate_run(own_data(loaded)).loss
    path = export_bundle(pruned, out, overwrite=overwrite, derived=pruning.card())
    after = json.loads((path / "meta.json").read_text())["eval_loss"]  # export_bundle measured it, on the same batches
    return path, pruning, {"eval_loss_before": before, "eval_loss_after": after}
