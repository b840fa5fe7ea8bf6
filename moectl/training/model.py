"""The model as the loop trains it: built from its config sections, warm-started, given LoRA
adapters or frozen where train.lora or train.freeze say, its experts sharded over expert-parallel
groups, on its device."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moectl.common import console, perf_model
from moectl.common.errors import CheckpointError
from moectl.common.runtime import Dist
from moectl.config import ModelConfig, MoEConfig, TrainConfig
from moectl.models import LanguageModel, build_model, lookahead, lora, parameter_counts
from moectl.services import checkpoint, expert_parallel, warmstart
from moectl.services.expert_parallel import ExpertParallel
from moectl.training.state import seed_rank


def build(model_cfg: ModelConfig, moe: MoEConfig, tr: TrainConfig, vocab_size: int, dp: Dist, device: torch.device,
          warm_start: bool) -> tuple[LanguageModel, tuple[int, int], Optional[ExpertParallel]]:
    """(the model on `device`, its (total, active per token) parameters counted before sharding,
    this rank's expert-parallel groups or None). `warm_start`: load train.init_from into it."""
    # Every rank builds the same initial model (on the CPU, so that a device only ever holds its
    # share of the experts); DDP keeps the replicated parameters equal.
    torch.manual_seed(tr.seed)
    model = build_model(model_cfg, moe, vocab_size, tr.objective)
    if warm_start or tr.lora.enabled:  # a LoRA run's checkpoints hold its adapters alone: the base, also on resume
        console.status(warmstart.initialize(model, model_cfg, moe, tr))
    params = parameter_counts(model)
    if tr.lora.enabled:
        trainable = lora.attach(model, tr)
        console.status(lora.describe(tr, trainable, sum(p.numel() for p in model.parameters())))
    frozen = warmstart.freeze(model, tr.freeze)
    if frozen:
        console.status(f"train.freeze={tr.freeze}: {console.human(frozen)} parameters stay as they are")
    ep = expert_parallel.shard(model, tr.expert_parallel, dp, tr.shadow_experts, perf_model.hardware(tr.hardware, device.type),
                               tr.ep_overlap)
    model = model.to(device)
    if dp.enabled:
        seed_rank(tr.seed, dp)
    for warning in lookahead(model_cfg, moe, training=True):
        console.warn(warning)
    return model, params, ep


def tokenizer_file(run_dir: Path, resume_from: Optional[Path], init_from: Optional[str]) -> Optional[Path]:
    """The tokenizer.json the model's vocabulary comes from: the run's own when it resumes,
    train.init_from's when it fine-tunes; None for a new run, which gets its tokenizer from the data."""
    return run_dir / "tokenizer.json" if resume_from else warmstart.source_tokenizer(init_from)


class CheckpointWeights:
    """What a checkpoint keeps of the model, and how a resume puts it back: the whole model
    (model.safetensors), or for a LoRA run its trained tensors alone (adapter.safetensors) with
    its base's path and sha256 in meta.json; the base itself is loaded by `build`, and a resume
    refuses a base that is not the one the adapters were trained on."""

    def __init__(self, model: LanguageModel, tr: TrainConfig):
        self.model, self.targets = model, tr.lora.targets or []
        self.base = warmstart.base_reference(tr.init_from) if tr.lora.enabled else None

    def meta(self) -> dict:
        """The fields meta.json records of the weights."""
        return {"lora_base": self.base} if self.base is not None else {}

    def adapter(self) -> Optional[dict]:
        """A LoRA run's tensors to save instead of the model (None: the whole model)."""
        return lora.trained_state(self.model, self.targets) if self.base is not None else None

    def load(self, ckpt: Path, meta: dict) -> None:
        if self.base is None:
            checkpoint.load_model(ckpt, self.model)
            return
        theirs = meta.get("lora_base") or {}
        if theirs.get("sha256") != self.base["sha256"]:
            raise CheckpointError(
                f"--resume: the base model changed since {ckpt} was saved (train.init_from resolves to "
                f"{self.base['path']}, sha256 {self.base['sha256'][:12]}; the adapters were trained on "
                f"{theirs.get('path')}, sha256 {str(theirs.get('sha256'))[:12]}); restore that base, or start a new run"
            )
        checkpoint.load_adapter(ckpt, self.model)
