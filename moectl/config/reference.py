"""The config reference, generated from the fields' defaults and descriptions: commented YAML
(reference_yaml, printed by `moectl config`) and docs/config.md (reference_markdown)."""

from __future__ import annotations

import json

import yaml

from .root import SECTIONS, Config


def reference_yaml() -> str:
    """Every section and field with its default and description, as commented YAML."""
    out = ["# moectl config reference: every key, its default, and what it does."]
    for name, section in SECTIONS.items():
        out.append("")
        out.append(f"{name}:  # {Config.model_fields[name].description}")
        defaults = section().model_dump(mode="json")
        for key, field in section.model_fields.items():
            value = yaml.safe_dump(defaults[key], default_flow_style=True).strip()
            value = value.removesuffix("...").strip()
            out.append(f"  {key}: {value}  # {field.description}")
    return "\n".join(out) + "\n"


def reference_markdown() -> str:
    """docs/config.md's config reference tables, generated from the same fields."""
    out = []
    for name, section in SECTIONS.items():
        out.append(f"**`{name}`**: {Config.model_fields[name].description}\n")
        out.append("| key | default | description |")
        out.append("|---|---|---|")
        defaults = section().model_dump(mode="json")
        for key, field in section.model_fields.items():
            value = json.dumps(defaults[key])
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{name}.{key}` | `{value}` | {desc} |")
        out.append("")
    return "\n".join(out)

