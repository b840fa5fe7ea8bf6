"""What every backbone shares: embeddings, output head, loss assembly and the named output.

A backbone implements `body(h, state) -> (h, records, state)` on (B, T, D) hidden states; the
state is what a recurrent backbone carries from one block of a stream to the next (None for the
Transformer). The base turns
token ids into embeddings, runs the body, applies the head (a linear softmax, or the mixture-of-
experts head of models/head.py) and assembles the loss: loss = objective + aux_loss + z_loss, the
objective being the next-token cross-entropy lm_loss (or the EM loss of a mixture head). Each
router loss of moe/losses.py is computed per MoE layer, weighted by its coefficient and summed
over the layers, as Switch, GShard and ST-MoE do; aux_loss holds the balancing losses
(load_balance, importance, load, seq_balance). The mixture head's gate adds a routing record
(reported like a layer's) but no router loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moectl.models.head import MixtureHead, mixture_log_probs, objective_loss
from moectl.models.layers import Linear
from moectl.moe import LOSS_NAMES, RoutingRecord, routing_losses
from moectl.moe.losses import CountReduce

IGNORE_INDEX = -100  # a target the loss skips (torch's cross_entropy default)


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V); a mixture head gives log-probabilities, which softmax alike
    loss: Optional[Tensor] = None  # objective + aux_loss + z_loss, when targets are given
    lm_loss: Optional[Tensor] = None  # mean next-token cross-entropy (nats)
    aux_loss: Optional[Tensor] = None  # weighted balancing losses, summed over MoE layers
    z_loss: Optional[Tensor] = None  # weighted router z-loss, summed over MoE layers
    aux_terms: dict[str, Tensor] = field(default_factory=dict)  # each router loss unweighted, mean over layers
    routing: list[RoutingRecord] = field(default_factory=list)  # one per MoE layer, input to output, then the head's
    state: Optional[Tensor] = None  # the recurrent state after this block (LSTM: (layers, 2, B, D)); None: stateless
    scored: Optional[Tensor] = None  # () int64: the targets lm_loss averages over (not IGNORE_INDEX)


class LanguageModel(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        tie_embeddings: bool,
        loss_coefs: Optional[dict[str, float]],
        dropout: float,
        init_std: float,
        head_experts: int = 0,
        objective: str = "likelihood",
        balance_primary: bool = False,
    ):
        """`head_experts` > 0: a mixture-of-experts head of that many softmax experts, trained by `objective`
        (models/head.py); else a linear head. `balance_primary`: hierarchical routers' primary
        gates get router losses too (moe/losses.py)."""
        super().__init__()
        if objective != "likelihood" and not head_experts:
            raise ValueError(f"objective={objective!r} trains a mixture head by EM; give head_experts > 0")
        self.vocab_size = vocab_size
        self.loss_coefs = {name: (loss_coefs or {}).get(name, 0.0) for name in LOSS_NAMES}
        self.init_std = init_std
        self.objective, self.balance_primary = objective, balance_primary
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        if head_experts:
            self.head = MixtureHead(d_model, vocab_size, head_experts, init_std)
        else:
            self.lm_head = Linear(d_model, vocab_size)
            if tie_embeddings:
                self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        """Normal(0, init_std) for linear and embedding weights; called once by subclasses.

        FFNs, experts and routers initialise themselves; LSTMs keep PyTorch's default.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.init_std)

    def body(
        self, h: Tensor, state: Optional[Tensor] = None, segments: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, list[RoutingRecord], Optional[Tensor]]:
        raise NotImplementedError

    def forward(
        self,
        input_ids: Tensor,
        targets: Optional[Tensor] = None,
        count_reduce: Optional[CountReduce] = None,
        state: Optional[Tensor] = None,
        segments: Optional[Tensor] = None,
        valid: Optional[Tensor] = None,
    ) -> ModelOutput:
        """`count_reduce`, when given, sums the Switch loss's assignment counts over data-parallel
        processes (moe.aux_loss_scope=global); the training loop passes it, so model code stays
        free of torch.distributed. `state`: the recurrent state to start from (out.state of the
        previous block of the same sequences, detached by the caller); None: a fresh start.
        `segments` (B, T): packed sequences, the example each position belongs to; no position
        sees another example (attention is block-diagonal, positions and recurrent state restart
        at each example). `valid` (B, T) bool: the real tokens; padding (False) is routed to no
        expert and left out of every router loss and routing statistic (None: every token is real).
        Targets equal to -100 are not scored (instruction tuning's prompts and padding); lm_loss
        is the mean over the scored targets, 0 when there is none."""
        b, t = input_ids.shape
        h = self.drop(self.embed(input_ids))  # (B, T) -> (B, T, D)
        h, records, state = self.body(h, state, segments, valid)
        routing = list(records)
        if hasattr(self, "head"):  # the mixture-of-experts head
            flat_valid = valid.reshape(b * t) if valid is not None else None
            log_g, log_p, gate = self.head(h.reshape(b * t, -1), flat_valid)  # (B, T, D) -> (N, D): (N, E_h), (N, E_h, V)
            logits = mixture_log_probs(log_g, log_p).view(b, t, -1)  # (N, V) -> (B, T, V)
            routing.append(gate)
        else:
            logits = self.lm_head(h)  # (B, T, V)
        out = ModelOutput(logits=logits, routing=routing, state=state)
        if targets is None:
            return out
        # (B, T, V) -> (N, V) against (B, T) -> (N,). A sum over the scored targets divided by their
        # count (not cross_entropy's mean, which is 0 / 0 = NaN when none is scored).
        flat = targets.reshape(-1)
        out.scored = (flat != IGNORE_INDEX).sum()
        total = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum")
        out.lm_loss = total / out.scored.clamp_min(1)
        zero = out.lm_loss.new_zeros(())
        out.aux_loss, out.z_loss = zero, zero
        if records:
            per_layer = [routing_losses(r, count_reduce, t, self.balance_primary) for r in records]
            for name in LOSS_NAMES:
                terms = torch.stack([losses[name] for losses in per_layer])  # (L,)
                out.aux_terms[name] = terms.mean()
                if name == "z":
                    out.z_loss = self.loss_coefs[name] * terms.sum()
                else:
                    out.aux_loss = out.aux_loss + self.loss_coefs[name] * terms.sum()
        objective = out.lm_loss
        if self.objective != "likelihood":  # EM on the mixture head (config allows no other)
            objective = objective_loss(log_g, log_p, targets.reshape(-1), self.objective)
        out.loss = objective + out.aux_loss + out.z_loss
        return out
