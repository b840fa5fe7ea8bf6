"""LoRA on a built model: which weights train.lora's targets adapt, attaching their adapters
(moe/adapter.py), what trains, and merging the adapters into the weights.

Targets (config/lora.py LORA_TARGETS) and the weights each adapts:
  attention       q_proj, k_proj, v_proj, o_proj of every block (layers.Linear)
  experts         every MoE layer's routed experts: w_up, w_gate, w_down, stacked (E, in, out),
                  one pair per expert (E, in, r), (E, r, out) or one shared by all (1, ., .)
  shared_experts  every MoE layer's shared-expert FFN: w_up, w_gate, w_down
  dense_ffn       every dense FFN slot's FFN: w_up, w_gate, w_down
  lstm            every LSTM's weight_ih_l0 and weight_hh_l0 (input and recurrent matrices)
  head            the linear output head (lm_head); tied to the embedding, the adapter changes the
                  head alone (merging unties them)
  router          no adapter: the routers (and a mixture head's gate) train in full
Everything else is frozen. An adapter lives beside its weight, as `<module>.adapters.<weight>`
(`blocks.0.ffn.inner.experts.adapters.w_up.A`), so the base's tensor names do not change.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from moectl.config import TrainConfig
from moectl.models import is_router
from moectl.models.layers import CausalSelfAttention, FFNSlot, Linear
from moectl.moe import MoELayer
from moectl.moe.adapter import Adapter
from moectl.moe.experts import FeedForward, GroupedExperts

FFN_WEIGHTS = ("w_up", "w_gate", "w_down")
LSTM_WEIGHTS = ("weight_ih_l0", "weight_hh_l0")


def _sites(model: nn.Module, target: str) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """(module, the names of its weights to adapt) for each place `target` adapts."""
    for module in model.modules():
        if target == "attention" and isinstance(module, CausalSelfAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                yield proj, ("weight",)
        elif target == "experts" and isinstance(module, MoELayer):
            yield module.experts, FFN_WEIGHTS
        elif target == "shared_experts" and isinstance(module, MoELayer) and module.shared is not None:
            yield module.shared, FFN_WEIGHTS
        elif target == "dense_ffn" and isinstance(module, FFNSlot) and not module.is_moe:
            yield module.inner, FFN_WEIGHTS
        elif target == "lstm" and isinstance(module, nn.LSTM):
            yield module, LSTM_WEIGHTS
    if target == "head" and isinstance(getattr(model, "lm_head", None), Linear):
        yield model.lm_head, ("weight",)


def _adapter(module: nn.Module, name: str, rank: int, scale: float, dropout: float, per_expert: bool) -> Adapter:
    """The adapter of `module`'s weight `name`, on its device and in its dtype."""
    w = getattr(module, name)
    if isinstance(module, GroupedExperts):  # (E, in, out)
        adapter = Adapter(w.shape[1], w.shape[2], rank, scale, dropout, experts=w.shape[0] if per_expert else 1)
    elif isinstance(module, FeedForward):  # (in, out)
        adapter = Adapter(w.shape[0], w.shape[1], rank, scale, dropout)
    else:  # nn.Linear, nn.LSTM: (out, in)
        adapter = Adapter(w.shape[1], w.shape[0], rank, scale, dropout, transposed=True)
    return adapter.to(device=w.device, dtype=w.dtype)


def attach(model: nn.Module, tr: TrainConfig) -> int:
    """Give every weight of train.lora's targets an adapter, and freeze all but the adapters (and the
    routers, when targeted); returns the trainable parameter count."""
    lora = tr.lora
    targets = lora.targets or []
    for target in targets:
        for module, names in _sites(model, target):
            module.adapters = nn.ModuleDict(
                {n: _adapter(module, n, lora.rank, lora.scale, lora.dropout, lora.experts_rank_per_expert)
                 for n in names if getattr(module, n) is not None})
    trainable = 0
    for name, p in model.named_parameters():
        train = ".adapters." in f".{name}" or ("router" in targets and is_router(name))
        p.requires_grad_(train)
        trainable += p.numel() if train else 0
    return trainable


def adapted(model: nn.Module) -> bool:
    return any(getattr(m, "adapters", None) is not None for m in model.modules())


def trained_state(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """What a LoRA run changes, by name: the adapters, and the routers' tensors (parameters and
    buffers, e.g. an expert bias) when they train. A LoRA checkpoint holds these alone."""
    return {name: t for name, t in model.state_dict().items()
            if ".adapters." in f".{name}" or ("router" in targets and is_router(name))}


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """The model without its adapters inside the block: the base (routers as trained), to save or export alone."""
    held = [(m, m.adapters) for m in model.modules() if getattr(m, "adapters", None) is not None]
    for m, _ in held:
        m.adapters = None
    try:
        yield model
    finally:
        for m, adapters in held:
            m.adapters = adapters


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every adapter into its weight (W + s A B) and remove it; the model then computes what it
    computed with them (up to rounding). A head tied to the embedding is untied first (its adapter
    changed the head alone): the caller sets model.tie_embeddings=false. Returns the weights merged."""
    head = getattr(model, "lm_head", None)
    if head is not None and head.adapters is not None and head.weight is model.embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    merged = 0
    for module in list(model.modules()):
        adapters = getattr(module, "adapters", None)
        if adapters is None:
            continue
        for name, adapter in adapters.items():
            weight = getattr(module, name)
            weight.add_(adapter.delta().to(weight.dtype))  # a shared stack's (1, ., .) broadcasts over E
            merged += 1
        module.adapters = None
    return merged


def describe(tr: TrainConfig, trainable: int, total: int) -> str:
    """The console's line on what trains."""
    lora = tr.lora
    per = "" if "experts" not in (lora.targets or []) else (
        ", one adapter per expert" if lora.experts_rank_per_expert else ", one adapter shared by each layer's experts")
    return (f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {', '.join(lora.targets or [])}{per}: "
            f"{trainable:,} trainable parameters ({trainable / max(total, 1):.2%} of {total:,}); the rest frozen")
