"""The typed, validated config tree.

One YAML file becomes a `Config`. Precedence is code defaults < YAML < `--set key=value`.
Every field has its default and its description here, in one place; `moectl config` prints
them and docs/config.md (the config reference) is generated from them. The names a user picks from
(ROUTERS, ACTIVATIONS) are defined here too, and the builders in moe/ use these lists.

Errors name the file (or the `--set` flag), the dotted key path, the bad value and what was
expected, e.g. `configs/x.yaml: moe.top_k=9 must be <= moe.num_experts=8`.

Which file holds what (import everything from `moectl.config`):

    section.py    Section, the pydantic base every section shares
    run.py        RunConfig, LogConfig, CheckpointConfig
    model.py      ModelConfig, ACTIVATIONS, and the rules on model keys alone
    moe.py        MoEConfig, ROUTERS and each router's paper defaults (PAPER_LOSSES, LOSS_KEYS,
                  PAPER_DROP_POLICY, ROUTER_TOP_K, router_needs), and the routing rules
    data.py       DataConfig, TokenizerConfig, and the rules on their keys alone
    train.py      TrainConfig, OptimConfig, and the rules on their keys alone
    lora.py       LoRAConfig (train.lora), LORA_TARGETS, and the rules on its keys alone
    root.py       Config (the root), SECTIONS, the rules across sections, the order of all
                  checks, and the paper defaults that fill null keys
    messages.py   a ValidationError in words, one line per bad key
    loading.py    yaml_load, --set overrides, load, from_dict, the reading of old runs' configs,
                  with_values, to_dict, dump, save, config_hash, changed
    reference.py  reference_yaml (`moectl config`) and reference_markdown (docs/config.md)
"""

from moectl.common.errors import ConfigError
from moectl.common.perf_model import PRESETS as HARDWARE_PRESETS

from .data import DataConfig, TokenizerConfig
from .loading import (
    _apply,
    _check_key,
    _Loader,
    _read_as_trained,
    _switch_router,
    changed,
    config_hash,
    dump,
    from_dict,
    load,
    parse_override,
    save,
    to_dict,
    with_values,
    yaml_load,
)
from .messages import _describe_error, _did_you_mean, _field_key, _format_errors, _key_hint, _section_fields, _union_kind
from .model import ACTIVATIONS, ModelConfig
from .moe import LOSS_KEYS, PAPER_DROP_POLICY, PAPER_LOSSES, ROUTER_TOP_K, ROUTERS, MoEConfig, router_needs
from .reference import reference_markdown, reference_yaml
from .root import SECTIONS, Config
from .run import CheckpointConfig, LogConfig, RunConfig
from .section import Section
from .lora import LORA_TARGETS, LoRAConfig
from .train import OptimConfig, TrainConfig

__all__ = [
    # the tree
    "Config", "SECTIONS", "Section", "RunConfig", "ModelConfig", "MoEConfig", "DataConfig", "TokenizerConfig",
    "TrainConfig", "OptimConfig", "LoRAConfig", "LogConfig", "CheckpointConfig",
    # the names a user picks from, and the routers' paper defaults
    "ROUTERS", "ACTIVATIONS", "LORA_TARGETS", "PAPER_LOSSES", "LOSS_KEYS", "PAPER_DROP_POLICY", "ROUTER_TOP_K", "router_needs",
    "HARDWARE_PRESETS",
    # reading and writing
    "load", "from_dict", "yaml_load", "parse_override", "with_values", "to_dict", "dump", "save", "config_hash",
    "changed", "ConfigError",
    # the reference
    "reference_yaml", "reference_markdown",
    # helpers kept importable from here for tests and callers
    "_Loader", "_apply", "_check_key", "_read_as_trained", "_switch_router", "_describe_error", "_did_you_mean",
    "_field_key", "_format_errors", "_key_hint", "_section_fields", "_union_kind",
]
