"""Model registry: `build_model(cfg, vocab_size)` and `build_moe_layer(cfg)` read the config; the
modules they build take plain arguments. Also what callers ask of a built model: its MoE layers,
their FFN slots, and its total and active parameter counts."""

from __future__ import annotations

from torch import nn

from moectl.config import Config
from moectl.models.base import LanguageModel, ModelOutput
from moectl.models.layers import FeedForward, FFNSlot
from moectl.models.lstm_moe import LSTMMoE
from moectl.models.transformer_moe import TransformerMoE
from moectl.moe import MoELayer, make_router

__all__ = ["LanguageModel", "ModelOutput", "build_model", "moe_layers", "moe_slots", "parameter_counts"]


def build_moe_layer(cfg: Config, impl: str = "sorted") -> MoELayer:
    """One MoE layer as the config describes it; `impl` picks the expert path (moe/layer.py)."""
    m, moe = cfg.model, cfg.moe
    router_std = m.init_std if moe.router_init_std is None else moe.router_init_std
    router = make_router(
        moe.router,
        m.d_model,
        moe.num_experts,
        moe.top_k,
        renormalize=moe.renormalize,
        init_std=router_std,
        capacity_factor=moe.capacity_factor,
        jitter_eps=moe.jitter_eps,
        num_groups=moe.num_groups,
        group_top_k=moe.group_top_k,
        bias_update_rate=moe.bias_update_rate,
        scaling=moe.routed_scaling,
    )
    eval_cf = moe.eval_capacity_factor
    return MoELayer(
        m.d_model,
        moe.num_experts,
        moe.top_k,
        cfg.expert_hidden,
        m.activation,
        capacity_factor=moe.capacity_factor,
        init_std=m.init_std,
        router=router,
        eval_capacity_factor="train" if eval_cf is None else None if eval_cf == "dropless" else eval_cf,
        min_capacity=moe.min_capacity,
        drop_policy=moe.drop_policy,
        shared_hidden=moe.shared_experts * (moe.shared_expert_hidden or cfg.expert_hidden),
        shared_gate=moe.shared_expert_gate,
        expert_dropout=moe.expert_dropout,
        impl=impl,
    )


def build_model(cfg: Config, vocab_size: int) -> LanguageModel:
    m, moe = cfg.model, cfg.moe

    def make_ffn(slot: int) -> FFNSlot:
        # Slot i is an MoE layer when (i + 1) % every == 0: every=2 gives dense, MoE, dense, MoE...
        if cfg.is_moe and (slot + 1) % moe.every == 0:
            return FFNSlot(build_moe_layer(cfg))
        return FFNSlot(FeedForward(m.d_model, m.ffn_hidden, m.activation, m.init_std))

    common = dict(
        vocab_size=vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        make_ffn=make_ffn,
        dropout=m.dropout,
        tie_embeddings=m.tie_embeddings,
        loss_coefs=moe.loss_coefs,
        init_std=m.init_std,
    )
    if cfg.backbone == "transformer":
        return TransformerMoE(n_heads=m.n_heads, rope_theta=m.rope_theta, norm_eps=m.norm_eps, **common)
    return LSTMMoE(residual=m.lstm_residual, **common)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): an MoE layer's routed experts count active_experts / E of their parameters."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    inactive = 0.0
    for layer in moe_layers(model):
        experts = sum(p.numel() for p in layer.experts.parameters())
        inactive += experts * (1.0 - min(layer.active_experts, layer.num_experts) / layer.num_experts)
    return total, total - round(inactive)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers in the order the model returns routing records."""
    return [slot.inner for slot in model.modules() if isinstance(slot, FFNSlot) and slot.is_moe]


def moe_slots(model: nn.Module) -> list[int]:
    """FFN-slot indices that hold MoE layers, in the order the model returns routing records."""
    slots = [m for m in model.modules() if isinstance(m, FFNSlot)]
    return [i for i, slot in enumerate(slots) if slot.is_moe]
