"""Text in, batches out. This package alone knows language modelling (data.task=lm) from
instruction tuning (data.task=sft); training and evaluation consume what it hands them alike.

  lm.py         text: loading (Hub, files, save_to_disk, the built-in corpus), the validation carve,
                tokenising with its cache, Blocks of the token stream
  formats.py    local data files: their format, their split patterns, the line at fault in bad JSON
  batches.py    which rows make each batch: the samplers (shuffled, or streams), evaluation batches
  sft.py        instruction tuning: examples -> chat template -> tokens with a response mask -> rows
  chat.py       chat templates: rendering, their markers, messages from prompt/response fields
  tokenizer.py  the BPE trained here, or a tokenizer file or Hub tokenizer; special tokens

What the rest of moectl sees: `prepare` (a Corpus: both splits and the tokenizer), `blocks` (a
split's rows) and the rows' one interface: `batch(ids)` -> (inputs, targets), IGNORE where a target
is not scored; `layout(ids)` -> what the model needs beyond the tokens (packed segments, padding);
`targets` (what the loss scores, in words) and `weighs_targets` (whether a training step weighs
its micro-batches by their scored targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from moectl.common import console
from moectl.common.errors import ConfigError
from moectl.config import DataConfig, TokenizerConfig
from moectl.data import lm, sft
from moectl.data.batches import BatchSampler, StreamSampler, eval_batches, eval_chunks, stream_batches
from moectl.data.lm import Blocks, Corpus, Split
from moectl.data.sft import IGNORE, ExampleBlocks, Examples

__all__ = ["IGNORE", "BatchSampler", "Blocks", "Corpus", "ExampleBlocks", "Examples", "Rows", "Split", "StreamSampler",
           "blocks", "check_context", "describe", "eval_batches", "eval_chunks", "prepare", "report", "report_tokens", "stream_batches"]

Rows = Union[Blocks, ExampleBlocks]


def prepare(d: DataConfig, tok: TokenizerConfig, tokenizer_file: Optional[Path] = None,
            only: Optional[str] = None) -> Corpus:
    """Both splits tokenised, and the tokenizer (read from `tokenizer_file`, or trained on the
    training split). `only="training"` or `"validation"` tokenises just that split."""
    prepare_task = sft.prepare if d.task == "sft" else lm.prepare
    return prepare_task(d, tok, tokenizer_file=tokenizer_file, only=only)


def blocks(split: Split, d: DataConfig, pad_id: int) -> Rows:
    """The split's rows: Blocks of the token stream, or ExampleBlocks of whole examples."""
    if isinstance(split, Examples):
        return ExampleBlocks(split, d.seq_len, d.packing, pad_id)
    return Blocks(split, d.seq_len)


def describe(d: DataConfig) -> str:
    """Where the text comes from and what is learned from it, for a status line."""
    return f"{d.source}{', instruction tuning' if d.task == 'sft' else ''}"


def check_context(d: DataConfig, stride: Optional[int], stateful: bool) -> None:
    """Refuse evaluation protocols that run across block boundaries where rows are separate examples."""
    if d.task == "sft" and (stride is not None or stateful):
        raise ConfigError(f"{'--stride' if stride is not None else '--stateful'}: data.task=sft scores each example "
                          "on its own; drop the option")


def report(train: Rows, validation: Rows, d: DataConfig) -> None:
    """What instruction tuning made of the examples (nothing to say for a token stream): rows, and
    examples that lost their prompt side, or their whole response, to data.seq_len."""
    if not isinstance(train, ExampleBlocks) or not isinstance(validation, ExampleBlocks):
        return
    examples = train.split.num_docs + validation.split.num_docs
    rows = f"{len(train)} + {len(validation)} {'packed ' if d.packing else ''}sequences"
    console.status(f"instruction tuning: {train.split.num_docs} + {validation.split.num_docs} examples in {rows}; "
                   "the loss counts response tokens only")
    truncated, cut = train.truncated + validation.truncated, train.responses_cut + validation.responses_cut
    lost = train.responses_lost + validation.responses_lost
    if truncated:
        console.warn(f"{truncated} of {examples} examples are longer than data.seq_len + 1 = {d.seq_len + 1} "
                     f"tokens and lose their first tokens (the prompt side); in {cut} the response is cut too")
    if lost:
        console.warn(f"{lost} of {examples} examples have no response token left after that cut and train nothing "
                     "(they count as zero loss and zero tokens); raise data.seq_len, or shorten their prompts")


def report_tokens(corpus: Corpus, tok: TokenizerConfig, new_tokenizer: bool) -> None:
    """The status line of a prepared corpus; and a warning when a BPE trained here (`new_tokenizer`)
    came out smaller than tokenizer.vocab_size asked for."""
    vocab = corpus.tokenizer.get_vocab_size()
    console.status(
        f"tokens: {console.human(len(corpus.train.tokens))} train, {console.human(len(corpus.validation.tokens))} validation"
        f" ({'cached' if corpus.train.from_cache else 'tokenised'}); vocab {vocab}"
        f" ({'cached' if corpus.tokenizer_from_cache else 'trained'} tokenizer)"
    )
    trained_bpe = tok.path is None and tok.name is None
    if new_tokenizer and trained_bpe and tok.vocab_size != "auto" and vocab < tok.vocab_size:
        console.warn(f"the BPE has {vocab} tokens, fewer than tokenizer.vocab_size={tok.vocab_size}: "
                     "the training text has no more merges to learn")
