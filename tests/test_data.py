"""moectl.data and moectl.tokenizer through the real `datasets` and `tokenizers` code, on files written here.

Nothing is downloaded: conftest sets HF_HUB_OFFLINE and points every cache into a temp dir.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
import torch
from tokenizers import pre_tokenizers

from conftest import module_texts, prepare_corpus
from moectl import config, data
from moectl.data import formats, lm, tokenizer
from moectl.data import BatchSampler, Blocks, Split
from moectl.common.errors import DataError

EOT = "<|endoftext|>"


def _chunks() -> list[str]:
    """Real text in small documents (~2.5 kB), some with non-ASCII characters (bytes != chars)."""
    texts = module_texts()
    picked = [texts[i] for i in (8, 13, 2, 17, 3, 18, 19)]  # fractions, shlex, base64, statistics, bisect, ...
    out = []
    for text in picked:
        out += [text[i : i + 2500] for i in range(0, min(len(text), 10000), 2500)]
    return out


CHUNKS = _chunks()
assert any(len(c.encode("utf-8")) != len(c) for c in CHUNKS)  # the byte count check must mean something


def make_cfg(tmp_path: Path, data_section: dict, **tok) -> config.Config:
    d = {"source": "files", "seq_len": 16, "cache_dir": str(tmp_path / "cache"), **data_section}
    return config.from_dict({"data": d, "tokenizer": {"vocab_size": 300, **tok}})


def write_docs(directory: Path, docs: list[str], prefix: str = "doc") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (directory / f"{prefix}{i:03d}.txt").write_text(text, encoding="utf-8")
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def col(ds, name: str) -> list:
    """A column as a plain list (datasets 5 returns a lazy Column)."""
    return list(ds[name])


def split_docs(split: Split, eot: int) -> list[np.ndarray]:
    """The flat token array cut after every end-of-text token (the last token must be one)."""
    assert split.tokens.dtype == np.int32
    assert split.tokens[-1] == eot
    ends = np.flatnonzero(split.tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [split.tokens[s:e] for s, e in zip(starts, ends)]


def check_split(corpus: data.Corpus, split: Split, texts: list) -> None:
    """`split` is exactly the non-empty `texts`, each encoded and followed by the eot id."""
    docs = [t for t in texts if t]
    eot = corpus.eot_id
    tok = Tokenizer.from_str(corpus.tokenizer.to_str())
    tok.encode_special_tokens = True  # data text never contains the special token, only its spelling
    first = tok.encode(docs[0]).ids + [eot]
    assert split.tokens[: len(first)].tolist() == first
    pieces = split_docs(split, eot)
    assert len(pieces) == len(docs) == split.num_docs
    assert [tok.decode(p.tolist()) for p in pieces] == docs
    assert split.num_bytes == sum(len(t.encode("utf-8")) for t in docs)
    assert len(split.tokens) == sum(len(tok.encode(t).ids) + 1 for t in docs)


# --------------------------------------------------------------------------------- files: text


def test_text_documents_with_carved_validation(tmp_path):
    corpus_dir = write_docs(tmp_path / "corpus", CHUNKS[:10])
    cfg = make_cfg(
        tmp_path,
        {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document", "validation_fraction": 0.2, "split_seed": 5},
    )
    train, val = lm.load_raw(cfg.data)
    assert len(val) == 2 and len(train) == 8
    assert sorted(col(train, "text") + col(val, "text")) == sorted(CHUNKS[:10])
    # Both parts keep the files' order.
    order = {t: i for i, t in enumerate(CHUNKS[:10])}
    assert [order[t] for t in col(train, "text")] == sorted(order[t] for t in col(train, "text"))
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, col(train, "text"))
    check_split(corpus, corpus.validation, col(val, "text"))
    assert corpus.eot_id == corpus.tokenizer.token_to_id(EOT)


def test_text_lines_with_named_validation(tmp_path):
    train_text = "\n".join(["first line", "", "  indented line", "tab\tseparated", "", "ünïcödé ✓ 漢字", "last"]) + "\n"
    val_text = "val one\n\nval two\n"
    (tmp_path / "train.txt").write_text(train_text, encoding="utf-8")
    (tmp_path / "val.txt").write_text(val_text, encoding="utf-8")
    # The BPE needs some text to learn from: add a real document as extra training lines.
    extra = CHUNKS[0]
    (tmp_path / "train2.txt").write_text(extra, encoding="utf-8")
    cfg = make_cfg(
        tmp_path,
        {
            "data_files": {"train": [str(tmp_path / "train.txt"), str(tmp_path / "train2.txt")], "validation": str(tmp_path / "val.txt")},
            "sample_by": "line",
            "validation_split": "validation",
        },
    )
    train, val = lm.load_raw(cfg.data)
    extra_lines = extra.split("\n")
    if extra_lines[-1] == "":
        extra_lines.pop()
    assert col(train, "text") == train_text.split("\n")[:-1] + extra_lines
    assert col(val, "text") == ["val one", "", "val two"]
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, col(train, "text"))
    check_split(corpus, corpus.validation, ["val one", "", "val two"])
    assert corpus.validation.num_docs == 2  # the blank line is not a document
    assert corpus.train.num_docs == sum(1 for t in col(train, "text") if t)


# ------------------------------------------------------------------------------ files: json/csv


def test_jsonl_named_validation_skips_empty_rows(tmp_path):
    train_rows = [{"text": "", "id": 0}, {"text": None, "id": 1}] + [
        {"text": t, "id": i + 2} for i, t in enumerate(CHUNKS[:6])
    ] + [{"text": "", "id": 99}]
    val_rows = [{"text": t, "id": i} for i, t in enumerate(CHUNKS[6:8])] + [{"text": "", "id": 5}]
    cfg = make_cfg(
        tmp_path,
        {
            "data_files": {
                "train": str(write_jsonl(tmp_path / "train.jsonl", train_rows)),
                "validation": str(write_jsonl(tmp_path / "val.jsonl", val_rows)),
            },
            "validation_split": "validation",
        },
    )
    corpus = prepare_corpus(cfg)
    # The first non-empty document comes first: rows 0 and 1 are empty and skipped.
    check_split(corpus, corpus.train, [r["text"] for r in train_rows])
    check_split(corpus, corpus.validation, [r["text"] for r in val_rows])
    assert corpus.train.num_docs == 6 and corpus.validation.num_docs == 2


def test_json_array_carved(tmp_path):
    rows = [{"body": t, "n": i} for i, t in enumerate(CHUNKS[:8])]
    path = tmp_path / "all.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    cfg = make_cfg(tmp_path, {"data_files": str(path), "text_column": "body", "validation_fraction": 0.25})
    train, val = lm.load_raw(cfg.data)
    assert len(val) == 2
    assert sorted(col(train, "n") + col(val, "n")) == list(range(8))
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, col(train, "body"))
    check_split(corpus, corpus.validation, col(val, "body"))


def test_csv_named_validation(tmp_path):
    docs = ['he said, "hi"\nthen left ', "  leading spaces, commas, and\nnewlines"] + CHUNKS[:4]

    def write(path, texts):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i, t in enumerate(texts):
                w.writerow([t, i])
        return str(path)

    cfg = make_cfg(
        tmp_path,
        {
            "data_files": {"train": write(tmp_path / "train.csv", docs), "validation": write(tmp_path / "val.csv", CHUNKS[4:6])},
            "validation_split": "validation",
        },
    )
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, docs)
    check_split(corpus, corpus.validation, CHUNKS[4:6])


def test_parquet_carved(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": CHUNKS[:12], "idx": list(range(12))}).to_parquet(str(path))
    cfg = make_cfg(tmp_path, {"data_files": str(path), "validation_fraction": 0.25, "split_seed": 1})
    train, val = lm.load_raw(cfg.data)
    assert len(val) == 3 and len(train) == 9
    assert sorted(col(train, "idx") + col(val, "idx")) == list(range(12))
    assert col(train, "idx") == sorted(col(train, "idx")) and col(val, "idx") == sorted(col(val, "idx"))
    assert [CHUNKS[i] for i in col(val, "idx")] == col(val, "text")
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, col(train, "text"))
    check_split(corpus, corpus.validation, col(val, "text"))


def test_explicit_format_overrides_extension(tmp_path):
    path = write_jsonl(tmp_path / "rows.data", [{"text": t} for t in CHUNKS[:4]])
    cfg = make_cfg(tmp_path, {"data_files": str(path), "format": "json"})
    train, val = lm.load_raw(cfg.data)
    assert sorted(col(train, "text") + col(val, "text")) == sorted(CHUNKS[:4])
    with pytest.raises(DataError, match=r"set data\.format to one of text, json, csv, parquet"):
        lm.load_raw(make_cfg(tmp_path, {"data_files": str(path)}).data)


# ------------------------------------------------------------------------------------- the carve


def test_carve_is_deterministic_disjoint_and_complete(tmp_path):
    rows = [{"text": f"document number {i}", "id": i} for i in range(40)]
    path = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    cfg = lambda seed: make_cfg(tmp_path, {"data_files": path, "split_seed": seed, "validation_fraction": 0.1})  # noqa: E731
    t1, v1 = lm.load_raw(cfg(3).data)
    t2, v2 = lm.load_raw(cfg(3).data)
    assert col(v1, "id") == col(v2, "id") and col(t1, "id") == col(t2, "id")  # same seed, same carve
    assert len(v1) == 4 and len(t1) == 36
    assert set(col(t1, "id")).isdisjoint(col(v1, "id"))
    assert sorted(col(t1, "id") + col(v1, "id")) == list(range(40))
    assert col(t1, "id") == sorted(col(t1, "id")) and col(v1, "id") == sorted(col(v1, "id"))
    _, v3 = lm.load_raw(cfg(4).data)
    assert col(v3, "id") != col(v1, "id")  # another seed, another carve
    # The carve has its own fingerprints, so caches keyed by them differ per part and seed.
    assert len({t1._fingerprint, v1._fingerprint, v3._fingerprint}) == 3
    assert t1._fingerprint == t2._fingerprint


def test_carve_bounds():
    import datasets

    two = datasets.Dataset.from_dict({"text": ["a", "b"]})
    train, val = lm.carve(two, 0.05, 0)
    assert len(train) == 1 and len(val) == 1  # at least one held out
    many = datasets.Dataset.from_dict({"text": [str(i) for i in range(10)]})
    train, val = lm.carve(many, 0.99, 0)
    assert len(train) == 1 and len(val) == 9  # at least one kept for training
    assert sorted(col(train, "text") + col(val, "text")) == sorted(many["text"])


# ------------------------------------------------------------------------------------------ disk


def test_disk_dataset_dict(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["", *CHUNKS[:6]]}),
            "valid": datasets.Dataset.from_dict({"text": CHUNKS[6:8]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = make_cfg(tmp_path, {"source": "disk", "path": str(tmp_path / "dd"), "validation_split": "valid"})
    train, val = lm.load_raw(cfg.data)
    assert col(train, "text") == ["", *CHUNKS[:6]] and col(val, "text") == CHUNKS[6:8]
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, ["", *CHUNKS[:6]])
    check_split(corpus, corpus.validation, CHUNKS[6:8])


def test_disk_single_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": CHUNKS[:8], "i": list(range(8))}).save_to_disk(str(tmp_path / "one"))
    cfg = make_cfg(tmp_path, {"source": "disk", "path": str(tmp_path / "one"), "validation_fraction": 0.25})
    train, val = lm.load_raw(cfg.data)
    assert len(val) == 2 and sorted(col(train, "i") + col(val, "i")) == list(range(8))
    # A single Dataset becomes the split named by data.train_split, whatever that is.
    cfg2 = make_cfg(tmp_path, {"source": "disk", "path": str(tmp_path / "one"), "train_split": "everything"})
    train2, val2 = lm.load_raw(cfg2.data)
    assert sorted(col(train2, "i") + col(val2, "i")) == list(range(8))
    corpus = prepare_corpus(cfg)
    check_split(corpus, corpus.train, col(train, "text"))


def test_disk_errors(tmp_path):
    with pytest.raises(DataError) as info:
        lm.load_raw(make_cfg(tmp_path, {"source": "disk", "path": str(tmp_path / "missing")}).data)
    assert str(info.value) == (
        f"data.path={str(tmp_path / 'missing')!r}: no such directory; give a directory written by save_to_disk"
    )
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is not a save_to_disk directory"):
        lm.load_raw(make_cfg(tmp_path, {"source": "disk", "path": str(tmp_path / "plain")}).data)


# ---------------------------------------------------------------------------------------- stdlib


def test_stdlib_files():
    import sysconfig

    files = lm.stdlib_files()
    assert len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root) for f in files]
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    for r in rel:
        assert not set(r.parts[:-1]) & {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}, r
    names = {r.as_posix() for r in rel}
    assert {"json/decoder.py", "argparse.py", "random.py"} <= names
    assert files == lm.stdlib_files()  # stable order
    assert len(set(files)) == len(files)


def test_stdlib_source_loads_the_files(monkeypatch):
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    few = [root / "bisect.py", root / "json" / "decoder.py", root / "operator.py", root / "string.py"]
    monkeypatch.setattr(lm, "stdlib_files", lambda: few)
    train, val = lm.load_raw(config.from_dict({"data": {"validation_fraction": 0.25}}).data)
    assert len(val) == 1 and len(train) == 3
    got = dict(zip(col(train, "path") + col(val, "path"), col(train, "text") + col(val, "text")))
    assert got == {f.relative_to(root).as_posix(): f.read_text(encoding="utf-8") for f in few}


# ----------------------------------------------------------------------------------- tokenizer


def test_bpe_is_byte_level_and_has_the_configured_vocab(tmp_path):
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:8])
    corpus = prepare_corpus(make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}))
    tok = corpus.tokenizer
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(EOT) == corpus.eot_id
    rng = random.Random(0)
    pools = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    samples = ["", " ", "\n\n\t", "naïve café — 日本語テキスト 🙂👍🏽 e\u0301 \u200b", "\x00\x01\x7f"]
    samples += ["".join(chr(rng.randrange(*rng.choice(pools))) for _ in range(500)) for _ in range(5)]
    for s in samples:
        ids = tok.encode(s).ids
        assert tok.decode(ids) == s
        assert all(0 <= i < 300 for i in ids)
    # Byte-level: no unknown token, and all 256 byte symbols are in the vocabulary.
    assert tok.encode("\U0001F600").ids and None not in tok.encode("\U0001F600").ids
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(tok.token_to_id(c) is not None for c in alphabet)


def test_auto_vocab_size_follows_the_documented_rule(tmp_path):
    rule = tokenizer.auto_vocab_size
    assert [rule(int(mb * 1e6)) for mb in (1, 16, 256, 4096)] == [16384, 32768, 65536, 65536]
    assert rule(0) == rule(10) == 1024 and rule(1000) == 2816 and rule(int(0.1e6)) == 9216  # 2913.5, 9213.6
    assert all(rule(n) % 256 == 0 for n in (12345, 10**6 + 7, 3 * 10**7))
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:8])
    cfg = make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, vocab_size="auto")
    text_bytes = sum(len(t.encode()) for t in CHUNKS[:8])
    corpus = prepare_corpus(cfg)
    # A trained BPE of the rule's size, or smaller when the text runs out of merges.
    assert 256 < corpus.tokenizer.get_vocab_size() <= rule(text_bytes)
    assert config.from_dict({"tokenizer": {"vocab_size": "auto"}}).tokenizer.vocab_size == "auto"
    with pytest.raises(config.ConfigError, match="tokenizer.vocab_size"):
        config.from_dict({"tokenizer": {"vocab_size": "big"}})


@pytest.mark.parametrize("num_proc", [None, 2])
def test_literal_eot_string_in_a_document(tmp_path, num_proc):
    docs = [CHUNKS[0], f"tok = '{EOT}'  # the GPT-2 separator\n" + CHUNKS[1], CHUNKS[2]]
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in docs])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": CHUNKS[3]}])
    cfg = make_cfg(
        tmp_path,
        {"data_files": {"train": str(train), "validation": str(val)}, "validation_split": "validation", "num_proc": num_proc},
    )
    corpus = prepare_corpus(cfg)
    # One end-of-text token per document, and every document decodes back to itself.
    assert int((corpus.train.tokens == corpus.eot_id).sum()) == corpus.train.num_docs == 3
    check_split(corpus, corpus.train, docs)


def test_tokenizer_path_loads_a_saved_tokenizer(tmp_path, monkeypatch):
    tok = tokenizer.train_bpe(iter([CHUNKS[8:16]]), 290, 2, EOT)
    path = tmp_path / "tok" / "tokenizer.json"
    tokenizer.save(tok, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # atomic, no temp left
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:4])

    def boom(*a, **k):
        raise AssertionError("trained a tokenizer although tokenizer.path is set")

    monkeypatch.setattr(tokenizer, "train_bpe", boom)
    cfg = make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, path=str(path))
    corpus = prepare_corpus(cfg)
    assert corpus.tokenizer.get_vocab_size() == 290
    assert tokenizer.fingerprint(corpus.tokenizer) == tokenizer.fingerprint(tok)
    assert corpus.tokenizer_from_cache is False
    assert corpus.eot_id == tok.token_to_id(EOT)
    check_split(corpus, corpus.train, col(lm.load_raw(cfg.data)[0], "text"))
    # Resuming passes the run's own tokenizer file.
    resumed = prepare_corpus(make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}), path)
    assert resumed.tokenizer_from_cache is True
    assert np.array_equal(resumed.train.tokens, corpus.train.tokens)


def test_bad_tokenizer_path(tmp_path):
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:3])
    files = {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError) as info:
        prepare_corpus(make_cfg(tmp_path, files, path=str(missing)))
    assert str(info.value) == (
        f"tokenizer.path={str(missing)!r}: no such file; give a tokenizer.json, or drop it to train one"
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(DataError, match=r"^tokenizer\.path=.*garbage\.json': not a valid tokenizer\.json \("):
        prepare_corpus(make_cfg(tmp_path, files, path=str(garbage)))


def test_eot_token_not_in_vocab(tmp_path):
    tok = tokenizer.train_bpe(iter([CHUNKS[:4]]), 280, 2, EOT)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(tok, path)
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:3])
    cfg = make_cfg(
        tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, path=str(path), eot_token="</s>"
    )
    with pytest.raises(DataError) as info:
        prepare_corpus(cfg)
    assert str(info.value).startswith("tokenizer.eot_token='</s>' is not in the tokenizer's vocabulary")
    # A trained tokenizer always carries the configured eot token.
    corpus = prepare_corpus(make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, eot_token="</s>"))
    assert corpus.eot_id == corpus.tokenizer.token_to_id("</s>")
    assert corpus.tokenizer.token_to_id(EOT) is None


def test_max_train_chars_limits_the_bpe_text():
    texts = ["a" * 10, "b" * 10, "", "c" * 10]
    ds = {"t": texts}

    class Rows:  # the minimal dataset interface _text_batches uses
        def __len__(self):
            return len(texts)

        def __getitem__(self, s):
            return {"t": ds["t"][s]}

    got = [t for batch in tokenizer._text_batches(Rows(), "t", 15, batch=2) for t in batch]
    assert got == ["a" * 10, "b" * 5]
    assert [t for b in tokenizer._text_batches(Rows(), "t", None, batch=3) for t in b] == ["a" * 10, "b" * 10, "c" * 10]


# ------------------------------------------------------------------------------------- caching


def test_second_prepare_uses_the_caches(tmp_path, monkeypatch):
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:8])
    cfg = make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"})
    first = prepare_corpus(cfg)
    assert first.tokenizer_from_cache is False
    assert first.train.from_cache is False and first.validation.from_cache is False
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss")

    with monkeypatch.context() as m:
        m.setattr(tokenizer, "train_bpe", boom)
        m.setattr(lm, "_tokenize_batch", boom)
        second = prepare_corpus(cfg)
    assert second.tokenizer_from_cache is True
    assert second.train.from_cache is True and second.validation.from_cache is True
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert np.array_equal(second.validation.tokens, first.validation.tokens)
    assert second.train.num_bytes == first.train.num_bytes and second.train.num_docs == first.train.num_docs
    assert tokenizer.fingerprint(second.tokenizer) == tokenizer.fingerprint(first.tokenizer)

    # Other tokenizer settings on the same data: a new tokenizer, so new tokens.
    other = prepare_corpus(make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, vocab_size=280))
    assert other.tokenizer_from_cache is False and other.train.from_cache is False
    assert other.tokenizer.get_vocab_size() == 280

    # Changed text: a new cache key, so the data is re-tokenised (and the tokenizer retrained).
    changed = tmp_path / "c" / "doc000.txt"
    changed.write_text("a brand new first document\n" + CHUNKS[0], encoding="utf-8")
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = []
    real = lm._tokenize_batch

    def counting(batch, *a, **k):
        calls.append(len(batch["text"]))
        return real(batch, *a, **k)

    monkeypatch.setattr(lm, "_tokenize_batch", counting)
    third = prepare_corpus(cfg)
    assert sum(calls) == 8
    assert third.train.from_cache is False and third.validation.from_cache is False
    assert third.tokenizer_from_cache is False
    train, val = lm.load_raw(cfg.data)
    assert "a brand new first document\n" + CHUNKS[0] in col(train, "text") + col(val, "text")
    check_split(third, third.train, col(train, "text"))


# -------------------------------------------------------------------------------------- blocks


def _split(n: int, name: str = "training") -> Split:
    return Split(name=name, tokens=np.arange(n, dtype=np.int32) * 3 + 1, num_docs=1, num_bytes=n, from_cache=False, key="k")


@pytest.mark.parametrize("n, L", [(103, 10), (101, 10), (100, 10), (11, 10), (50, 7)])
def test_blocks_layout(n, L):
    split = _split(n)
    blocks = Blocks(split, L)
    assert len(blocks) == blocks.num_blocks == (n - 1) // L
    ids = np.arange(len(blocks))
    x, y = blocks.batch(ids)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (len(blocks), L)
    for i in ids:
        window = split.tokens[i * L : i * L + L + 1].tolist()
        assert len(window) == L + 1
        assert x[i].tolist() == window[:-1]
        assert y[i].tolist() == window[1:]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Blocks overlap by exactly one token: the last target of block i is the first input of block i+1.
    if len(blocks) > 1:
        assert torch.equal(y[:-1, -1], x[1:, 0])
    # A batch in any order returns those blocks.
    xs, _ = blocks.batch(np.array([len(blocks) - 1, 0]))
    assert xs[0].tolist() == x[-1].tolist() and xs[1].tolist() == x[0].tolist()


def test_blocks_on_a_real_split(tmp_path):
    rows = [{"text": t} for t in CHUNKS[:6]]
    cfg = make_cfg(tmp_path, {"data_files": str(write_jsonl(tmp_path / "d.jsonl", rows)), "seq_len": 32})
    corpus = prepare_corpus(cfg)
    blocks = Blocks(corpus.train, 32)
    assert len(blocks) == (len(corpus.train.tokens) - 1) // 32
    x, y = blocks.batch(np.array([0, 3]))
    assert x[1].tolist() == corpus.train.tokens[96:128].tolist()
    assert y[1].tolist() == corpus.train.tokens[97:129].tolist()


def test_blocks_too_small():
    with pytest.raises(DataError) as info:
        Blocks(_split(10, "validation"), 10)
    msg = str(info.value)
    assert "data.seq_len" in msg and "validation" in msg and "10 tokens" in msg and "= 11" in msg


# ------------------------------------------------------------------------------------- sampler


def _epochs(sampler: BatchSampler, n_epochs: int) -> list[list[np.ndarray]]:
    per_epoch = sampler.num_blocks // sampler.batch_size
    return [[sampler.next() for _ in range(per_epoch)] for _ in range(n_epochs)]


def test_batch_sampler_epochs():
    n, bs, seed = 23, 5, 11
    sampler = BatchSampler(n, bs, seed)
    epochs = _epochs(sampler, 3)
    orders = []
    for e, batches in enumerate(epochs):
        assert all(b.shape == (bs,) for b in batches)
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == len(flat) == (n // bs) * bs  # disjoint batches
        assert set(flat.tolist()) <= set(range(n))
        # The epoch's order is randperm(num_blocks) under seed + epoch, minus the tail.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).numpy()
        assert flat.tolist() == perm[: len(flat)].tolist()
        orders.append(flat.tolist())
    assert orders[0] != orders[1] != orders[2]
    assert sampler.epoch == 2
    # Same seed, same sequence; another seed, another one.
    again = _epochs(BatchSampler(n, bs, seed), 3)
    assert [np.concatenate(b).tolist() for b in again] == orders
    other = _epochs(BatchSampler(n, bs, seed + 100), 1)
    assert np.concatenate(other[0]).tolist() != orders[0]


def test_batch_sampler_exact_fit_has_no_tail():
    sampler = BatchSampler(12, 4, 0)
    first = _epochs(sampler, 1)[0]
    assert sorted(np.concatenate(first).tolist()) == list(range(12))


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 9])
def test_batch_sampler_resumes_exactly(consumed):
    n, bs = 17, 4  # 4 batches per epoch
    original = BatchSampler(n, bs, 3)
    for _ in range(consumed):
        original.next()
    state = original.state_dict()
    assert set(state) == {"epoch", "cursor"}
    state = json.loads(json.dumps(state))  # as a checkpoint would store it
    resumed = BatchSampler(n, bs, 3)
    resumed.load_state_dict(state)
    for _ in range(10):
        assert original.next().tolist() == resumed.next().tolist()
    assert original.state_dict() == resumed.state_dict()
    # Resuming equals never stopping.
    straight = BatchSampler(n, bs, 3)
    seq = [straight.next().tolist() for _ in range(consumed + 5)]
    again = BatchSampler(n, bs, 3)
    again.load_state_dict(state)
    assert [again.next().tolist() for _ in range(5)] == seq[consumed:]


def test_batch_sampler_too_few_blocks():
    with pytest.raises(DataError) as info:
        BatchSampler(3, 4, 0)
    assert str(info.value).startswith("the training split has 3 blocks, fewer than train.batch_size=4")
    assert sorted(BatchSampler(4, 4, 0).next().tolist()) == [0, 1, 2, 3]


def test_eval_batches():
    blocks = Blocks(_split(10 * 8 + 1), 8)  # 10 blocks
    a = data.eval_batches(blocks, 3, None)
    b = data.eval_batches(blocks, 3, None)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    capped = data.eval_batches(blocks, 3, 2)
    # A cap samples the whole split evenly, first and last block included, not just its start.
    assert [x.tolist() for x in capped] == [[0, 2, 4], [5, 7, 9]]
    assert [x.tolist() for x in data.eval_batches(blocks, 3, 2)] == [x.tolist() for x in capped]
    assert [x.tolist() for x in data.eval_batches(blocks, 3, 100)] == [x.tolist() for x in a]
    assert [x.tolist() for x in data.eval_batches(blocks, 20, 5)] == [list(range(10))]


# ---------------------------------------------------------------------------------- bad inputs


def test_missing_text_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": t, "id": i} for i, t in enumerate(CHUNKS[:4])])
    with pytest.raises(DataError) as info:
        prepare_corpus(make_cfg(tmp_path, {"data_files": str(path)}))
    assert str(info.value) == "data.text_column='text' is not a column of the training split; its columns are: content, id"


def test_non_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(CHUNKS[:4])])
    with pytest.raises(DataError) as info:
        prepare_corpus(make_cfg(tmp_path, {"data_files": str(path), "text_column": "id"}))
    msg = str(info.value)
    assert msg.startswith("data.text_column='id' holds ") and msg.endswith("not text; pick a text column")
    assert "int64" in msg


def test_split_where_every_row_is_empty(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in CHUNKS[:4]])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": ""}, {"text": ""}, {"text": None}])
    cfg = make_cfg(
        tmp_path, {"data_files": {"train": str(train), "validation": str(val)}, "validation_split": "validation"}
    )
    with pytest.raises(DataError) as info:
        prepare_corpus(cfg)
    assert str(info.value).startswith(f"{val}: column 'text' (data.text_column) has no text, every row is empty")


def test_data_files_matching_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for pattern in (str(tmp_path / "empty" / "*.txt"), str(tmp_path / "nowhere" / "*.txt"), str(tmp_path / "x.txt")):
        t0 = time.monotonic()
        with pytest.raises(DataError) as info:
            lm.load_raw(make_cfg(tmp_path, {"data_files": pattern}).data)
        assert "matches no files" in str(info.value), str(info.value)
        assert pattern in str(info.value)
        assert time.monotonic() - t0 < 5


def test_unknown_split_names(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in CHUNKS[:2]])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": CHUNKS[2]}])
    files = {"train": str(train), "validation": str(val)}
    with pytest.raises(DataError) as info:
        lm.load_raw(make_cfg(tmp_path, {"data_files": files, "train_split": "trian"}).data)
    assert str(info.value) == "data.train_split='trian' is not in the dataset; its splits are: train, validation"
    with pytest.raises(DataError) as info:
        lm.load_raw(make_cfg(tmp_path, {"data_files": files, "validation_split": "test"}).data)
    assert str(info.value).startswith(
        "data.validation_split='test' is not in the dataset; its splits are: train, validation"
    )
    assert "set it to null" in str(info.value)


def test_single_document_cannot_be_carved(tmp_path):
    (tmp_path / "only.txt").write_text(CHUNKS[0])
    with pytest.raises(DataError) as info:
        lm.load_raw(make_cfg(tmp_path, {"data_files": str(tmp_path / "only.txt"), "sample_by": "document"}).data)
    assert str(info.value).startswith("cannot carve a validation split off 1 training document(s)")
    assert "data.validation_split" in str(info.value)


# ------------------------------------------------------------------------------------- offline


def test_hub_dataset_offline_fails_fast():
    cfg = config.from_dict({"data": {"source": "hub", "name": "wikitext", "config_name": "wikitext-2-raw-v1"}})
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        lm.load_raw(cfg.data)
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert msg.startswith("data.name='wikitext': the Hugging Face Hub is unreachable")
    assert "data.source=files" in msg and "data.source=stdlib" in msg


def test_hub_tokenizer_offline_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        tokenizer.load_hub("gpt2")
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert msg.startswith("tokenizer.name='gpt2': the Hugging Face Hub is unreachable")
    assert "tokenizer.path" in msg


def test_a_validation_split_in_the_data_is_used_when_none_is_named(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CHUNKS[:6]])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in CHUNKS[6:8]])
    cfg = make_cfg(tmp_path, {"data_files": {"train": str(train), "validation": str(val)}})
    assert cfg.data.validation_split is None
    tr, va = lm.load_raw(cfg.data)
    assert col(tr, "text") == CHUNKS[:6] and col(va, "text") == CHUNKS[6:8]  # nothing carved off train


def test_template_tokens_of_a_loaded_tokenizer_are_not_added(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = tokenizer.train_bpe(iter([CHUNKS[8:16]]), 290, 2, EOT)
    bos = tok.token_to_id(EOT)
    tok.post_processor = TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, bos)])  # a BOS, as Llama's
    assert tok.encode("x").ids[0] == bos
    path = tmp_path / "tok.json"
    tokenizer.save(tok, path)
    corpus_dir = write_docs(tmp_path / "c", CHUNKS[:4])
    corpus = prepare_corpus(make_cfg(tmp_path, {"data_files": str(corpus_dir / "*.txt"), "sample_by": "document"}, path=str(path)))
    # Exactly one separator per document: the EOT after it, no template token before it.
    assert int((corpus.train.tokens == bos).sum()) == corpus.train.num_docs
    assert corpus.train.tokens[0] != bos


def test_json_problems_are_placed_on_the_files_own_lines(tmp_path):
    """Line numbers as an editor shows them (1-based, blank lines counted), for JSON lines and for
    one JSON document; datasets' own are 0-based rows within a chunk of the file."""
    lines = tmp_path / "a.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n')
    assert formats.json_problem(str(lines)).startswith("line 4: field 'text' is a number, but a string on line 1")
    assert formats.json_line_numbers(str(lines)) == [1, 3, 4]
    lines.write_text('{"text": "a"}\n\n["text"]\n')
    assert formats.json_problem(str(lines)).startswith("line 3: a JSON array, not an object")
    document = tmp_path / "b.json"
    document.write_text('[\n  {"text": "a"},\n\n  {"text": "b"\n  {"text": "c"}\n]\n')
    assert formats.json_problem(str(document)).startswith("line 5: not valid JSON (Expecting ',' delimiter at column 3)")
    assert formats.json_line_numbers(str(document)) is None
    document.write_text('[{"text": "a"}, {"text": null}]')
    assert formats.json_problem(str(document)) is None
