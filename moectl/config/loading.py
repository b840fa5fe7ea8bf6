"""Reading and writing configs: YAML with moectl's loader (yaml_load), `--set key=value` overrides
(parse_override, and the router switch they may bring), load and from_dict, the back-compat reading
of an old run's config (_read_as_trained), with_values, and to_dict, dump, save, config_hash and
changed."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ValidationError

from moectl.common.errors import ConfigError
from moectl.common.fileio import atomic_write_text

from .messages import _did_you_mean, _format_errors, _key_hint
from .moe import ROUTERS, MoEConfig, router_needs
from .root import SECTIONS, Config
from .section import Section

# ------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes for configs: `1e-3` is a number (YAML 1.1 floats need a dot), and a
    key given twice in one mapping is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """YAML as moectl's config files read it (see _Loader)."""
    return yaml.load(text, Loader=_Loader)


# ------------------------------------------------------------------------------------ overrides


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value). Values are YAML scalars: 3, 1e-3, true, null, [1, 2]."""
    if "=" not in item:  # `--set KEY VALUE` too: the shell gives --set the key alone
        key, _, value = item.strip().partition(" ")
        example = f"{key}={value.strip() or 'VALUE'}" if key else "moe.top_k=1"
        raise ConfigError(f"--set {item!r}: --set takes KEY=VALUE as one argument, e.g. --set {example}")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the raw string and let validation judge it
    _check_key(key)
    return key, value


def _check_key(key: str) -> None:
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--set {key}: unknown section '{parts[0]}'{_key_hint((parts[0],))}")
    fields = SECTIONS[parts[0]].model_fields
    if len(parts) == 1:
        return
    if parts[1] not in fields:
        raise ConfigError(f"--set {key}: unknown key '{key}'{_key_hint((parts[0], parts[1]))}")
    sub = fields[parts[1]].annotation  # a subsection (train.lora) has keys of its own
    nested = isinstance(sub, type) and issubclass(sub, Section)
    if len(parts) > 2 and (not nested or len(parts) > 3 or parts[2] not in sub.model_fields):
        hint = _did_you_mean(parts[2], list(sub.model_fields)) if nested and len(parts) == 3 else ""
        raise ConfigError(f"--set {key}: unknown key '{key}'{hint}")


def _apply(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' must be a mapping of {part} settings, not {child!r}")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------------- load / dump


def from_dict(
    raw: dict[str, Any], source: str = "<config>", overrides: Optional[dict[str, Any]] = None, trained: bool = False
) -> Config:
    """Validate a raw mapping (YAML already parsed, overrides already applied). `trained`: the
    config a run saved, whose model exists: rules that only guard training (a top-1 router whose
    one weight is always 1) do not refuse it."""
    try:
        cfg = Config.model_validate(raw, context={"trained": trained})
        cfg._trained = trained
        return cfg
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, overrides or {})) from None


def _switch_router(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`--set moe.router=R` on a config written for another router: set what R needs
    (router_needs) unless an override sets it too. Returns what it set, only where that changes
    the config."""
    moe = raw.get("moe") if isinstance(raw.get("moe"), dict) else {}
    router = overrides.get("moe.router")
    before = moe.get("router", MoEConfig.model_fields["router"].default)
    if not isinstance(router, str) or router == before or router not in ROUTERS:
        return {}
    return {k: v for k, v in router_needs(router, moe).items() if k not in overrides}


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a config file holds; a missing, unreadable or malformed file is a ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.__class__.__name__})") from None
    try:
        loaded = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(loaded).__name__}")
    return loaded


def load(path: Union[str, Path, None], overrides: Optional[list[str]] = None, saved: bool = False) -> Config:
    """Read a YAML config, apply `--set` overrides, validate, and fill `run.name` from the file name.
    `saved`: the config.yaml moectl wrote into a run or bundle, read as the model it trained.
    An override that changes moe.router brings what that router needs (router_needs) unless the
    overrides set it too; the config's `router_filled` says what was set."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_yaml(path)
        if saved:
            _read_as_trained(raw, source)
    parsed = dict(parse_override(item) for item in overrides or [])
    filled = _switch_router(raw, parsed)
    before = copy.deepcopy(raw) if filled else None
    for key, value in {**filled, **parsed}.items():
        _apply(raw, key, value, f"--set {key}")
    cfg = from_dict(raw, source, parsed, trained=saved)
    if filled:  # report what the switch changed, resolved (a null loss is the new router's paper value)
        try:
            old = from_dict(before, source, trained=saved).moe
        except ConfigError:
            old = None
        cfg._router_filled = {k: v for k, v in filled.items() if old is None or
                              getattr(old, k.split(".", 1)[1]) != getattr(cfg.moe, k.split(".", 1)[1])}
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "run"
    return cfg


def _read_as_trained(raw: dict[str, Any], source: str) -> None:
    """A run's config.yaml from before model.lstm_sigmoid and per-layer router losses (it has no
    moe.seq_aux_loss_coef, added with them) describes a model without the sigmoid, without V3's
    sequence-wise loss, balancing both levels of a hierarchical router, whose router losses were
    averaged over its MoE layers: read it so, with each coefficient divided by those layers, which
    gives the same objective under the per-layer sum. (GShard's first-choice counting and the
    rank-by-rank batch priority are corrections and apply to it too.)"""
    model, moe = raw.get("model"), raw.get("moe")
    if not isinstance(model, dict) or not isinstance(moe, dict) or "seq_aux_loss_coef" in moe:
        return
    model.setdefault("lstm_sigmoid", False)
    moe.update(seq_aux_loss_coef=0.0, balance_primary=True)  # no V3 sequence loss; both hierarchical levels
    read = from_dict(raw, source, trained=True)
    layers = len(read.moe.slots(read.model))
    for key in ("aux_loss_coef", "importance_loss_coef", "load_loss_coef", "z_loss_coef"):
        if layers and isinstance(moe.get(key), (int, float)):
            moe[key] = moe[key] / layers


def with_values(cfg: Config, source: str, **values: Any) -> Config:
    """A copy of `cfg` with dotted keys set (`**{"run.name": "x"}`), validated; errors blame `source`."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _check_key(key)
        _apply(raw, key, value, source)
    return from_dict(raw, source, trained=cfg._trained)


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, dump(cfg))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def changed(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs."""
    a, b = to_dict(old), to_dict(new)
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}

