"""Validation errors in words: a pydantic ValidationError becomes one line per bad key, naming the
file (or the `--set` flag that set it), the dotted key, the bad value and what was expected, with a
did-you-mean for a misspelt key or choice, or a key put in the wrong section (train.lr: optim.lr)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from .root import SECTIONS, Config


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_of(keys: list[str]) -> str:
    names = [f"'{k}'" for k in keys]
    return f" (did you mean {', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]}?)"


def _key_hint(loc: tuple[str, ...]) -> str:
    """The did-you-mean of an unknown key: at the top level a section's name close to it; else the
    key of that name in other sections (train.lr: optim.lr), or the closest name in its own section
    (as the bare name) or another (as section.name)."""
    word, section = loc[-1], loc[0] if len(loc) > 1 else None
    own = _section_fields(loc[:-1])
    if section is None and _did_you_mean(word, own):
        return _did_you_mean(word, own)
    elsewhere: dict[str, list[str]] = {}  # field name -> its dotted keys in the other sections
    for name, cls in SECTIONS.items():
        if name != section:
            for f in cls.model_fields:
                elsewhere.setdefault(f, []).append(f"{name}.{f}")
    if word in elsewhere:
        return _one_of(elsewhere[word])
    close = difflib.get_close_matches(word, list(dict.fromkeys([*own, *elsewhere])), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean '{close[0]}'?)" if close[0] in own else _one_of(elsewhere[close[0]])


def _section_fields(path: tuple[str, ...]) -> list[str]:
    """Field names at a dotted path (root or section), for did-you-mean hints."""
    if not path:
        return list(Config.model_fields)
    section = SECTIONS.get(path[0])
    return list(section.model_fields) if section and len(path) == 1 else []


def _field_key(loc: tuple) -> str:
    """The dotted config key of an error: section.field, without list indices or union-member tags."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts or parts[0] not in SECTIONS:
        return ".".join(parts[:1])
    field = SECTIONS[parts[0]].model_fields.get(parts[1]) if len(parts) > 1 else None
    nested = field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    return ".".join(parts[:3] if nested else parts[:2])  # a subsection's key: train.lora.rank


def _describe_error(err: dict[str, Any], key: str) -> str:
    loc = tuple(key.split(".")) if key else ()
    kind = err["type"]
    if kind == "extra_forbidden":
        where = f"section '{'.'.join(loc[:-1])}'" if len(loc) > 1 else "the top level"
        return f"unknown key '{key}' in {where}{_key_hint(loc)}"
    if kind == "value_error" and not loc:
        return str(err["ctx"]["error"])
    msg = err["msg"]
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
    msg = msg.replace("Input should be", "must be").replace("Value error, ", "").replace("Field required", "missing")
    if kind == "literal_error":
        expected = err["ctx"]["expected"]
        msg = f"must be one of {expected}"
        if isinstance(err.get("input"), str):
            options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",")]
            msg += _did_you_mean(err["input"], [o for o in options if o])
    if kind in ("model_type", "model_attributes_type", "dict_type") and len(loc) == 1:
        msg = f"must be a mapping of {loc[0]} settings"
    return f"{key}={err.get('input')!r}: {msg}" if key else msg


def _union_kind(tag: str, err: dict[str, Any]) -> str:
    """What one member of a Union field accepts, in words, from its tag and its error."""
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error":
        return ctx.get("expected", tag)
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
              "less_than_equal": ("<=", "le")}
    if err["type"] in bounds:
        sign, key = bounds[err["type"]]
        bound = ctx.get(key)
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"{'an integer' if 'int' in tag else 'a number'} {sign} {bound}"
    if tag.startswith("dict"):
        return "a mapping"
    if tag.startswith("list"):
        return "a list"
    tag = tag.removeprefix("constrained-")
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(tag, tag)


def _format_errors(exc: ValidationError, source: str, overrides: dict[str, Any]) -> str:
    # A value that fits no member of a Union field gives one pydantic error per member: merge them.
    groups: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        groups.setdefault(_field_key(err["loc"]), []).append(err)
    lines = []
    for key, errs in groups.items():
        tags = [str(e["loc"][2]) for e in errs if len(e["loc"]) > 2 and not isinstance(e["loc"][2], int)]
        if len(errs) > 1 and len(tags) == len(errs):
            kinds = [_union_kind(t, e) for t, e in zip(tags, errs)]
            text = f"{key}={errs[0].get('input')!r}: must be {', '.join(kinds[:-1])} or {kinds[-1]}"
        else:
            text = "\n".join(_describe_error(e, key) for e in errs)
        blame = key or next((k for k in overrides if k in text), "")  # cross-field: the override it names
        origin = f"--set {blame}" if blame in overrides else source
        lines += [f"{origin}: {line}" for line in text.splitlines()]
    return "\n".join(lines)

