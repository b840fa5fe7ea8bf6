"""Model registry: `build_model(cfg, vocab_size)` reads the config; the modules take plain arguments."""

from __future__ import annotations

from torch import nn

from moectl.config import Config
from moectl.models.base import LanguageModel, ModelOutput
from moectl.models.layers import FeedForward, FFNSlot
from moectl.models.lstm_moe import LSTMMoE
from moectl.models.transformer_moe import TransformerMoE
from moectl.moe import MoELayer

__all__ = ["LanguageModel", "ModelOutput", "build_model", "moe_slots", "parameter_counts"]


def build_model(cfg: Config, vocab_size: int) -> LanguageModel:
    m, moe = cfg.model, cfg.moe

    def make_ffn(slot: int) -> FFNSlot:
        # Slot i is an MoE layer when (i + 1) % every == 0: every=2 gives dense, MoE, dense, MoE...
        if cfg.is_moe and (slot + 1) % moe.every == 0:
            return FFNSlot(
                MoELayer(
                    m.d_model,
                    moe.num_experts,
                    moe.top_k,
                    cfg.expert_hidden,
                    m.activation,
                    renormalize=moe.renormalize,
                    capacity_factor=moe.capacity_factor,
                    init_std=m.init_std,
                )
            )
        return FFNSlot(FeedForward(m.d_model, m.ffn_hidden, m.activation, m.init_std))

    common = dict(
        vocab_size=vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        make_ffn=make_ffn,
        dropout=m.dropout,
        tie_embeddings=m.tie_embeddings,
        aux_loss_coef=moe.aux_loss_coef,
        z_loss_coef=moe.z_loss_coef,
        init_std=m.init_std,
    )
    if cfg.backbone == "transformer":
        return TransformerMoE(n_heads=m.n_heads, rope_theta=m.rope_theta, norm_eps=m.norm_eps, **common)
    return LSTMMoE(residual=m.lstm_residual, **common)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): an MoE layer's experts count K/E of their parameters as active."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            experts = sum(p.numel() for p in layer.experts.parameters())
            inactive += experts * (layer.num_experts - layer.top_k) // layer.num_experts
    return total, total - inactive


def moe_slots(model: nn.Module) -> list[int]:
    """FFN-slot indices that hold MoE layers, in the order the model returns routing records."""
    slots = [m for m in model.modules() if isinstance(m, FFNSlot)]
    return [i for i, slot in enumerate(slots) if slot.is_moe]
