"""Data: load text with `datasets` -> tokenise (cached) -> pack into blocks -> batches.

Sources (`data.source`): a Hub dataset, local files through the `datasets` builders, a
`save_to_disk` directory, or `stdlib`: this Python's own standard-library sources, real text
every install carries, so the quickstart needs no download.

Tokenisation runs through `datasets.map` into a cache file keyed by the data's fingerprint
and the tokenizer, so a second run on the same data skips it. Each split becomes one flat
token array with the end-of-text token after every document; block i is tokens[i*L : i*L+L+1]
(inputs are its first L tokens, targets its last L), so no token is padding.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from moectl.common import console, hub
from moectl.common.errors import DataError
from moectl.common.fileio import atomic_write_text
from moectl.config import DataConfig, TokenizerConfig
from moectl.data import formats
from moectl.data import tokenizer as tokenizers_
from moectl.data.chat import TEMPLATE_FILE

TOKENS_VERSION = "2"  # bump when the token layout changes, so old caches are not reused
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def cache_dir(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir or os.environ.get("MOECTL_CACHE") or Path.home() / ".cache" / "moectl").expanduser()
    if root.exists() and not root.is_dir():
        origin = "data.cache_dir" if cfg.cache_dir else "$MOECTL_CACHE" if os.environ.get("MOECTL_CACHE") else "the cache"
        raise DataError(f"{origin}={str(root)!r} is a file, not a directory; point it at a directory")
    return root


# ------------------------------------------------------------------------------------ raw text


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _load_stdlib():
    from datasets import Dataset, DatasetDict

    files = stdlib_files()
    if not files:
        raise DataError("data.source=stdlib: this Python has no standard-library sources; use data.source=files")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return DatasetDict({"train": Dataset.from_dict({"text": texts, "path": [str(f.relative_to(root)) for f in files]})})


def _load_files(cfg: DataConfig):
    import datasets

    formats.check_local_files(cfg.data_files)
    fmt = cfg.format or formats.infer_format(cfg.data_files)
    kwargs = {"sample_by": cfg.sample_by} if fmt == "text" else {}
    by_split = formats.split_files(cfg.data_files)
    for split, files in by_split.items():
        if files and all(formats.is_empty(f) for f in files):
            named = files[0] if len(files) == 1 else f"every {split} file of data.data_files={cfg.data_files!r}"
            raise DataError(f"{named} is empty (no text at all); add text, or point data.data_files at other files")
    try:
        splits = datasets.load_dataset(fmt, data_files=cfg.data_files, **kwargs)
    except FileNotFoundError:
        raise DataError(f"data.data_files={cfg.data_files!r} matches no files; check the path or glob") from None
    except Exception as exc:  # the builders raise DatasetGenerationError, ArrowInvalid, ValueError, ...
        located = formats.locate_json_problem([f for files in by_split.values() for f in files]) if fmt == "json" else None
        reason = f"data.data_files={cfg.data_files!r}: cannot read them as {fmt} ({formats.builder_reason(exc)})"
        raise DataError(located or reason) from None
    for split, ds in splits.items():
        if len(ds) and not has_text(ds, cfg.text_column):
            files = by_split.get(split, [])
            named = files[0] if len(files) == 1 else f"the {split} files of data.data_files={cfg.data_files!r}"
            raise DataError(f"{named}: column {cfg.text_column!r} (data.text_column) has no text, every row is empty; "
                            "fill it, or set data.text_column to the column that holds the text")
    return splits


def has_text(ds, column: str) -> bool:
    """Whether any row of a text column is non-empty (True when it is no text column: checked later)."""
    import pyarrow.compute as pc

    if column not in ds.column_names or getattr(ds.features[column], "dtype", None) not in ("string", "large_string"):
        return True
    # Chunk by chunk, stopping at the first text: a large corpus is not read through on every run.
    return any(pc.any(pc.greater(pc.utf8_length(chunk), 0)).as_py() for chunk in ds.data.column(column).chunks)


def _load_disk(cfg: DataConfig):
    import datasets

    if not Path(cfg.path).exists():
        raise DataError(f"data.path={cfg.path!r}: no such directory; give a directory written by save_to_disk")
    try:
        ds = datasets.load_from_disk(cfg.path)
    except FileNotFoundError as exc:
        raise DataError(f"data.path={cfg.path!r} is not a save_to_disk directory ({str(exc).splitlines()[0]})") from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({cfg.train_split: ds})


def _load_hub(cfg: DataConfig):
    import datasets

    hub.go_offline_if_unreachable()
    try:
        return datasets.load_dataset(cfg.name, cfg.config_name)
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"data.name={cfg.name!r}: no such dataset on the Hugging Face Hub (or it is gated)") from None
    except ConnectionError:
        raise DataError(
            f"data.name={cfg.name!r}: {hub.UNREACHABLE}; use local files (data.source=files), a save_to_disk copy "
            f"(data.source=disk) or the built-in corpus (data.source=stdlib)"
        ) from None
    except ValueError as exc:  # e.g. a config name that does not exist
        raise DataError(f"data.name={cfg.name!r}, data.config_name={cfg.config_name!r}: {str(exc).splitlines()[0]}") from None


def load_raw(cfg: DataConfig, splits=None):
    """(train, validation) `datasets.Dataset`s: the named (or `validation`) split, else carved off
    train. `splits`: a DatasetDict already loaded (instead of loading data.source)."""
    if splits is None:
        loaders = {"stdlib": _load_stdlib, "files": _load_files, "disk": _load_disk, "hub": _load_hub}
        splits = loaders[cfg.source]() if cfg.source == "stdlib" else loaders[cfg.source](cfg)
    available = ", ".join(splits) or "none"
    if cfg.train_split not in splits:
        raise DataError(f"data.train_split={cfg.train_split!r} is not in the dataset; its splits are: {available}")
    train = splits[cfg.train_split]
    named = cfg.validation_split
    if named is None and "validation" in splits and cfg.train_split != "validation":
        named = "validation"  # e.g. data_files: {train: ..., validation: ...}: use it rather than carve
    if named is not None:
        if named not in splits:
            raise DataError(
                f"data.validation_split={named!r} is not in the dataset; its splits are: {available} "
                "(or set it to null to carve one off the training split)"
            )
        return train, splits[named]
    if len(train) < 2:
        raise DataError(
            f"cannot carve a validation split off {len(train)} training document(s); "
            "add data, set data.validation_split, or use data.sample_by=line"
        )
    return carve(train, cfg.validation_fraction, cfg.split_seed)


def carve(ds, fraction: float, seed: int):
    """Hold out a seeded random `fraction` of the documents: (train, validation), each in original order."""
    n = len(ds)
    n_val = min(max(1, round(n * fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    fp = hashlib.sha256(repr((ds._fingerprint, fraction, seed)).encode()).hexdigest()[:16]
    pick = lambda ids, part: ds.select(np.sort(ids), keep_in_memory=True, new_fingerprint=f"{fp}-{part}")  # noqa: E731
    return pick(perm[n_val:], "train"), pick(perm[:n_val], "validation")


def check_text_column(ds, column: str, split: str) -> None:
    if column not in ds.column_names:
        raise DataError(
            f"data.text_column={column!r} is not a column of the {split} split; its columns are: "
            f"{', '.join(ds.column_names)}"
        )
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"data.text_column={column!r} holds {ds.features[column]}, not text; pick a text column")


# -------------------------------------------------------------------------------- tokenisation


@dataclass
class Split:
    """One split as a flat token array: documents joined by the end-of-text token."""

    name: str
    tokens: np.ndarray  # (num_tokens,) int32
    num_docs: int
    num_bytes: int  # UTF-8 bytes of the documents' text: the denominator of bits per byte
    from_cache: bool
    key: str  # identifies the data and tokenizer: a resumed run checks it has not changed

    @property
    def scored_tokens(self) -> np.ndarray:
        """The tokens whose text num_bytes measures: every token of a text split."""
        return self.tokens


def _tokenize_batch(batch: dict[str, list], column: str, tokenizer: Tokenizer, eot: int) -> dict[str, list]:
    texts = [t for t in batch[column] if t]  # empty rows (e.g. wikitext's blank lines) are not documents
    # Documents are text: a literal "<|endoftext|>" inside one is spelled out, not a document boundary.
    # Set here, in the worker: pickling a Tokenizer for num_proc > 1 drops this flag.
    tokenizer.encode_special_tokens = True
    # No template tokens (a Hub tokenizer's BOS/EOS): documents are separated by `eot` alone.
    encoded = tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    return {
        "input_ids": [e.ids + [eot] for e in encoded],
        "num_bytes": [len(t.encode("utf-8")) for t in texts],
    }


def tokenize(ds, name: str, column: str, tokenizer: Tokenizer, eot: int, cache: Path, num_proc: Optional[int]) -> Split:
    from datasets import Features, List, Value

    key = hashlib.sha256(
        repr((TOKENS_VERSION, ds._fingerprint, column, tokenizers_.fingerprint(tokenizer), eot)).encode()
    ).hexdigest()[:16]
    path = cache / "tokens" / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    # With num_proc > 1, datasets writes the cache as shards named <stem>_<rank>_of_<n>.arrow.
    from_cache = path.exists() or any(path.parent.glob(f"{path.stem}_*_of_*{path.suffix}"))
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # _tokenize_batch changes its settings: use a copy
    out = map_with_progress(
        ds,
        _tokenize_batch,
        f"tokenising {name}",
        num_proc,
        from_cache,
        remove_columns=ds.column_names,
        fn_kwargs={"column": column, "tokenizer": tokenizer, "eot": eot},
        features=Features({"input_ids": List(Value("int32")), "num_bytes": Value("int64")}),
        cache_file_name=str(path),
        load_from_cache_file=True,
        new_fingerprint=key,
    )
    if len(out) == 0:
        raise DataError(f"the {name} split has no text in column {column!r}: every row is empty")
    chunks = out.data.column("input_ids").chunks
    tokens = np.concatenate([np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype=np.int32) for c in chunks])
    num_bytes = int(np.asarray(out.data.column("num_bytes").to_numpy()).sum())
    return Split(name=name, tokens=tokens, num_docs=len(out), num_bytes=num_bytes, from_cache=from_cache, key=key)


def map_with_progress(ds, function, description: str, num_proc: Optional[int], from_cache: bool,
                      batch_size: int = 100, **map_kwargs):
    """`ds.map(function, batched=True, ...)` reporting documents done / total (console.progress)
    in place of datasets' own bar. Run in this process, each batch of `batch_size` advances it
    (a row's output is the same in any batch); with num_proc > 1 the workers cannot, so it shows
    the time passing and the count at the end. A split read from the cache reports nothing."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    in_process = num_proc is None or num_proc <= 1
    with console.progress(description, len(ds) if in_process else None, "documents", enabled=not from_cache) as bar:

        def counted(batch: dict, *args, **kwargs):
            out = function(batch, *args, **kwargs)
            table = getattr(batch, "pa_table", None)  # datasets' LazyBatch: its rows, no column formatted
            bar.advance(table.num_rows if table is not None else len(next(iter(batch.values()), [])))
            return out

        library_bars = not are_progress_bars_disabled()
        disable_progress_bars()
        try:
            out = ds.map(counted if in_process else function, batched=True, batch_size=batch_size, num_proc=num_proc,
                         desc=description, **map_kwargs)
        finally:
            if library_bars:
                enable_progress_bars()
        if not in_process:
            bar.advance(len(ds))
    return out


@dataclass
class Corpus:
    train: Split
    validation: Split
    tokenizer: Tokenizer
    tokenizer_from_cache: bool
    eot_id: int
    chat_template: Optional[str] = None  # data.task=sft: the Jinja template the examples were rendered with

    def save(self, run_dir: Path, tokenizer: bool) -> None:
        """What a run directory keeps of its data: tokenizer.json (`tokenizer`: a new run's; a resumed
        run keeps its own) and the chat template that `moectl generate --chat` renders prompts with."""
        if tokenizer:
            tokenizers_.save(self.tokenizer, run_dir / "tokenizer.json")
        if self.chat_template is not None:
            atomic_write_text(run_dir / TEMPLATE_FILE, self.chat_template)


def prepare(d: DataConfig, tok_cfg: TokenizerConfig, tokenizer_file: Optional[Path] = None,
            only: Optional[str] = None) -> Corpus:
    """Load both splits, get the tokenizer (from `tokenizer_file` when resuming), and tokenise.

    `only="training"` or `"validation"` tokenises just that split (the other comes back empty):
    eval and route-stats read one split."""
    train, validation = load_raw(d)
    check_text_column(train, d.text_column, "training")
    check_text_column(validation, d.text_column, "validation")
    cache = cache_dir(d)
    if tokenizer_file is not None:
        tok, tok_cached = tokenizers_.load_file(tokenizer_file), True
    else:
        tok, tok_cached = tokenizers_.build(tok_cfg, train, d.text_column, train._fingerprint, cache)
    eot = tokenizers_.eot_id(tok, tok_cfg.eot_token)
    splits = [
        tokenize(ds, name, d.text_column, tok, eot, cache, d.num_proc)
        if only in (None, name)
        else Split(name=name, tokens=np.zeros(0, dtype=np.int32), num_docs=0, num_bytes=0, from_cache=True, key="")
        for ds, name in ((train, "training"), (validation, "validation"))
    ]
    return Corpus(train=splits[0], validation=splits[1], tokenizer=tok, tokenizer_from_cache=tok_cached, eot_id=eot)


# ------------------------------------------------------------------------------------- batching


class Blocks:
    """Fixed-length blocks over a flat token array: block i = tokens[i*L : i*L + L + 1]."""

    targets = "every token"  # what the loss scores
    weighs_targets = False  # every block scores seq_len targets: each micro-batch weighs the same

    def __init__(self, split: Split, seq_len: int):
        self.split = split
        self.seq_len = seq_len
        self.num_blocks = (len(split.tokens) - 1) // seq_len
        if self.num_blocks < 1:
            raise DataError(
                f"the {split.name} split has {len(split.tokens)} tokens, fewer than one block of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or add data"
            )

    def __len__(self) -> int:
        return self.num_blocks

    def batch(self, block_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) block ids -> inputs and targets, both (B, L) int64."""
        starts = np.asarray(block_ids, dtype=np.int64)[:, None] * self.seq_len
        window = self.split.tokens[starts + np.arange(self.seq_len + 1)]  # (B, L+1)
        window = torch.from_numpy(window.astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def layout(self, block_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Every block is one stretch of the token stream, with no padding: nothing for the model
        beyond the tokens (see sft.ExampleBlocks.layout)."""
        return {}
