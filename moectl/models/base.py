"""What every backbone shares: embeddings, output head, loss assembly and the named output.

A backbone implements `body(h) -> (h, records)` on (B, T, D) hidden states. The base turns
token ids into embeddings, runs the body, projects to the vocabulary and assembles the loss:
loss = lm_loss + aux_loss + z_loss, where the router terms are weighted by their coefficients
and averaged over the MoE layers (so coefficients need no retuning with depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.moe import RoutingRecord, load_balancing_loss, router_z_loss


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Optional[Tensor] = None  # lm_loss + aux_loss + z_loss, when targets are given
    lm_loss: Optional[Tensor] = None  # mean next-token cross-entropy (nats)
    aux_loss: Optional[Tensor] = None  # weighted Switch load-balancing loss, mean over MoE layers
    z_loss: Optional[Tensor] = None  # weighted router z-loss, mean over MoE layers
    routing: list[RoutingRecord] = field(default_factory=list)  # one per MoE layer, input to output


class LanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        tie_embeddings: bool,
        aux_loss_coef: float,
        z_loss_coef: float,
        dropout: float,
        init_std: float,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
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

    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None) -> ModelOutput:
        h = self.drop(self.embed(input_ids))  # (B, T) -> (B, T, D)
        h, records = self.body(h)
        logits = self.lm_head(h)  # (B, T, V)
        out = ModelOutput(logits=logits, routing=records)
        if targets is None:
            return out
        # (B, T, V) -> (N, V) against (B, T) -> (N,)
        out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        zero = out.lm_loss.new_zeros(())
        if records:
            out.aux_loss = self.aux_loss_coef * torch.stack(
                [load_balancing_loss(r.probs, r.expert_idx) for r in records]
            ).mean()
            out.z_loss = self.z_loss_coef * torch.stack([router_z_loss(r.logits) for r in records]).mean()
        else:
            out.aux_loss, out.z_loss = zero, zero
        out.loss = out.lm_loss + out.aux_loss + out.z_loss
        return out
