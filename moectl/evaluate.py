"""`moectl eval`: loss, perplexity and bits per byte of a trained model on a split, with the
per-layer routing summary (the same statistics training logs).

Bits per byte = (summed next-token loss in nats / ln 2) / (UTF-8 bytes of the target tokens),
so models with different tokenizers compare. With a byte-level BPE every token's byte length
is exact (one vocabulary character is one byte; the end-of-text token has none); with another
tokenizer the bytes are estimated from the split's bytes per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from moectl import data
from moectl import tokenizer as tokenizers_
from moectl.errors import DataError
from moectl.stats import RoutingStats
from moectl.trained import Trained

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


def split_blocks(trained: Trained, split: str) -> tuple[data.Blocks, data.Split]:
    """The split's tokens in blocks of data.seq_len, tokenised with the run's tokenizer (cached)."""
    if split not in ("validation", "train"):
        raise DataError(f"--split {split!r}: choose validation or train")
    corpus = data.prepare(
        trained.cfg, tokenizer_file=trained.run_dir / "tokenizer.json", only="validation" if split == "validation" else "training"
    )
    chosen = corpus.validation if split == "validation" else corpus.train
    return data.Blocks(chosen, trained.cfg.data.seq_len), chosen


def split_batches(trained: Trained, split: str, max_batches: Optional[int]) -> tuple[data.Blocks, data.Split, list]:
    """The split's blocks and the batches eval and route-stats score: `max_batches` of them (default
    train.eval_batches, the ones training evaluates), spread over the split."""
    blocks, tokens = split_blocks(trained, split)
    cfg = trained.cfg
    return blocks, tokens, data.eval_batches(blocks, cfg.micro_batch_size, max_batches or cfg.train.eval_batches)


def byte_lengths(trained: Trained, split: data.Split) -> tuple[np.ndarray, bool]:
    """(V,) UTF-8 bytes per token id, and whether they are exact."""
    exact = tokenizers_.token_byte_lengths(trained.tokenizer)
    if exact is not None:
        return exact, True
    eot = trained.tokenizer.token_to_id(trained.cfg.tokenizer.eot_token)
    text_tokens = int((split.tokens != eot).sum()) if eot is not None else len(split.tokens)
    per_token = split.num_bytes / max(text_tokens, 1)
    table = np.full(trained.tokenizer.get_vocab_size(), per_token)
    if eot is not None:
        table[eot] = 0.0
    return table, False


def run(trained: Trained, split: str = "validation", max_batches: Optional[int] = None) -> EvalResult:
    """Evaluate on `max_batches` batches (default train.eval_batches, as training's evaluation)."""
    from moectl.train import autocast_dtype, evaluate

    cfg = trained.cfg
    blocks, tokens, batches = split_batches(trained, split, max_batches)
    lengths, exact = byte_lengths(trained, tokens)
    n_tokens, n_bytes = 0, 0.0
    for ids in batches:
        _, y = blocks.batch(ids)
        n_tokens += y.numel()
        n_bytes += float(lengths[y.numpy()].sum())
    if n_bytes <= 0:
        raise DataError(f"the {split} split's evaluated tokens hold no text bytes")
    stats = RoutingStats(len(trained.slots), cfg.moe.num_experts, trained.device)
    start = time.perf_counter()
    loss = evaluate(trained.model, blocks, batches, trained.device, autocast_dtype(trained.device, cfg.train.precision), stats)
    seconds = time.perf_counter() - start
    layers = [] if stats.empty() else stats.summary()
    return EvalResult(
        checkpoint=str(trained.checkpoint),
        step=trained.step,
        split=split,
        batches=len(batches),
        tokens=n_tokens,
        bytes=int(round(n_bytes)),
        bytes_exact=exact,
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),
        bits_per_byte=loss * n_tokens / math.log(2) / n_bytes,
        tokens_per_sec=n_tokens / max(seconds, 1e-9),
        eval_capacity_factor=_eval_capacity(trained),
        layers=[{"slot": slot, **s.to_dict()} for slot, s in zip(trained.slots, layers)],
    )


def _eval_capacity(trained: Trained) -> Optional[float]:
    from moectl.models import moe_layers

    layers = moe_layers(trained.model)
    return layers[0].eval_capacity_factor if layers else None
