"""`moectl generate`: sample text from a trained model, optionally showing which expert each
new token was routed to in one MoE layer.

Each step runs the model on the last data.seq_len tokens (the context it was trained on) and
samples the next token from softmax(logits / temperature), restricted to the top-k tokens and
to the smallest set whose probability reaches top-p. Temperature 0 is greedy. A seeded
generator makes sampling reproducible. Generation stops at the end-of-text token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from moectl.errors import ConfigError
from moectl.trained import Trained, check_layer


@dataclass
class Generation:
    prompt: str
    pieces: list[str] = field(default_factory=list)  # the text each new token added
    token_ids: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)  # top-1 expert per new token in the shown layer

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """(V,) logits with everything outside the top-k and the top-p nucleus set to -inf."""
    out = logits.clone()
    if top_k is not None and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        out[order[drop]] = float("-inf")
    return out


def token_pieces(tok, ids: list[int]) -> list[str]:
    """The text each token adds, such that the pieces join to decode(ids). A character split over
    several byte-level tokens belongs to the token that completes it."""
    pieces: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1])
        common = len(os.path.commonprefix([prev, cur]))
        excess = len(prev) - common  # a partial character shown as U+FFFD, now completed
        j = len(pieces) - 1
        while excess > 0 and j >= 0:
            cut = min(excess, len(pieces[j]))
            pieces[j] = pieces[j][: len(pieces[j]) - cut]
            excess, j = excess - cut, j - 1
        pieces.append(cur[common:])
        prev = cur
    return pieces


@torch.no_grad()
def generate(
    trained: Trained,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    show_layer: Optional[int] = None,
) -> Generation:
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1]")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1")
    record_index = check_layer(trained, show_layer) if show_layer is not None else None
    tok, cfg = trained.tokenizer, trained.cfg
    eot = tok.token_to_id(cfg.tokenizer.eot_token)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    if not ids:
        if eot is None:
            raise ConfigError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eot]
    start = len(ids)
    gen = torch.Generator().manual_seed(seed)
    result = Generation(prompt=prompt)

    def forward():
        out = trained.model(torch.tensor([ids[-cfg.data.seq_len :]], device=trained.device))  # (1, T)
        if record_index is not None and len(ids) > start:
            # The newest token's own routing: the expert with the largest gate weight for it.
            result.experts.append(int(out.routing[record_index].dense_weights()[-1].argmax()))
        return out.logits[0, -1].float().cpu()  # (V,)

    for _ in range(max_new_tokens):
        logits = forward()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eot:
            break
        ids.append(nxt)
        result.token_ids.append(nxt)
    if record_index is not None and len(ids) > start:
        forward()  # route the last new token too
    result.pieces = token_pieces(tok, result.token_ids)
    return result
