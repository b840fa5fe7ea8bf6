"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load one from a file or the Hub.

A trained tokenizer is cached under the data cache keyed by the training data and settings,
so a second run on the same data reuses it; the run directory keeps its own copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moectl.common import console, hub
from moectl.common.errors import DataError
from moectl.common.fileio import atomic_write_text
from moectl.config import TokenizerConfig
from moectl.data.chat import ROLE_TOKENS

if TYPE_CHECKING:
    import numpy

RECIPE_VERSION = "bytelevel-bpe-2"  # bump when training changes, so old cached tokenizers are not reused


def reserved(eot_token: str, markers: Sequence[str] = ()) -> list[str]:
    """A trained BPE's special tokens: the end-of-text token, the built-in chat template's role
    markers (moectl/data/chat.py), so a model pretrained with it can be instruction-tuned without
    growing its vocabulary, then `markers`, those of the template it is trained for
    (chat.Template.markers), so each is one token; each once."""
    return list(dict.fromkeys([eot_token, *ROLE_TOKENS, *markers]))


def train_bpe(
    texts: Iterator[list[str]], vocab_size: int, min_frequency: int, eot_token: str, length: Optional[int] = None,
    markers: Sequence[str] = (),
) -> Tokenizer:
    """Byte-level BPE (as GPT-2): any text round-trips, with no unknown tokens; the reserved()
    tokens are special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=reserved(eot_token, markers),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_file(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer.path={str(path)!r}: no such file; give a tokenizer.json, or drop it to train one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer.path={str(path)!r}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None


def load_hub(name: str) -> Tokenizer:
    hub.go_offline_if_unreachable()
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as exc:
        if hub.is_offline() or "offline" in str(exc).lower() or isinstance(exc, (ConnectionError, OSError)):
            raise DataError(
                f"tokenizer.name={name!r}: {hub.UNREACHABLE}; use a local tokenizer.json (tokenizer.path=...) "
                "or train one (drop tokenizer.name)"
            ) from None
        raise DataError(f"tokenizer.name={name!r}: cannot load it from the Hub ({str(exc).splitlines()[0]})") from None


def eot_id(tok: Tokenizer, eot_token: str) -> int:
    idx = tok.token_to_id(eot_token)
    if idx is None:
        raise DataError(
            f"tokenizer.eot_token={eot_token!r} is not in the tokenizer's vocabulary; set it to the tokenizer's end-of-text token"
        )
    return idx


def token_byte_lengths(tok: Tokenizer) -> Optional["numpy.ndarray"]:
    """(V,) UTF-8 bytes each token id stands for, for byte-level tokenizers (None for others).

    In a byte-level vocabulary every character is one byte (GPT-2's byte-to-character map);
    added tokens such as end-of-text stand for no text.
    """
    import numpy as np

    if type(tok.decoder).__name__ != "ByteLevel":
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = set(tok.get_added_tokens_decoder())
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.float64)
    for token, idx in tok.get_vocab().items():
        if idx in special:
            continue
        if not set(token) <= alphabet:
            return None
        lengths[idx] = len(token)
    return lengths


def fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def auto_vocab_size(num_bytes: int) -> int:
    """tokenizer.vocab_size=auto: 16384 * (MB)^(1/4), a multiple of 256 in [1024, 65536]."""
    size = 16384 * (max(num_bytes, 1) / 1e6) ** 0.25
    return int(min(max(round(size / 256) * 256, 1024), 65536))


def vocab_size(cfg: TokenizerConfig, train_texts, text_column: str) -> int:
    """The BPE's target size: tokenizer.vocab_size, or `auto` from the UTF-8 bytes it trains on."""
    if cfg.vocab_size != "auto":
        return cfg.vocab_size
    with console.progress("measuring the tokenizer's text", *_text_total(train_texts, cfg)) as bar:
        used = sum(len(t.encode("utf-8")) for batch in _text_batches(train_texts, text_column, cfg.max_train_chars,
                                                                     advance=bar.advance) for t in batch)
    return auto_vocab_size(used)


def build(
    cfg: TokenizerConfig, train_texts, text_column: str, data_fingerprint: str, cache_dir: Path,
    markers: Sequence[str] = (),
) -> tuple[Tokenizer, bool]:
    """The configured tokenizer: loaded, or trained on `train_texts` (cached) with the chat
    template's `markers` reserved (a loaded one is kept as it is: its vocabulary is its model's).
    Returns (tokenizer, from_cache)."""
    if cfg.path is not None:
        tok, cached = load_file(cfg.path), False
    elif cfg.name is not None:
        tok, cached = load_hub(cfg.name), False
    else:
        size = vocab_size(cfg, train_texts, text_column)
        # Markers beyond the built-in ones change the tokenizer; with none, the key is the one it always was.
        extra = reserved(cfg.eot_token, markers)[len(reserved(cfg.eot_token)):]
        key = hashlib.sha256(
            repr(
                (RECIPE_VERSION, data_fingerprint, text_column, size, cfg.min_frequency, cfg.max_train_chars, cfg.eot_token)
                + ((tuple(extra),) if extra else ())
            ).encode()
        ).hexdigest()[:16]
        path = cache_dir / "tokenizers" / f"{key}.json"
        cached = path.is_file()
        if cached:
            tok = Tokenizer.from_file(str(path))
        else:
            with console.progress("training the tokenizer", *_text_total(train_texts, cfg)) as bar:
                def texts() -> Iterator[list[str]]:
                    yield from _text_batches(train_texts, text_column, cfg.max_train_chars, advance=bar.advance)
                    bar.describe("training the tokenizer, learning merges")  # the rest of the wait, uncounted

                tok = train_bpe(texts(), size, cfg.min_frequency, cfg.eot_token, markers=markers)
                bar.describe("training the tokenizer")
            save(tok, path)
    eot_id(tok, cfg.eot_token)
    return tok, cached


def _text_total(dataset, cfg: TokenizerConfig) -> tuple[int, str]:
    """The (total, unit) of _text_batches' progress: documents, or characters under max_train_chars."""
    return (len(dataset), "documents read") if cfg.max_train_chars is None else (cfg.max_train_chars, "characters read")


def _text_batches(dataset, column: str, max_chars: Optional[int], batch: int = 100,
                  advance: Optional[Callable[[int], None]] = None) -> Iterator[list[str]]:
    """The BPE's training text, in lists of up to `batch` documents (small enough for the progress
    to move on a corpus of a few hundred), cut at `max_chars` characters.
    `advance`: told the documents read (the characters kept, under `max_chars`) as they are handed on."""
    used = 0
    for start in range(0, len(dataset), batch):
        rows = dataset[start : start + batch][column]
        texts = [t for t in rows if t]
        if max_chars is not None:
            kept = []
            for t in texts:
                if used >= max_chars:
                    break
                kept.append(t[: max_chars - used])
                used += len(kept[-1])
            texts = kept
        if advance is not None:
            advance(len(rows) if max_chars is None else sum(len(t) for t in texts))
        if texts:
            yield texts
        if max_chars is not None and used >= max_chars:
            return


def save(tok: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically."""
    atomic_write_text(path, tok.to_str(pretty=True))
