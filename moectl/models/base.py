"""What every backbone shares: embeddings, output head, loss assembly and the named output.

A backbone implements `body(h) -> (h, records)` on (B, T, D) hidden states. The base turns
token ids into embeddings, runs the body, projects to the vocabulary and assembles the loss:
loss = lm_loss + aux_loss + z_loss. Each router loss (moe/losses.py) is averaged over the MoE
layers, so coefficients need no retuning with depth, then weighted by its coefficient; aux_loss
is the weighted sum of the balancing losses (load_balance, importance, load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.moe import LOSS_NAMES, RoutingRecord, routing_losses
from moectl.moe.losses import CountReduce


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Optional[Tensor] = None  # lm_loss + aux_loss + z_loss, when targets are given
    lm_loss: Optional[Tensor] = None  # mean next-token cross-entropy (nats)
    aux_loss: Optional[Tensor] = None  # weighted balancing losses, each a mean over MoE layers
    z_loss: Optional[Tensor] = None  # weighted router z-loss, mean over MoE layers
    aux_terms: dict[str, Tensor] = field(default_factory=dict)  # each router loss unweighted, mean over layers
    routing: list[RoutingRecord] = field(default_factory=list)  # one per MoE layer, input to output


class LanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        tie_embeddings: bool,
        loss_coefs: Optional[dict[str, float]],
        dropout: float,
        init_std: float,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.loss_coefs = {name: (loss_coefs or {}).get(name, 0.0) for name in LOSS_NAMES}
        self.init_std = init_std
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        """Normal(0, init_std) for linear and embedding weights; called once by subclasses.

        FFNs, experts and routers initialise themselves; LSTMs keep PyTorch's default.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.init_std)

    def body(self, h: Tensor) -> tuple[Tensor, list[RoutingRecord]]:
        raise NotImplementedError

    def forward(
        self, input_ids: Tensor, targets: Optional[Tensor] = None, count_reduce: Optional[CountReduce] = None
    ) -> ModelOutput:
        """`count_reduce`, when given, sums the Switch loss's assignment counts over data-parallel
        processes (moe.aux_loss_scope=global); the training loop passes it, so model code stays
        free of torch.distributed."""
        h = self.drop(self.embed(input_ids))  # (B, T) -> (B, T, D)
        h, records = self.body(h)
        logits = self.lm_head(h)  # (B, T, V)
        out = ModelOutput(logits=logits, routing=records)
        if targets is None:
            return out
        # (B, T, V) -> (N, V) against (B, T) -> (N,)
        out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        zero = out.lm_loss.new_zeros(())
        out.aux_loss, out.z_loss = zero, zero
        if records:
            per_layer = [routing_losses(r, count_reduce) for r in records]
            out.aux_terms = {name: torch.stack([t[name] for t in per_layer]).mean() for name in LOSS_NAMES}
            for name, value in out.aux_terms.items():
                weighted = self.loss_coefs[name] * value
                if name == "z":
                    out.z_loss = weighted
                else:
                    out.aux_loss = out.aux_loss + weighted
        out.loss = out.lm_loss + out.aux_loss + out.z_loss
        return out
