"""Local data files: their format from their names, their split patterns, and, when a builder of
`datasets` fails on a JSON file, the line and the field at fault, named in words."""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from moectl.common.errors import DataError

FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".md": "text",
    ".py": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
EMPTY_PROBE_BYTES = 1 << 20  # a larger file is not read to see whether it holds only whitespace


def infer_format(data_files: Any) -> str:
    first = data_files
    while isinstance(first, (list, dict)):
        first = next(iter(first.values())) if isinstance(first, dict) else (first[0] if first else "")
    suffix = Path(str(first)).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise DataError(
            f"data.format is null and the extension of {first!r} does not say which builder to use; "
            f"set data.format to one of text, json, csv, parquet"
        )
    return FORMAT_BY_SUFFIX[suffix]


def patterns(data_files: Any) -> list[tuple[str, str]]:
    """(split, pattern) pairs of a data_files value (a path, a list, or a mapping split -> either)."""
    if isinstance(data_files, dict):
        return [(split, p) for split, v in data_files.items() for _, p in patterns(v)]
    items = data_files if isinstance(data_files, list) else [data_files]
    return [("train", str(p)) for p in items]


def check_local_files(data_files: Any) -> None:
    for split, pattern in patterns(data_files):
        if "://" in pattern:  # remote (hf://, s3://, https://): left to datasets
            continue
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            raise DataError(f"data.data_files: {pattern!r} ({split}) matches no files; check the path or glob")


def split_files(data_files: Any) -> dict[str, list[str]]:
    """The local files a data_files value matches, by split, each list sorted; a split with a remote
    pattern (hf://, s3://, https://) is left out: what it holds is not known here."""
    out: dict[str, list[str]] = {}
    remote = {split for split, pattern in patterns(data_files) if "://" in pattern}
    for split, pattern in patterns(data_files):
        if split not in remote:
            out.setdefault(split, []).extend(sorted(glob.glob(os.path.expanduser(pattern), recursive=True)))
    return out


def is_empty(file: str) -> bool:
    """A file with no text: no bytes, or only whitespace (datasets reads such a file as no rows)."""
    if not os.path.isfile(file) or os.path.getsize(file) > EMPTY_PROBE_BYTES:
        return False
    with open(file, "rb") as f:
        return not f.read().strip()


def _json_kind(value: Any) -> str:
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"))
    return next(name for types, name in kinds if isinstance(value, types))


def _json_lines(raw: bytes) -> Optional[list[bytes]]:
    """The lines of a JSON-lines file (split on newlines, as datasets reads it), or None for a
    file holding one JSON document (an array of rows): its first non-blank line is no JSON object."""
    lines = raw.split(b"\n")
    first = next((line for line in lines if line.strip()), None)
    if first is not None:
        try:
            if not isinstance(json.loads(first), dict):
                return None
        except ValueError:
            return None
    return lines


def _not_json(number: int, exc: json.JSONDecodeError) -> str:
    return f"line {number}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); fix that line"


def json_line_numbers(file: str) -> Optional[list[int]]:
    """The file line (1-based, as an editor shows it) of each row of a JSON-lines file: blank lines
    hold no row. None for a file that is one JSON document."""
    with open(file, "rb") as f:  # streamed: an instruction-tuning file can be large
        numbers = [i for i, line in enumerate(f, 1) if line.strip()]
        f.seek(0)
        first = next((line for line in f if line.strip()), b"")
    return numbers if _json_lines(first) is not None else None


def json_problem(file: str) -> Optional[str]:
    """Where a JSON or JSON-lines file stops being readable, as `line N: what` with N the file's
    line (1-based, blank lines counted: datasets and pyarrow count rows, from 0, within each
    10 MB chunk). None when Python's json reads it all and every field keeps one type."""
    raw = Path(file).read_bytes()
    lines = _json_lines(raw)
    if lines is None:  # one document
        try:
            json.loads(raw)
        except UnicodeDecodeError:
            return "line 1: not UTF-8 text; save the file as UTF-8"
        except json.JSONDecodeError as exc:
            return _not_json(exc.lineno, exc)
        return None
    seen: dict[str, tuple[str, int]] = {}  # field -> (its JSON type, the line it first had it)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return f"line {number}: not UTF-8 text; save the file as UTF-8"
        except json.JSONDecodeError as exc:
            return _not_json(number, exc)
        if not isinstance(row, dict):
            return f"line {number}: a JSON {_json_kind(row)}, not an object of fields; each line must be one {{...}}"
        for field, value in row.items():
            if value is None:
                continue
            kind, first = seen.setdefault(field, (_json_kind(value), number))
            if kind != _json_kind(value):
                return (f"line {number}: field {field!r} is a {_json_kind(value)}, but a {kind} on line {first}; "
                        "give it one type in every row")
    return None


def locate_json_problem(files: list[str]) -> Optional[str]:
    """`FILE, line N: what` for the first of the JSON `files` datasets could not read, or None."""
    for file in files:
        problem = json_problem(file) if os.path.isfile(file) else None
        if problem:
            return f"{file}, {problem}"
    return None


def builder_reason(exc: Exception) -> str:
    """The first line of a datasets builder's error, less its row number (counted from 0 within
    a chunk of the file, so not a line a person can find)."""
    cause = exc.__cause__ or exc
    reason = str(cause).splitlines()[0] if str(cause) else cause.__class__.__name__
    return re.sub(r" in row \d+", "", reason)
