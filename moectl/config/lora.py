"""The `train.lora` subsection (LoRAConfig): low-rank adapters on a frozen base model, and the rules
on its keys alone. What each target adapts is in moectl/models/lora.py."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from .section import Section

# What LoRA can adapt, defined once: validation, `moectl config` and models/lora.py use it.
LORA_TARGETS = ("attention", "experts", "shared_experts", "dense_ffn", "router", "lstm", "head")


class LoRAConfig(Section):
    """Low-rank adapters (Hu et al. 2021): the base weights stay frozen, W + (alpha / rank) A B trains."""

    rank: Optional[int] = Field(
        None, gt=0, description="The adapters' rank r. Null: no LoRA (the whole model trains, as train.freeze allows)."
    )
    alpha: Optional[float] = Field(
        None, gt=0, description="The update is scaled by alpha / rank (Hu et al.). Null: 2 * rank, a scale of 2."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input (their low-rank path only), as PEFT's lora_dropout."
    )
    targets: Optional[list[Literal[LORA_TARGETS]]] = Field(
        None,
        description="What trains. `attention`: q, k, v, o projections; `experts`: every routed expert's three "
        "matrices, stacked; `shared_experts`, `dense_ffn`: those FFNs' matrices; `lstm`: the LSTMs' input and "
        "recurrent matrices; `head`: the linear output head (tied to the embedding, the head alone); `router`: the routers train in full (never low-rank). "
        "Everything not listed stays frozen. Null: attention (or lstm), experts, shared_experts and dense_ffn, as the "
        "model has them; routers frozen.",
    )
    experts_rank_per_expert: bool = Field(
        True,
        description="`experts`: each expert its own rank-r adapter (E times the parameters); false: one adapter "
        "per layer, shared by all its experts.",
    )

    @field_validator("targets")
    @classmethod
    def _targets_once(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            if not value:
                raise ValueError("must name at least one target, or be null for the default targets")
            twice = sorted({t for t in value if value.count(t) > 1})
            if twice:
                raise ValueError(f"lists {', '.join(twice)} more than once")
        return value

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def routers_train(self) -> bool:
        """Whether the routers learn (their expert bias included): always without LoRA; with it, when targeted."""
        return not self.enabled or "router" in (self.targets or [])

    @property
    def scale(self) -> float:
        """alpha / rank: what the low-rank update is multiplied by."""
        assert self.rank is not None
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank
