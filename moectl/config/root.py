"""The root of the typed tree: `Config`, whose fields are the sections, and SECTIONS (each section's
name -> its class). Config holds the rules that span sections, grouped by concern (MoE layers,
expert parallelism, task, objective), the one order in which every check runs, the section rules
included, and the paper defaults that fill null keys."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from .data import DataConfig, TokenizerConfig
from .model import ModelConfig
from .moe import LOSS_KEYS, PAPER_DROP_POLICY, PAPER_LOSSES, MoEConfig
from .run import CheckpointConfig, LogConfig, RunConfig
from .section import Section
from .lora import LoRAConfig
from .train import OptimConfig, TrainConfig


class Config(Section):
    """The whole config tree."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name and directory.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The backbone.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="The MoE layers.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation text.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    _trained: bool = PrivateAttr(False)  # read from a run's own config.yaml (see from_dict)
    # what load() set because an override changed moe.router (dotted key -> value; null: the paper's)
    _router_filled: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_field_checks(self, info: ValidationInfo) -> "Config":
        # One order for every check, the sections' own included: a config that breaks several rules
        # is told the first, so reordering these changes what such a config reports. The sections'
        # own rules are plain methods called from here, not validators on the sections, because
        # those would run before this one and change which error such a config is told.
        m, d, tr = self.model, self.data, self.train
        trained = bool(info.context and info.context.get("trained"))  # a run's own saved config
        m.check_depth()
        self._check_moe_layers(trained)
        d.check_validation_split()
        self._check_expert_parallel()
        self._check_task()
        m.check_attention()
        tr.check_micro_batch()
        self.tokenizer.check_one_source()
        d.check_source()
        tr.check_device()
        m.check_output_head()
        self._check_objective()
        self._check_lora()
        return self

    def _check_moe_layers(self, trained: bool) -> None:
        """An MoE arch's router fits its paper, and moe.every leaves it at least one MoE layer."""
        m, moe = self.model, self.moe
        if m.is_moe:
            moe.check_router(trained)
        if m.is_moe and moe.every > m.num_ffn_slots:
            raise ValueError(
                f"moe.every={moe.every} leaves {m.arch} with no MoE layer: it has {m.num_ffn_slots} FFN slots "
                f"(model.n_layers={m.n_layers}); lower moe.every, or use a *_dense arch for a dense model"
            )

    def _check_expert_parallel(self) -> None:
        """Expert parallelism shards experts the model has, and what acts on its groups has groups."""
        m, moe, tr = self.model, self.moe, self.train
        if tr.expert_parallel > 1:
            if not m.is_moe:
                raise ValueError(f"train.expert_parallel={tr.expert_parallel} shards experts, but model.arch={m.arch} has none")
            if moe.num_experts % tr.expert_parallel:
                raise ValueError(
                    f"train.expert_parallel={tr.expert_parallel} must divide moe.num_experts={moe.num_experts} "
                    "(each process holds an equal share of every layer's experts)"
                )
        tr.check_needs_expert_parallel()
        # After that check, so a shadow_experts count that gets here has expert_parallel > 1.
        if isinstance(tr.shadow_experts, int) and not 1 <= tr.shadow_experts <= moe.num_experts:
            raise ValueError(f"train.shadow_experts={tr.shadow_experts} must be in [1, moe.num_experts={moe.num_experts}]")
        tr.check_hardware()

    def _check_task(self) -> None:
        """State carried from block to block needs an LSTM and whole-text blocks; sft scores responses only."""
        m, d, tr = self.model, self.data, self.train
        if tr.lstm_stateful and m.backbone != "lstm":
            raise ValueError(f"train.lstm_stateful=true needs an LSTM (model.arch={m.arch} has no recurrent state)")
        if d.task == "sft":
            if tr.lstm_stateful:
                raise ValueError("train.lstm_stateful=true carries state from one block to the next, but data.task=sft "
                                 "examples are separate; set train.lstm_stateful=false")
            if tr.objective != "likelihood":
                raise ValueError(f"train.objective={tr.objective} (EM on a mixture head) scores every token; "
                                 "data.task=sft scores responses only: use train.objective=likelihood")
        d.check_sft_options()

    def _check_objective(self) -> None:
        if self.train.objective != "likelihood" and self.model.head != "mixture":
            raise ValueError(
                f"train.objective={self.train.objective} trains a mixture head by EM; set model.head=mixture"
            )

    def _check_lora(self) -> None:
        """LoRA adapts a base model's matrices that exist, at a rank they have, and owns what trains."""
        m, moe, tr, lora = self.model, self.moe, self.train, self.train.lora
        if not lora.enabled:
            idle = [k for k in ("alpha", "dropout", "targets", "experts_rank_per_expert")
                    if getattr(lora, k) != LoRAConfig.model_fields[k].default]
            if idle:
                raise ValueError(f"train.lora.{idle[0]} is set but train.lora.rank is null, so there is no LoRA: set "
                                 "train.lora.rank to turn it on, or drop the other train.lora keys")
            return
        if not tr.init_from:
            raise ValueError(f"train.lora.rank={lora.rank} adapts a trained model: set train.init_from to the run, "
                             "checkpoint or bundle to adapt")
        if tr.freeze != "none":
            raise ValueError(f"train.freeze={tr.freeze} and train.lora both choose what trains: with LoRA, "
                             "train.lora.targets does; set train.freeze=none")
        if tr.expert_parallel > 1:
            raise ValueError(f"train.expert_parallel={tr.expert_parallel}: LoRA adapters do not shard over "
                             "expert-parallel groups yet; set train.expert_parallel=1 (DDP alone)")
        available = lora_targets(m, moe)
        for target in lora.targets or []:
            if target not in available:
                raise ValueError(f"train.lora.targets: {target}: {_missing_target(target, m, moe)}")
        if lora.dropout and "lstm" in (lora.targets or available):
            raise ValueError("train.lora.dropout: the LSTM's adapters join its recurrent weights, so their input "
                             "cannot be dropped; set train.lora.dropout=0 or leave lstm out of train.lora.targets")
        for target in lora.targets or _default_targets(available):
            smallest = available[target]
            if smallest is not None and lora.rank > smallest:
                raise ValueError(f"train.lora.rank={lora.rank} is larger than the {target} matrices allow (their "
                                 f"smaller side is {smallest}); choose a rank <= {smallest}")

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Config":
        # Resolved here, so the config written to the run directory is explicit.
        m, moe = self.model, self.moe
        if m.activation is None:
            m.activation = "swiglu" if m.arch.startswith("transformer") else "relu"
        if moe.renormalize is None:
            moe.renormalize = moe.top_k > 1
        if moe.expert_hidden is None:
            moe.expert_hidden = m.ffn_hidden
        if moe.drop_policy is None:
            moe.drop_policy = PAPER_DROP_POLICY.get(moe.router, "position")
        paper = PAPER_LOSSES[moe.router] if m.is_moe else {}
        for key in LOSS_KEYS:
            if getattr(moe, key) is None:
                setattr(moe, key, paper.get(key, 0.0))
        lora = self.train.lora
        if lora.enabled and lora.targets is None:
            lora.targets = _default_targets(lora_targets(m, moe))
        if lora.enabled and lora.alpha is None:
            lora.alpha = 2.0 * lora.rank
        return self

    @property
    def router_filled(self) -> dict[str, Any]:
        """What load() set because an override changed moe.router (dotted key -> value set; null:
        the new router's paper value); empty otherwise."""
        return self._router_filled


def lora_targets(m: ModelConfig, moe: MoEConfig) -> dict[str, Optional[int]]:
    """The LoRA targets this model has, each with the smaller side of its matrices (None: not low-rank)."""
    slots = m.num_ffn_slots
    moe_slots = len(moe.slots(m)) if m.is_moe else 0
    found: dict[str, Optional[int]] = {}
    if m.backbone == "transformer":
        found["attention"] = m.d_model
    else:
        found["lstm"] = m.d_model
    if m.is_moe:
        found["experts"] = min(m.d_model, moe.expert_hidden or m.ffn_hidden)
        if moe.shared_experts:
            found["shared_experts"] = min(m.d_model, moe.shared_experts * (moe.shared_expert_hidden or moe.expert_hidden
                                                                           or m.ffn_hidden))
        found["router"] = None
    if moe_slots < slots:
        found["dense_ffn"] = min(m.d_model, m.ffn_hidden)
    if m.head == "linear":  # tied to the embedding, the adapter changes the head alone
        found["head"] = m.d_model
    return found


def _default_targets(available: dict[str, Optional[int]]) -> list[str]:
    return [t for t in ("attention", "lstm", "experts", "shared_experts", "dense_ffn") if t in available]


def _missing_target(target: str, m: ModelConfig, moe: MoEConfig) -> str:
    """Why this model has no such target, and what to do."""
    if target in ("attention", "lstm"):
        return f"model.arch={m.arch} has no {target} ({'a Transformer' if target == 'attention' else 'an LSTM'} has)"
    if target in ("experts", "router"):
        return f"model.arch={m.arch} is dense: it has no {target}; adapt dense_ffn instead"
    if target == "shared_experts":
        return "this model has no shared experts (moe.shared_experts=0)"
    if target == "dense_ffn":
        return "every FFN slot of this model is an MoE layer (moe.every=1); adapt experts instead"
    return f"model.head={m.head}: only a linear head takes an adapter"


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation for name, field in Config.model_fields.items()  # type: ignore[misc]
}

