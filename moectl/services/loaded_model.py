"""A saved model loaded and ready to use: what eval, route-stats, generate and export start from.

`load(path)` takes a run directory (its latest checkpoint), a checkpoint directory
(`runs/NAME/checkpoints/step_NNNNNN`, whose run directory holds config.yaml and tokenizer.json),
or a bundle from `moectl export` (all of them in one directory), and returns a `LoadedModel`:
the config, the model with its weights on its device in eval mode, and the tokenizer. Anything
missing or mismatched is one clear error; nothing is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from moectl import config
from moectl.common import console, runtime
from moectl.common.errors import CheckpointError, ConfigError
from moectl.config import Config, ModelConfig, MoEConfig, TrainConfig
from moectl.data import tokenizer as tokenizers_
from moectl.models import LanguageModel, build_model, lookahead, lora, moe_layers, moe_slots, routed_experts
from moectl.services import checkpoint, warmstart
from moectl.services.offload import Offload, attach

# What a user may change when measuring a trained model: which data, and how capacity behaves.
OVERRIDABLE = ("data.", "train.eval_batches", "train.micro_batch_size", "train.device", "train.precision",
               "moe.eval_capacity_factor")


@dataclass
class LoadedModel:
    cfg: Config
    model: LanguageModel
    tokenizer: Tokenizer
    checkpoint: Path
    run_dir: Path
    step: int
    device: torch.device
    derived: list[dict] = field(default_factory=list)  # what made this model from a trained one (meta.json)
    lora_base: Optional[Path] = None  # a LoRA run's checkpoint: the base its adapters adapt

    @property
    def slots(self) -> list[int]:
        """The slot of each routing record: MoE layers by FFN slot, then a mixture head's gate."""
        return moe_slots(self.model)

    @property
    def experts(self) -> list[int]:
        """The experts behind each routing record."""
        return routed_experts(self.model)

    @property
    def adapters(self) -> Optional[str]:
        """A LoRA run's adapters in words, with the base they adapt (None for a model without them)."""
        if not lora.adapted(self.model):
            return None
        cfg = self.cfg.train.lora
        base = f", over the base {self.lora_base}" if self.lora_base else ", over the base in this bundle"
        return f"LoRA rank {cfg.rank} (alpha {cfg.alpha:g}) on {', '.join(cfg.targets or [])}{base}"

    def refuse_adapters(self, command: str) -> None:
        """`command` (prune, quantize) works on plain weights: a LoRA run is merged first."""
        if self.adapters:
            raise ConfigError(f"moectl {command}: {self.checkpoint} holds LoRA adapters; merge them first (moectl export "
                              f"{self.checkpoint} --merge-lora --out DIR), then {command} DIR")

    def skip_weak_experts(self, beta: Optional[float]) -> None:
        """NAEE's dynamic skipping in every MoE layer (moe/record.py skip_weak): a token's choices
        weighted below beta times its first choice's are not computed. None or 0: off."""
        if beta is not None and not 0 <= beta <= 1:
            raise ConfigError(f"--skip-threshold {beta}: choose a beta in [0, 1] (0: skip nothing; 1: keep only "
                              "each token's first choice, ties aside)")
        for layer in moe_layers(self.model):
            layer.skip_threshold = beta or None

    def warn_about_lookahead(self) -> None:
        """Say so when this model's routing sees later tokens (train says it too)."""
        for warning in lookahead(self.cfg.model, self.cfg.moe, training=False):
            console.warn(warning)


def load(path: Path, overrides: Optional[list[str]] = None, offload: Optional[Offload] = None) -> LoadedModel:
    """The model saved at `path`, with `overrides` (data and eval settings only) applied; with
    `offload`, its routed experts stay in the file behind a cache of K per layer (offload.py)."""
    ckpt, run_dir = checkpoint.resolve(path)
    cfg_file, tok_file = run_dir / "config.yaml", run_dir / "tokenizer.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing, so the model's config is unknown; the checkpoint cannot be used")
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file} is missing; the checkpoint's tokenizer is needed to read and write text")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(
                f"--set {key}: only data.*, moe.eval_capacity_factor, train.eval_batches, train.micro_batch_size, "
                "train.device and train.precision can change for a trained model"
            )
    cfg = config.load(cfg_file, overrides, saved=True)
    tok = tokenizers_.load_file(tok_file)
    meta = checkpoint.read_meta(ckpt)
    rows = checkpoint.tensor_shape(ckpt, "embed.weight")
    if rows is not None and rows[0] != tok.get_vocab_size():
        raise CheckpointError(
            f"{tok_file} has {tok.get_vocab_size()} tokens but the checkpoint's embedding has {rows[0]} rows: "
            "the tokenizer does not belong to this checkpoint; restore the run's own tokenizer.json"
        )
    dev = runtime.pick_device(cfg.train.device)
    skip: tuple[str, ...] = ()
    if offload is not None:
        if not cfg.model.is_moe:
            raise ConfigError(f"--offload-experts: {run_dir} is a dense model; it has no experts to offload")
        if meta.get("dtype") == "quantised":
            raise ConfigError(f"--offload-experts: {ckpt} is quantised; offload the unquantised run or bundle")
        per_token = cfg.moe.top_k * (cfg.moe.group_top_k if cfg.moe.router == "hierarchical" else 1)
        offload.check(cfg.moe.num_experts, cfg.moe.num_experts if cfg.moe.router == "soft" else per_token)
    model = build_model(cfg.model, cfg.moe, tok.get_vocab_size(), cfg.train.objective,
                        expert_device="meta" if offload is not None else None)
    if offload is not None:
        skip = tuple(attach(model, ckpt / "model.safetensors", offload, dev))
    if checkpoint.holds_adapter(ckpt):
        _load_adapted(model, cfg.model, cfg.moe, cfg.train, ckpt, meta, offload)
    else:
        checkpoint.load_model(ckpt, model, skip)
    model.to(dev).eval()
    base = (meta.get("lora_base") or {}).get("path") if checkpoint.holds_adapter(ckpt) else None
    return LoadedModel(cfg=cfg, model=model, tokenizer=tok, checkpoint=ckpt, run_dir=run_dir, step=meta["step"], device=dev,
                       derived=list(meta.get("derived") or []), lora_base=Path(base) if base else None)


def _load_adapted(model: LanguageModel, model_cfg: ModelConfig, moe: MoEConfig, tr: TrainConfig, ckpt: Path, meta: dict,
                  offload: Optional[Offload]) -> None:
    """A LoRA run's model: its base (a bundle's own weights, or the checkpoint's recorded base, which
    must be unchanged), then its adapters."""
    if offload is not None:
        raise ConfigError(f"--offload-experts: {ckpt} holds LoRA adapters; merge them first "
                          f"(moectl export {ckpt} --merge-lora --out DIR) and offload DIR")
    if (ckpt / "model.safetensors").is_file():  # a bundle: base and adapters together
        checkpoint.load_model(ckpt, model)
    else:
        base = meta.get("lora_base") or {}
        if not base.get("path") or not Path(base["path"]).exists():
            raise CheckpointError(f"{ckpt} holds LoRA adapters on the base {base.get('path')}, which is missing; "
                                  "restore it, or use a bundle that holds both (moectl export, with or without --merge-lora)")
        if warmstart.base_reference(base["path"])["sha256"] != base.get("sha256"):
            raise CheckpointError(f"{ckpt} holds LoRA adapters trained on {base['path']}, which has changed since "
                                  "(its sha256 differs); the adapters do not belong to it any more")
        warmstart.initialize(model, model_cfg, moe, tr.model_copy(update={"init_from": base["path"]}))
    lora.attach(model, tr)
    checkpoint.load_adapter(ckpt, model)


def check_layer(loaded: LoadedModel, layer: int) -> int:
    """Index into the routing records of MoE layer `layer` (numbered by FFN slot, as in TensorBoard)."""
    slots = loaded.slots
    if not slots:
        raise ConfigError(f"{loaded.run_dir} is a dense model: it has no MoE layers to show")
    if layer not in slots:
        raise ConfigError(f"layer {layer} is not an MoE layer of this model; its MoE layers are {slots}")
    return slots.index(layer)
