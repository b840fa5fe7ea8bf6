"""Instruction-tuning data (data.task=sft): conversations -> tokens with a response mask -> rows.

Sources are those of language modelling (data.source): JSONL, JSON, Parquet or CSV files, a Hub
dataset, a save_to_disk directory, or `stdlib`, which here means instruction pairs made from
this Python's standard library: "write the docstring for this function" with a function's
signature as the prompt and the first paragraph of its docstring as the response (offline,
like the language-modelling corpus). Each row becomes a conversation (moectl/data/chat.py), is
rendered with the chat template and tokenised piece by piece, so every token is known to be
prompt or response. Only response tokens are targets: the loss, perplexity and bits per byte
count them alone.

Rows of data.seq_len + 1 tokens: one example per row, padded (with the end-of-text token,
never a target), or several whole examples per row with data.packing, each keeping its own
segment id so attention (and the LSTM's state) never crosses from one to the next. An example
longer than a row loses tokens from its start: the prompt side.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from moectl.common.errors import DataError
from moectl.common.fileio import atomic_write_text
from moectl.config import DataConfig, TokenizerConfig
from moectl.data import chat, formats, lm
from moectl.data import tokenizer as tokenizers_
from moectl.models.base import IGNORE_INDEX

SFT_VERSION = "1"  # bump when the token layout changes, so old caches are not reused
DOCSTRING_PROMPT = "Write the docstring for this Python function.\n\n"
IGNORE = IGNORE_INDEX  # a target the loss skips


@dataclass
class Examples(lm.Split):
    """One split of tokenised examples: example i is tokens[offsets[i]:offsets[i + 1]]; `mask`
    marks its response tokens. num_bytes counts the UTF-8 bytes of the responses' text."""

    mask: np.ndarray  # (num_tokens,) bool
    offsets: np.ndarray  # (num_docs + 1,) int64

    @property
    def scored_tokens(self) -> np.ndarray:
        """The response tokens, whose text num_bytes measures."""
        return self.tokens[self.mask]


# ------------------------------------------------------------------------------------ raw rows


def docstring_pairs(files: Optional[list[Path]] = None) -> dict[str, list[str]]:
    """Prompt/response pairs from the standard library (or `files`): each documented function's
    signature, and the first paragraph of its docstring (10 to 400 characters), in a stable order."""
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "path": []}
    for path in lm.stdlib_files() if files is None else files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            summary = doc.strip().split("\n\n")[0].strip() if doc else ""
            if not 10 <= len(summary) <= 400:
                continue
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            rows["prompt"].append(f"{DOCSTRING_PROMPT}{prefix} {node.name}({ast.unparse(node.args)}){returns}:")
            rows["response"].append(summary)
            rows["path"].append(f"{path.name}:{node.lineno}")
    return rows


def _cached_docstring_pairs(cache: Path) -> dict[str, list[str]]:
    """docstring_pairs() of this Python's standard library, kept in the data cache (parsing it
    takes seconds)."""
    import json
    import sys
    import sysconfig

    key = hashlib.sha256(repr((SFT_VERSION, sys.version, sysconfig.get_paths()["stdlib"])).encode()).hexdigest()[:16]
    path = cache / "sft" / f"stdlib-docstrings-{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    pairs = docstring_pairs()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(pairs))
    return pairs


def _load_files(cfg: DataConfig):
    """Each file on its own, so every row knows its file and line (the `_where` column)."""
    import datasets

    formats.check_local_files(cfg.data_files)
    fmt = cfg.format or formats.infer_format(cfg.data_files)
    if fmt == "text":
        raise DataError("data.task=sft reads JSON / JSONL, Parquet or CSV files (fields per example), not plain text; "
                        "set data.format or give such files")
    splits: dict[str, list] = {}
    for split, pattern in formats.patterns(cfg.data_files):
        files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if "://" not in pattern else [pattern]
        for file in files:
            if formats.is_empty(file):
                raise DataError(f"{file} is empty; put examples in it, or leave it out of data.data_files")
            try:
                ds = datasets.load_dataset(fmt, data_files=[file], split="train")
            except Exception as exc:  # the builders raise DatasetGenerationError, ArrowInvalid, ValueError, ...
                located = formats.locate_json_problem([file]) if fmt == "json" and "://" not in file else None
                raise DataError(located or f"{file}: cannot read it as {fmt} ({formats.builder_reason(exc)})") from None
            # JSON lines: the file's line, blank lines counted, as an editor shows it; else the row.
            lines = formats.json_line_numbers(file) if fmt == "json" and "://" not in file else None
            where = ([f"{file}, line {n}" for n in lines] if lines is not None and len(lines) == len(ds)
                     else [f"{file}, row {i + 1}" for i in range(len(ds))])
            splits.setdefault(split, []).append(ds.add_column("_where", where))
    try:
        return datasets.DatasetDict({s: datasets.concatenate_datasets(parts) for s, parts in splits.items()})
    except ValueError as exc:
        raise DataError(f"data.data_files: the files do not share one set of fields ({str(exc).splitlines()[0]})") from None


def load_rows(cfg: DataConfig):
    """(train, validation) datasets of examples, split as for language modelling."""
    from datasets import Dataset, DatasetDict

    if cfg.source == "stdlib":
        pairs = _cached_docstring_pairs(lm.cache_dir(cfg))
        if not pairs["prompt"]:
            raise DataError("data.source=stdlib: this Python has no documented standard-library functions; use data.source=files")
        where = [f"stdlib {p}" for p in pairs.pop("path")]
        return lm.load_raw(cfg, splits=DatasetDict({"train": Dataset.from_dict({**pairs, "_where": where})}))
    if cfg.source == "files":
        return lm.load_raw(cfg, splits=_load_files(cfg))
    return lm.load_raw(cfg)


# -------------------------------------------------------------------------------- tokenisation


def _tokenize_batch(batch: dict[str, list], indices: list[int], form: str, fields: chat.Fields, template: str,
                    template_name: str, eos: str, bos: str, tokenizer: Tokenizer, split: str) -> dict[str, list]:
    tmpl = chat.Template(template, eos, bos, template_name)
    tokenizer.encode_special_tokens = False  # the template's markers and end-of-text are the special tokens
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    pieces, owners, out_bytes = [], [], []
    for row, index in zip(rows, indices):
        where = row.get("_where") or f"the {split} split, row {index + 1}"
        try:
            messages = chat.to_messages(row, form, fields)
            parts = tmpl.pieces(messages)
        except chat.ChatError as exc:
            field = f"field {chat.turn_field(form, fields, exc.turn)!r}: " if exc.turn is not None and exc.turn >= 0 else ""
            raise DataError(f"{where}: {field}{exc}") from None
        pieces += parts
        owners += [len(out_bytes)] * len(parts)
        out_bytes.append(sum(len(m["content"].encode("utf-8")) for m in messages if m["role"] == "assistant"))
    encoded = tokenizer.encode_batch_fast([text for text, _ in pieces], add_special_tokens=False) if pieces else []
    ids: list[list[int]] = [[] for _ in rows]
    mask: list[list[int]] = [[] for _ in rows]
    for (_, counts), owner, enc in zip(pieces, owners, encoded):
        ids[owner] += enc.ids
        mask[owner] += [int(counts)] * len(enc.ids)
    return {"input_ids": ids, "mask": mask, "num_bytes": out_bytes}


def tokenize(ds, name: str, d: DataConfig, eos: str, tokenizer: Tokenizer, template: tuple[str, str], cache: Path) -> Examples:
    """The split's examples rendered with `template` (its source and name), ending in `eos`, tokenised and masked."""
    from datasets import Features, List, Value

    fields = chat.Fields(d.prompt_field, d.response_field, d.messages_field)
    form = input_form(ds, name, fields)
    bos = ""
    key = hashlib.sha256(repr((SFT_VERSION, ds._fingerprint, form, fields, template[0], eos,
                               tokenizers_.fingerprint(tokenizer))).encode()).hexdigest()[:16]
    path = cache / "sft" / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    from_cache = path.exists() or any(path.parent.glob(f"{path.stem}_*_of_*{path.suffix}"))
    out = lm.map_with_progress(
        ds,
        _tokenize_batch,
        f"tokenising {name} examples",
        d.num_proc,
        from_cache,
        with_indices=True,
        remove_columns=ds.column_names,
        fn_kwargs={"form": form, "fields": fields, "template": template[0], "template_name": template[1], "eos": eos,
                   "bos": bos, "tokenizer": Tokenizer.from_str(tokenizer.to_str()), "split": name},
        features=Features({"input_ids": List(Value("int32")), "mask": List(Value("int8")), "num_bytes": Value("int64")}),
        cache_file_name=str(path),
        load_from_cache_file=True,
        new_fingerprint=key,
    )
    if len(out) == 0:
        raise DataError(f"the {name} split has no examples")
    flat = lambda column, dtype: np.concatenate(  # noqa: E731
        [np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype=dtype) for c in out.data.column(column).chunks])
    lengths = np.asarray([len(x) for x in out.data.column("input_ids").to_pylist()], dtype=np.int64)
    return Examples(name=name, tokens=flat("input_ids", np.int32), num_docs=len(out),
                    num_bytes=int(np.asarray(out.data.column("num_bytes").to_numpy()).sum()), from_cache=from_cache,
                    key=key, mask=flat("mask", np.int8).astype(bool), offsets=np.concatenate([[0], np.cumsum(lengths)]))


def input_form(ds, name: str, fields: chat.Fields) -> str:
    """chat.Fields.form of a split, refused with the file (or the split) named."""
    try:
        return fields.form([c for c in ds.column_names if c != "_where"])
    except chat.ChatError as exc:
        where = ds[0]["_where"].rsplit(", ", 1)[0] if "_where" in ds.column_names and len(ds) else f"the {name} split"
        raise DataError(f"{where}: {exc}") from None


def tokenizer_template(tokenizer_file: Optional[Path], tok: TokenizerConfig) -> Optional[str]:
    """The chat template a loaded tokenizer brings: `chat_template` in the tokenizer_config.json
    beside its tokenizer.json (a Hugging Face model directory), or in the Hub repository of
    tokenizer.name when it is in the local cache."""
    import json

    candidates = []
    if tokenizer_file is not None:
        candidates.append(Path(tokenizer_file).with_name("tokenizer_config.json"))
    if tok.path:
        candidates.append(Path(tok.path).expanduser().with_name("tokenizer_config.json"))
    if tok.name and tokenizer_file is None:
        try:
            from huggingface_hub import hf_hub_download

            candidates.append(Path(hf_hub_download(tok.name, "tokenizer_config.json")))
        except Exception:  # not there, or the Hub is unreachable: no template of its own
            pass
    for path in candidates:
        separate = path.with_name("chat_template.jinja")  # where newer transformers save it
        if separate.is_file():
            return separate.read_text(encoding="utf-8")
        if path.is_file():
            settings = json.loads(path.read_text(encoding="utf-8"))
            template = settings.get("chat_template")
            if isinstance(template, list):  # several named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                bos = settings.get("bos_token")
                bos = bos.get("content") if isinstance(bos, dict) else bos
                # The template's own beginning-of-sequence token, fixed in it, so the copy a run keeps renders alike.
                return (f"{{% set bos_token = {json.dumps(bos)} %}}" if isinstance(bos, str) else "") + template
    return None


def prepare(d: DataConfig, tok_cfg: TokenizerConfig, tokenizer_file: Optional[Path] = None,
            only: Optional[str] = None) -> lm.Corpus:
    """Load both splits of examples, get the tokenizer (from `tokenizer_file` when resuming or
    fine-tuning; a BPE trained on the examples' text otherwise) and tokenise them with the chat
    template. `only` as in lm.prepare."""
    train, validation = load_rows(d)
    fields = chat.Fields(d.prompt_field, d.response_field, d.messages_field)
    form = input_form(train, "training", fields)
    cache = lm.cache_dir(d)
    try:
        template = chat.template_source(d.chat_template, tokenizer_template(tokenizer_file, tok_cfg))
        # Parses, or names the problem; a BPE trained here makes the template's markers special tokens.
        markers = chat.Template(template[0], tok_cfg.eot_token, name=template[1]).markers()
    except chat.ChatError as exc:
        raise DataError(str(exc)) from None
    if tokenizer_file is not None:
        tok, tok_cached = tokenizers_.load_file(tokenizer_file), True
    else:
        texts = train.map(_plain_text, fn_kwargs={"form": form, "fields": fields},
                          remove_columns=train.column_names, desc="collecting text for the tokenizer")
        tok, tok_cached = tokenizers_.build(tok_cfg, texts, "text", texts._fingerprint, cache, markers)
    eot = tokenizers_.eot_id(tok, tok_cfg.eot_token)
    splits = [
        tokenize(ds, name, d, tok_cfg.eot_token, tok, template, cache)
        if only in (None, name)
        else Examples(name=name, tokens=np.zeros(0, dtype=np.int32), num_docs=0, num_bytes=0, from_cache=True, key="",
                      mask=np.zeros(0, dtype=bool), offsets=np.zeros(1, dtype=np.int64))
        for ds, name in ((train, "training"), (validation, "validation"))
    ]
    return lm.Corpus(train=splits[0], validation=splits[1], tokenizer=tok, tokenizer_from_cache=tok_cached,
                       eot_id=eot, chat_template=template[0])


def _plain_text(row: dict, form: str, fields: chat.Fields) -> dict[str, str]:
    """Every text field of an example, for training a BPE on (rows that do not parse give none)."""
    try:
        return {"text": "\n".join(m["content"] for m in chat.to_messages(row, form, fields))}
    except chat.ChatError:
        return {"text": ""}


# ------------------------------------------------------------------------------------- batching


class ExampleBlocks:
    """Rows of seq_len + 1 tokens made of whole examples, with the interface of lm.Blocks.

    Without packing, row r is example r, padded. With packing, examples fill rows in order, a new
    row starting when the next example does not fit. Inputs are a row's first L tokens, targets
    its last L, and a target is IGNORE unless it is a response token of the same example as its
    input (so no example is asked to predict the next one's first token).
    """

    targets = "response tokens"  # what the loss scores: prompt, system and padding tokens are not
    # Rows score different numbers of targets: a step weighs each micro-batch by its share of the
    # batch's scored targets, so that every response token counts the same.
    weighs_targets = True

    def __init__(self, split: Examples, seq_len: int, packing: bool, pad_id: int):
        self.split, self.seq_len, self.packing, self.pad_id = split, seq_len, packing, pad_id
        self._last: Optional[tuple[bytes, tuple]] = None  # batch() then segments() of the same ids compose once
        width = seq_len + 1
        lengths = np.diff(split.offsets)
        self.starts = split.offsets[:-1] + np.maximum(lengths - width, 0)  # prompt-side truncation
        self.ends = split.offsets[1:]
        self.truncated = int((lengths > width).sum())
        self.responses_cut = int(sum(split.mask[a:b].any() for a, b in zip(split.offsets[:-1], self.starts) if b > a))
        # Left with no scored target (a row's first token is never one): a conversation that ends in a
        # long user turn can lose its whole response to the prompt-side cut. Such rows train nothing.
        self.responses_lost = int(sum(not split.mask[a + 1 : b].any() for a, b in zip(self.starts, self.ends)))
        if packing:
            rows, fill = [0], 0
            for n in np.minimum(lengths, width):
                if fill + n > width:
                    rows.append(rows[-1])
                    fill = 0
                rows[-1] += 1
                fill += n
            self.row_ptr = np.concatenate([[0], np.asarray(rows, dtype=np.int64)])
        else:
            self.row_ptr = np.arange(len(lengths) + 1, dtype=np.int64)
        self.num_blocks = len(self.row_ptr) - 1
        if self.num_blocks < 1:
            raise DataError(f"the {split.name} split has no examples")

    def __len__(self) -> int:
        return self.num_blocks

    def rows(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B,) row ids -> tokens, response mask and segment ids, each (B, L + 1); padding is
        segment -1."""
        key = np.asarray(row_ids, dtype=np.int64).tobytes()
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = (key, self._compose(row_ids))
        return self._last[1]

    def _compose(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = self.seq_len + 1
        tokens = np.full((len(row_ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(row_ids), width), dtype=bool)
        segments = np.full((len(row_ids), width), -1, dtype=np.int64)
        for b, r in enumerate(np.asarray(row_ids, dtype=np.int64)):
            at = 0
            for seg, e in enumerate(range(self.row_ptr[r], self.row_ptr[r + 1])):
                a, z = self.starts[e], self.ends[e]
                tokens[b, at : at + z - a] = self.split.tokens[a:z]
                mask[b, at : at + z - a] = self.split.mask[a:z]
                segments[b, at : at + z - a] = seg
                at += z - a
        return tokens, mask, segments

    def batch(self, row_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row ids -> inputs (B, L) and targets (B, L), IGNORE where the loss skips."""
        tokens, mask, segments = self.rows(row_ids)
        scored = mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])
        targets = np.where(scored, tokens[:, 1:], IGNORE)
        return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(targets)

    def layout(self, row_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """What the model needs beyond the tokens, as keyword arguments of its forward: `segments`
        (B, L), the example each input token belongs to (padding: -1), with packing; `valid`
        (B, L), False on padding, when the rows have any (the MoE layers route no padding)."""
        segments = self.rows(row_ids)[2][:, :-1]  # (B, L)
        out = {"segments": torch.from_numpy(segments)} if self.packing else {}
        if (segments < 0).any():
            out["valid"] = torch.from_numpy(segments >= 0)
        return out
