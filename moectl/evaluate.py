"""Evaluation: the loop that scores validation batches (training calls it at every eval), the
quality numbers, and `moectl eval`, which reports them with each layer's routing statistics
(as JSON with the documented JSON_KEYS, or as a table for people).

- loss: mean next-token cross-entropy in nats per token;
- perplexity = exp(loss);
- bits per byte = (summed loss / ln 2) / (UTF-8 bytes of the target tokens), so models with
  different tokenizers compare. With a byte-level BPE every token's byte length is exact (one
  vocabulary character is one byte; the end-of-text token has none); with another tokenizer
  the bytes are estimated from the split's bytes per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from moectl import console, data, distributed, runtime
from moectl import tokenizer as tokenizers_
from moectl.errors import DataError
from moectl.loaded_model import LoadedModel
from moectl.models import LanguageModel, moe_layers
from moectl.runtime import Dist
from moectl.stats import COLUMNS, RoutingStats, accumulator_dtype


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def bits_per_byte(loss: float, tokens: int, num_bytes: float) -> float:
    return loss * tokens / math.log(2) / num_bytes


@torch.no_grad()
def mean_loss(
    model: LanguageModel,
    blocks: data.Blocks,
    batches: list,
    device: torch.device,
    amp: Optional[torch.dtype],
    stats: Optional[RoutingStats] = None,
    dp: Dist = Dist(),
) -> float:
    """Mean next-token cross-entropy (nats per token) over the given batches, in eval mode.

    With several processes each evaluates every world_size-th batch and the sums are combined,
    so `stats` holds the whole set's routing on every rank.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=accumulator_dtype(device), device=device)  # (loss sum, tokens)
    for ids in batches[dp.rank :: dp.world_size]:
        x, y = (t.to(device) for t in blocks.batch(ids))
        with runtime.autocast(device, amp):
            out = model(x, y)
        sums[0] += out.lm_loss.to(sums.dtype) * y.numel()
        sums[1] += y.numel()
        if stats is not None:
            stats.update(out.routing)
    distributed.all_reduce_sum_([sums, *(stats.tensors() if stats is not None else [])], dp)
    model.train(was_training)
    total, count = sums.tolist()
    return total / count


# The JSON keys of `moectl eval --json`, each documented (tests check the output against this).
JSON_KEYS = {
    "checkpoint": "the checkpoint directory evaluated",
    "step": "its training step",
    "split": "`validation` or `train`",
    "batches": "batches evaluated (of train.micro_batch_size sequences)",
    "tokens": "target tokens scored",
    "bytes": "UTF-8 bytes of those tokens",
    "bytes_exact": "true when bytes come from the byte-level vocabulary, false when estimated per token",
    "loss": "mean next-token cross-entropy, nats per token",
    "ppl": "exp(loss)",
    "bits_per_byte": "loss summed over tokens / ln 2 / bytes",
    "tokens_per_sec": "evaluation throughput",
    "eval_capacity_factor": "capacity factor the MoE layers used (null: dropless)",
    "layers": "per MoE layer: slot (FFN index) plus the routing statistics of moectl/stats.py",
}


@dataclass
class EvalResult:
    checkpoint: str
    step: int
    split: str
    batches: int
    tokens: int
    bytes: int
    bytes_exact: bool
    loss: float
    ppl: float
    bits_per_byte: float
    tokens_per_sec: float
    eval_capacity_factor: Optional[float]
    layers: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def split_batches(loaded: LoadedModel, split: str, max_batches: Optional[int]) -> tuple[data.Blocks, data.Split, list]:
    """The split tokenised with the run's tokenizer (cached), in blocks of data.seq_len, and the
    batches eval and route-stats score: `max_batches` of them (default train.eval_batches, the
    ones training evaluates), spread over the split."""
    if split not in ("validation", "train"):
        raise DataError(f"--split {split!r}: choose validation or train")
    cfg = loaded.cfg
    corpus = data.prepare(cfg, tokenizer_file=loaded.run_dir / "tokenizer.json", only="validation" if split == "validation" else "training")
    tokens = corpus.validation if split == "validation" else corpus.train
    blocks = data.Blocks(tokens, cfg.data.seq_len)
    return blocks, tokens, data.eval_batches(blocks, cfg.micro_batch_size, max_batches or cfg.train.eval_batches)


def byte_lengths(loaded: LoadedModel, split: data.Split) -> tuple[np.ndarray, bool]:
    """(V,) UTF-8 bytes per token id, and whether they are exact."""
    exact = tokenizers_.token_byte_lengths(loaded.tokenizer)
    if exact is not None:
        return exact, True
    eot = loaded.tokenizer.token_to_id(loaded.cfg.tokenizer.eot_token)
    text_tokens = int((split.tokens != eot).sum()) if eot is not None else len(split.tokens)
    per_token = split.num_bytes / max(text_tokens, 1)
    table = np.full(loaded.tokenizer.get_vocab_size(), per_token)
    if eot is not None:
        table[eot] = 0.0
    return table, False


def run(loaded: LoadedModel, split: str = "validation", max_batches: Optional[int] = None) -> EvalResult:
    """`moectl eval`: `max_batches` batches (default train.eval_batches, as training's evaluation)."""
    cfg = loaded.cfg
    loaded.warn_about_lookahead()
    blocks, tokens, batches = split_batches(loaded, split, max_batches)
    lengths, exact = byte_lengths(loaded, tokens)
    n_tokens, n_bytes = 0, 0.0
    for ids in batches:
        _, y = blocks.batch(ids)
        n_tokens += y.numel()
        n_bytes += float(lengths[y.numpy()].sum())
    if n_bytes <= 0:
        raise DataError(f"the {split} split's evaluated tokens hold no text bytes")
    stats = RoutingStats(len(loaded.slots), loaded.experts, loaded.device)
    start = time.perf_counter()
    amp = runtime.autocast_dtype(loaded.device, cfg.train.precision)
    loss = mean_loss(loaded.model, blocks, batches, loaded.device, amp, stats)
    seconds = time.perf_counter() - start
    layers = [] if stats.empty() else stats.summary()
    moe = moe_layers(loaded.model)
    return EvalResult(
        checkpoint=str(loaded.checkpoint),
        step=loaded.step,
        split=split,
        batches=len(batches),
        tokens=n_tokens,
        bytes=int(round(n_bytes)),
        bytes_exact=exact,
        loss=loss,
        ppl=perplexity(loss),
        bits_per_byte=bits_per_byte(loss, n_tokens, n_bytes),
        tokens_per_sec=n_tokens / max(seconds, 1e-9),
        eval_capacity_factor=moe[0].eval_capacity_factor if moe else None,
        layers=[{"slot": slot, **s.to_dict()} for slot, s in zip(loaded.slots, layers)],
    )


def show(result: EvalResult) -> None:
    """The report for people: the quality numbers, then one row of statistics per MoE layer."""
    from rich.table import Table

    console.out.print(
        f"[bold]{result.checkpoint}[/] (step {result.step}), {result.split} split: {result.batches} batches, "
        f"{console.human(result.tokens)} tokens, {console.human(result.bytes)} bytes"
        f"{'' if result.bytes_exact else ' (estimated)'}",
        highlight=False,
    )
    console.out.print(
        f"loss [bold]{result.loss:.4f}[/] nats/token   perplexity [bold]{result.ppl:.2f}[/]   "
        f"bits per byte [bold]{result.bits_per_byte:.4f}[/]   {console.human(result.tokens_per_sec)} tokens/s",
        highlight=False,
    )
    if not result.layers:
        return
    cf = result.eval_capacity_factor
    table = Table(title=f"routing (eval capacity factor: {'dropless' if cf is None else cf})", title_justify="left",
                  box=None, pad_edge=False, header_style="bold underline")  # 80 columns wide
    for name in ("layer", *(c.label for c in COLUMNS)):
        table.add_column(name, justify="right", no_wrap=True)
    for s in result.layers:
        table.add_row(f"{s['slot']:02d}", *(c.format(s[c.name]) for c in COLUMNS))
    console.out.print(table)
