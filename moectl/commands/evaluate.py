"""Evaluation: the loop that scores validation batches (training calls it at every eval), the
quality numbers, and `moectl eval`, which reports them with each layer's routing statistics
(as JSON with the documented JSON_KEYS, or as a table for people).

- loss: mean next-token cross-entropy in nats per token;
- perplexity = exp(loss) (this and bits per byte are computed in moectl/common/stats.py);
- bits per byte = (summed loss / ln 2) / (UTF-8 bytes of the target tokens), so models with
  different tokenizers compare. With a byte-level BPE every token's byte length is exact (one
  vocabulary character is one byte; the end-of-text token has none); with another tokenizer
  the bytes are estimated from the split's bytes per token.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moectl import data
from moectl.common import console, runtime
from moectl.common.errors import ConfigError, DataError
from moectl.common.runtime import Dist
from moectl.common.stats import COLUMNS, RoutingStats, accumulator_dtype, bits_per_byte, perplexity
from moectl.data import IGNORE
from moectl.data import tokenizer as tokenizers_
from moectl.models import LanguageModel, moe_layers
from moectl.services import distributed
from moectl.services.loaded_model import LoadedModel


@torch.no_grad()
def mean_loss(
    model: LanguageModel,
    blocks: data.Blocks,
    batches: list,
    device: torch.device,
    amp: Optional[torch.dtype],
    stats: Optional[RoutingStats] = None,
    dp: Dist = Dist(),
    stateful: bool = False,
    lockstep: bool = False,
    top1: Optional[list] = None,
    advance: Optional[Callable[[int], None]] = None,
) -> float:
    """Mean next-token cross-entropy (nats per token) over the given batches' scored targets
    (every token; response tokens only for instruction tuning), in eval mode.

    With several processes each evaluates every world_size-th batch and the sums are combined,
    so `stats` holds the whole set's routing on every rank. `stateful`: the batches are streams
    (data.stream_batches), each row continuing the same row of the previous batch, and the
    model's recurrent state is carried from batch to batch; each process takes every
    world_size-th stream. `lockstep` (sharded experts, whose forward is a collective): every
    process runs the same number of forward passes; one that has run out of batches repeats a
    batch and ignores the result. `top1`, a list: for each batch this process scores, append the
    top-1 expert (largest gate weight) of each scored token in every routing record, an
    (records, scored tokens) int16 tensor; None for a batch it repeats in lockstep. `advance`:
    told of each batch this process has scored (a progress bar's).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=accumulator_dtype(device), device=device)  # (loss sum, tokens)
    state = None
    mine = [ids[dp.rank :: dp.world_size] for ids in batches] if stateful else batches[dp.rank :: dp.world_size]
    if lockstep:  # batches[0]'s first rows stand in where this process has nothing left
        rounds = len(batches) if stateful else -(-len(batches) // dp.world_size)
        mine = [ids if len(ids) else None for ids in mine] + [None] * (rounds - len(mine))
    for ids in mine:
        if ids is None:
            with runtime.autocast(device, amp):  # the same dtypes as the other processes' exchange
                model(blocks.batch(batches[0][:1])[0].to(device))
            if top1 is not None:
                top1.append(None)
            continue
        if not len(ids):
            if advance is not None:
                advance(1)
            continue
        x, y = (t.to(device) for t in blocks.batch(ids))
        layout = {k: v.to(device) for k, v in blocks.layout(ids).items()}  # packing and padding
        with runtime.autocast(device, amp):
            out = model(x, y, state=state, **layout)
        state = out.state if stateful else None
        # lm_loss is the mean over the scored targets (instruction tuning: response tokens only), 0 for none
        sums[0] += out.lm_loss.to(sums.dtype) * out.scored
        sums[1] += out.scored
        if stats is not None:
            stats.update(out.routing)
        if top1 is not None:
            keep = (y != IGNORE).reshape(-1)
            top1.append(torch.stack([r.dense_weights().argmax(-1)[keep] for r in out.routing]).to(torch.int16).cpu()
                        if out.routing else torch.zeros(0, int(keep.sum()), dtype=torch.int16))
        if advance is not None:
            advance(1)
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
    "targets": "`every token` (language modelling) or `response tokens` (data.task=sft: prompt, system and padding "
    "tokens are not scored, in loss, perplexity or bits per byte)",
    "bytes": "UTF-8 bytes of those tokens",
    "bytes_exact": "true when bytes come from the byte-level vocabulary, false when estimated per token",
    "loss": "mean next-token cross-entropy, nats per token",
    "ppl": "exp(loss)",
    "bits_per_byte": "loss summed over tokens / ln 2 / bytes",
    "tokens_per_sec": "evaluation throughput",
    "eval_capacity_factor": "capacity factor the MoE layers used (null: dropless)",
    "context": "`block` (each block from a fresh start), `stateful` (LSTM state carried over contiguous streams) "
    "or `stride S` (sliding windows: each token scored once with at least seq_len - S tokens of context)",
    "adapters": "for a LoRA run, its adapters (rank, alpha, targets) and the base they adapt; null otherwise",
    "derived": "for a pruned or quantised model, what was done to the trained one, one line per step (its model card "
    "has the details); empty for a trained model",
    "skip_threshold": "NAEE's dynamic skipping beta (--skip-threshold): a token's choices weighted below beta times its "
    "first choice's were not computed; null: off",
    "expert_calls_saved": "with --skip-threshold, the fraction of all MoE layers' expert calls (token-expert "
    "assignments the routers chose) that skipping left out; null: off",
    "layers": "per MoE layer: slot (FFN index) plus the routing statistics of moectl/common/stats.py (with "
    "--skip-threshold also calls_saved, that layer's fraction)",
}


@dataclass
class EvalResult:
    checkpoint: str
    step: int
    split: str
    batches: int
    tokens: int
    targets: str
    bytes: int
    bytes_exact: bool
    loss: float
    ppl: float
    bits_per_byte: float
    tokens_per_sec: float
    eval_capacity_factor: Optional[float]
    context: str
    adapters: Optional[str]
    derived: list[str]
    skip_threshold: Optional[float]
    expert_calls_saved: Optional[float]
    layers: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def split_batches(
    loaded: LoadedModel, split: str, max_batches: Optional[int], stateful: bool = False
) -> tuple[data.Rows, data.Split, list]:
    """The split tokenised with the run's tokenizer (cached), in blocks of data.seq_len, and the
    batches eval and route-stats score: `max_batches` of them (default train.eval_batches, the
    ones training evaluates), spread over the split; `stateful`: as contiguous streams."""
    if split not in ("validation", "train"):
        raise DataError(f"--split {split!r}: choose validation or train")
    cfg = loaded.cfg
    corpus = data.prepare(cfg.data, cfg.tokenizer, tokenizer_file=loaded.run_dir / "tokenizer.json",
                          only="validation" if split == "validation" else "training")
    tokens = corpus.validation if split == "validation" else corpus.train
    blocks = data.blocks(tokens, cfg.data, corpus.eot_id)
    batching = data.stream_batches if stateful else data.eval_batches
    return blocks, tokens, batching(blocks, cfg.train.micro_batch, max_batches or cfg.train.eval_batches)


def byte_lengths(loaded: LoadedModel, split: data.Split) -> tuple[np.ndarray, bool]:
    """(V,) UTF-8 bytes per token id, and whether they are exact."""
    exact = tokenizers_.token_byte_lengths(loaded.tokenizer)
    if exact is not None:
        return exact, True
    eot = loaded.tokenizer.token_to_id(loaded.cfg.tokenizer.eot_token)
    tokens = split.scored_tokens  # what num_bytes measures
    text_tokens = int((tokens != eot).sum()) if eot is not None else len(tokens)
    per_token = split.num_bytes / max(text_tokens, 1)
    table = np.full(loaded.tokenizer.get_vocab_size(), per_token)
    if eot is not None:
        table[eot] = 0.0
    return table, False


def context_protocol(cfg, stride: Optional[int], stateful: Optional[bool]) -> tuple[Optional[int], bool]:
    """(stride, stateful) for `moectl eval`, checked: stateful defaults to how the model trained."""
    stateful = cfg.train.lstm_stateful if stateful is None else stateful
    data.check_context(cfg.data, stride, stateful)
    if stateful and cfg.model.backbone != "lstm":
        raise ConfigError(f"--stateful: model.arch={cfg.model.arch} has no recurrent state to carry; drop --stateful")
    if stride is not None:
        if not 1 <= stride <= cfg.data.seq_len:
            raise ConfigError(f"--stride {stride}: choose 1 to data.seq_len={cfg.data.seq_len}")
        if stateful:
            raise ConfigError("--stride scores windows, --stateful carries state across blocks: choose one "
                              "(add --stateless to slide windows over a stateful LSTM)")
    return stride, stateful


@torch.no_grad()
def sliding_loss(
    model: LanguageModel, blocks: data.Blocks, batches: list, stride: int, device: torch.device,
    amp: Optional[torch.dtype], stats: Optional[RoutingStats] = None,
    advance: Optional[Callable[[int], None]] = None,
) -> float:
    """Mean loss over the same target tokens as block evaluation, each scored once in a window of
    seq_len tokens that ends at the last token of its chunk of `stride`: every token sees at least
    seq_len - stride tokens of context (fewer only at the start of the split). `advance`: told of
    the windows each forward pass scores (sliding_windows of them in all)."""
    model.eval()
    length, tokens = blocks.seq_len, blocks.split.tokens
    windows = []  # (first input position, first and last + 1 scored target offsets) per window
    for block in np.concatenate(batches):
        for a in range(0, length, stride):  # the chunk of targets at flat positions block*L + 1 + [a, b)
            b = min(a + stride, length)
            start = max(0, block * length + b - length)  # window target o is the token at start + 1 + o
            windows.append((start, block * length + a - start, block * length + b - start))
    total, count = 0.0, 0
    width = max(len(batches[0]), 1)  # windows per forward pass: the batch size
    pos = torch.arange(length, device=device)[None]
    for i in range(0, len(windows), width):
        part = torch.tensor(windows[i : i + width], dtype=torch.int64)  # (W, 3)
        window = torch.from_numpy(tokens[part[:, :1].numpy() + np.arange(length + 1)].astype(np.int64)).to(device)
        with runtime.autocast(device, amp):
            out = model(window[:, :-1])  # (W, L) -> (W, L, V)
        nll = F.cross_entropy(out.logits.float().transpose(1, 2), window[:, 1:], reduction="none")  # (W, L)
        scored = (pos >= part[:, 1:2].to(device)) & (pos < part[:, 2:3].to(device))
        total += float(nll[scored].sum())
        count += int(scored.sum())
        if stats is not None:
            stats.update(out.routing)
        if advance is not None:
            advance(len(part))
    return total / count


def sliding_windows(batches: list, seq_len: int, stride: int) -> int:
    """The windows sliding_loss scores: one per chunk of `stride` targets of every block."""
    return sum(len(ids) for ids in batches) * -(-seq_len // stride)


def run(
    loaded: LoadedModel,
    split: str = "validation",
    max_batches: Optional[int] = None,
    stride: Optional[int] = None,
    stateful: Optional[bool] = None,
) -> EvalResult:
    """`moectl eval`: `max_batches` batches (default train.eval_batches, as training's evaluation),
    each block scored from a fresh start, or with `stride` in sliding windows, or `stateful`ly."""
    cfg = loaded.cfg
    stride, stateful = context_protocol(cfg, stride, stateful)
    loaded.warn_about_lookahead()
    blocks, tokens, batches = split_batches(loaded, split, max_batches, stateful)
    lengths, exact = byte_lengths(loaded, tokens)
    n_tokens, n_bytes = 0, 0.0
    for ids in batches:
        _, y = blocks.batch(ids)
        y = y[y != IGNORE]
        n_tokens += y.numel()
        n_bytes += float(lengths[y.numpy()].sum())
    if n_bytes <= 0:
        raise DataError(f"the {split} split's evaluated tokens hold no text bytes")
    stats = RoutingStats(len(loaded.slots), loaded.experts, loaded.device)
    start = time.perf_counter()
    amp = runtime.autocast_dtype(loaded.device, cfg.train.precision)
    if stride is not None:
        with console.progress("evaluating", sliding_windows(batches, cfg.data.seq_len, stride), "windows") as bar:
            loss = sliding_loss(loaded.model, blocks, batches, stride, loaded.device, amp, stats, bar.advance)
    else:
        with console.progress("evaluating", len(batches), "batches") as bar:
            loss = mean_loss(loaded.model, blocks, batches, loaded.device, amp, stats, stateful=stateful,
                             advance=bar.advance)
    seconds = time.perf_counter() - start
    layers = [] if stats.empty() else stats.summary()
    moe = moe_layers(loaded.model)
    beta = moe[0].skip_threshold if moe else None
    saved, overall = stats.calls_saved() if beta else (None, None)
    return EvalResult(
        checkpoint=str(loaded.checkpoint),
        step=loaded.step,
        split=split,
        batches=len(batches),
        tokens=n_tokens,
        targets=blocks.targets,
        bytes=int(round(n_bytes)),
        bytes_exact=exact,
        loss=loss,
        ppl=perplexity(loss),
        bits_per_byte=bits_per_byte(loss, n_tokens, n_bytes),
        tokens_per_sec=n_tokens / max(seconds, 1e-9),
        eval_capacity_factor=moe[0].eval_capacity_factor if moe else None,
        context="stateful" if stateful else "block" if stride is None else f"stride {stride}",
        adapters=loaded.adapters,
        derived=[step["summary"] for step in loaded.derived],
        skip_threshold=beta,
        expert_calls_saved=overall,
        layers=[{"slot": slot, **s.to_dict(), **({"calls_saved": saved[i]} if saved else {})}
                for i, (slot, s) in enumerate(zip(loaded.slots, layers))],
    )


def show(result: EvalResult) -> None:
    """The report for people: the quality numbers, then one row of statistics per MoE layer."""
    from rich.table import Table

    console.out.print(
        f"[bold]{result.checkpoint}[/] (step {result.step}), {result.split} split: {result.batches} batches, "
        f"{console.human(result.tokens)} tokens{' (responses only)' if result.targets == 'response tokens' else ''}, "
        f"{console.human(result.bytes)} bytes"
        f"{'' if result.bytes_exact else ' (estimated)'}; context: {result.context}",
        highlight=False,
    )
    if result.adapters:
        console.out.print(f"[cyan]adapters:[/] {result.adapters}", highlight=False)
    for line in result.derived:  # nothing silently changes a model
        console.out.print(f"[yellow]derived:[/] {line}", highlight=False)
    console.out.print(
        f"loss [bold]{result.loss:.4f}[/] nats/token   perplexity [bold]{result.ppl:.2f}[/]   "
        f"bits per byte [bold]{result.bits_per_byte:.4f}[/]   {console.human(result.tokens_per_sec)} tokens/s",
        highlight=False,
    )
    if result.skip_threshold:
        per_layer = ", ".join(f"{s['slot']:02d}: {100 * s['calls_saved']:.1f}%" for s in result.layers)
        console.out.print(f"skipping choices below {result.skip_threshold} x the first: "
                          f"[bold]{100 * result.expert_calls_saved:.1f}%[/] of expert calls saved ({per_layer})",
                          highlight=False)
    if not result.layers:
        return
    cf = result.eval_capacity_factor
    titles = {"load": f"routing: expert load (eval capacity factor: {'dropless' if cf is None else cf})",
              "router": "routing: the router's distribution and logits"}
    for about, title in titles.items():  # two tables, each within 80 columns
        columns = [c for c in COLUMNS if c.about == about]
        table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold underline")
        for name in ("layer", *(c.label for c in columns)):
            table.add_column(name, justify="right", no_wrap=True)
        for s in result.layers:
            table.add_row(f"{s['slot']:02d}", *(c.format(s[c.name]) for c in columns))
        console.out.print(table)
