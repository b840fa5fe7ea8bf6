"""Model registry: `build_model(model, moe, vocab_size, objective)` and `build_moe_layer(model, moe)`
read the model and moe config sections; the modules they build take plain arguments. Also what
callers ask of a built model: its MoE layers, their FFN slots, and its total and active parameter
counts."""

from __future__ import annotations

from torch import nn

from moectl.config import ModelConfig, MoEConfig
from moectl.models.base import LanguageModel, ModelOutput
from moectl.models.head import MixtureHead
from moectl.models.layers import FeedForward, FFNSlot
from moectl.models.lstm_moe import LSTMMoE
from moectl.models.transformer_moe import TransformerMoE
from moectl.moe import MoELayer, make_router

__all__ = ["LanguageModel", "ModelOutput", "build_model", "is_router", "moe_layers", "moe_slots", "parameter_counts", "routed_experts"]


def build_moe_layer(model: ModelConfig, moe: MoEConfig, impl: str = "sorted", expert_device=None) -> MoELayer:
    """One MoE layer as the model and moe sections describe it; `impl` picks the expert path (moe/layer.py);
    `expert_device` "meta" leaves the experts' weights unmade (offloaded)."""
    router_std = model.init_std if moe.router_init_std is None else moe.router_init_std
    router = make_router(
        moe.router,
        model.d_model,
        moe.num_experts,
        moe.top_k,
        renormalize=moe.renormalize,
        init_std=router_std,
        capacity_factor=moe.capacity_factor,
        jitter_eps=moe.jitter_eps,
        num_groups=moe.num_groups,
        group_top_k=moe.group_top_k,
        bias_update_rate=moe.bias_update_rate,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
    )
    eval_cf = moe.eval_capacity_factor
    return MoELayer(
        model.d_model,
        moe.num_experts,
        moe.top_k,
        moe.expert_hidden,
        model.activation,
        capacity_factor=moe.capacity_factor,
        init_std=model.init_std,
        router=router,
        eval_capacity_factor="train" if eval_cf is None else None if eval_cf == "dropless" else eval_cf,
        min_capacity=moe.min_capacity,
        drop_policy=moe.drop_policy,
        shared_hidden=moe.shared_experts * (moe.shared_expert_hidden or moe.expert_hidden),
        shared_gate=moe.shared_expert_gate,
        expert_dropout=moe.expert_dropout,
        routed_scale=moe.routed_scale,
        impl=impl,
        expert_device=expert_device,
    )


def build_model(model: ModelConfig, moe: MoEConfig, vocab_size: int, objective: str = "likelihood",
                expert_device=None) -> LanguageModel:
    """The model the sections describe; `objective` is train.objective (how a mixture head trains);
    `expert_device` "meta": the routed experts get no weights (for offloading, services/offload.py)."""

    def make_ffn(slot: int) -> FFNSlot:
        if slot in moe.slots(model):
            return FFNSlot(build_moe_layer(model, moe, expert_device=expert_device))
        return FFNSlot(FeedForward(model.d_model, model.ffn_hidden, model.activation, model.init_std))

    common = dict(
        vocab_size=vocab_size,
        d_model=model.d_model,
        n_layers=model.n_layers,
        make_ffn=make_ffn,
        dropout=model.dropout,
        tie_embeddings=model.tie_embeddings,
        loss_coefs=moe.loss_coefs if model.is_moe else {},
        init_std=model.init_std,
        head_experts=model.head_experts if model.head == "mixture" else 0,
        objective=objective,
        balance_primary=moe.balance_primary,
    )
    if model.backbone == "transformer":
        return TransformerMoE(n_heads=model.n_heads, rope_theta=model.rope_theta, norm_eps=model.norm_eps, **common)
    return LSTMMoE(residual=model.lstm_residual, sigmoid=model.lstm_sigmoid, **common)


def lookahead(model: ModelConfig, moe: MoEConfig, training: bool) -> list[str]:
    """Why this model's routing can see later tokens of a causal LM (none for causal routing or a
    dense arch)."""
    if not model.is_moe:
        return []
    found = []
    if moe.router == "expert_choice":
        found.append(
            "moe.router=expert_choice: moectl generate and moectl export --format hf will refuse this model (a "
            "token-choice router such as moe.router=topk allows both). Each expert picks its tokens from the whole "
            "batch, so in this causal LM a token's routing depends on other tokens, later positions included: the "
            "loss is optimistic, and token-by-token generation cannot route as in training"
        )
    capacity = moe.capacity_factor if training or moe.eval_capacity_factor is None else moe.eval_capacity_factor
    capped = capacity not in (None, "dropless") and moe.router not in ("expert_choice", "soft")
    if moe.drop_policy == "probability" and capped:
        found.append(
            "moe.drop_policy=probability: which tokens an expert drops depends on the whole batch, later "
            "positions included, so the model can see the future through its drops"
        )
    if moe.drop_policy == "rank" and capped and moe.top_k > 1:
        found.append(
            f"moe.drop_policy=rank (GShard's order, the default of moe.router={moe.router}): every token's first choice "
            "is served before any second choice, so a later token's first choice can drop an earlier token's second "
            "and the model can see the future through its drops; moe.drop_policy=position keeps it causal"
        )
    return found


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): an MoE layer's routed experts count active_experts / E of their parameters."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    inactive = 0.0
    for layer in moe_layers(model):
        experts = sum(p.numel() for p in layer.experts.parameters())
        inactive += experts * (1.0 - min(layer.active_experts, layer.num_experts) / layer.num_experts)
    return total, total - round(inactive)


def is_router(name: str) -> bool:
    """A tensor of an MoE layer's router, or of a mixture head's gate, by its name in the model."""
    return ".router." in name or name.startswith("head.gate.")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers in the order the model returns routing records."""
    return [slot.inner for slot in model.modules() if isinstance(slot, FFNSlot) and slot.is_moe]


def moe_slots(model: nn.Module) -> list[int]:
    """The slot of each routing record the model returns, in order: the FFN-slot index of each MoE
    layer, then, for a mixture head, the slot after the last FFN slot (its gate)."""
    slots = [m for m in model.modules() if isinstance(m, FFNSlot)]
    head = [len(slots)] if isinstance(getattr(model, "head", None), MixtureHead) else []
    return [i for i, slot in enumerate(slots) if slot.is_moe] + head


def routed_experts(model: nn.Module) -> list[int]:
    """The number of experts behind each routing record, in the order of moe_slots."""
    head = getattr(model, "head", None)
    return [layer.num_experts for layer in moe_layers(model)] + ([head.num_experts] if isinstance(head, MixtureHead) else [])
