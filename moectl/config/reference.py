"""The config reference, generated from the fields' defaults and descriptions: commented YAML
(reference_yaml, printed by `moectl config`) and docs/config.md (reference_markdown)."""

from __future__ import annotations

import json

import yaml

from .root import SECTIONS, Config
from .section import Section


def _fields(section: type[Section], defaults: dict, prefix: str = ""):
    """(dotted key within the section, default, description, whether it is a subsection) of every key,
    a subsection's own keys after it (train.lora, then train.lora.rank, ...)."""
    for key, field in section.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Section) else None
        yield prefix + key, defaults[key], field.description, sub is not None
        if sub is not None:
            yield from _fields(sub, defaults[key], prefix + key + ".")


def reference_yaml() -> str:
    """Every section and field with its default and description, as commented YAML."""
    out = ["# moectl config reference: every key, its default, and what it does."]
    for name, section in SECTIONS.items():
        out.append("")
        out.append(f"{name}:  # {Config.model_fields[name].description}")
        for key, default, description, subsection in _fields(section, section().model_dump(mode="json")):
            indent = "  " * (key.count(".") + 1)
            if subsection:
                out.append(f"{indent}{key.rsplit('.', 1)[-1]}:  # {description}")
                continue
            value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"{indent}{key.rsplit('.', 1)[-1]}: {value}  # {description}")
    return "\n".join(out) + "\n"


def reference_markdown() -> str:
    """docs/config.md's config reference tables, generated from the same fields."""
    out = []
    for name, section in SECTIONS.items():
        out.append(f"**`{name}`**: {Config.model_fields[name].description}\n")
        out.append("| key | default | description |")
        out.append("|---|---|---|")
        for key, default, description, subsection in _fields(section, section().model_dump(mode="json")):
            value = "" if subsection else f"`{json.dumps(default)}`"
            desc = (description or "").replace("|", "\\|")
            out.append(f"| `{name}.{key}` | {value} | {desc} |")
        out.append("")
    return "\n".join(out)

