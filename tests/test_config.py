"""moectl.config: precedence, YAML-scalar overrides, error messages, references, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_config
from moectl import config
from moectl.common.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def load_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


def yaml_error(tmp_path: Path, cfg: dict, overrides=None, name: str = "bad.yaml") -> tuple[Path, str]:
    path = write_config(tmp_path / name, cfg)
    return path, load_error(path, overrides)


# ------------------------------------------------------------------------------------ round trip


def test_resolved_config_round_trips(tmp_path):
    src = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    cfg = config.load(src, ["moe.capacity_factor=1.25", "optim.betas=[0.8, 0.99]"])
    out = tmp_path / "out" / "resolved.yaml"
    config.save(cfg, out)
    again = config.load(out)
    assert again == cfg
    assert config.config_hash(again) == config.config_hash(cfg)
    # The saved file is explicit: name and arch defaults are resolved, not null.
    saved = yaml.safe_load(out.read_text())
    assert saved["run"]["name"] == "tiny"
    assert saved["model"]["activation"] == "swiglu"
    assert saved["moe"]["capacity_factor"] == 1.25
    assert saved["optim"]["betas"] == [0.8, 0.99]
    assert set(saved) == set(config.SECTIONS)
    # Atomic write leaves no temporary file behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["resolved.yaml"]


def test_round_trip_of_defaults(tmp_path):
    cfg = config.load(None)
    assert cfg.run.name == "run"
    path = tmp_path / "defaults.yaml"
    config.save(cfg, path)
    assert config.load(path) == cfg
    assert config.dump(cfg) == path.read_text()


# ------------------------------------------------------------------------------------ precedence


def test_precedence_defaults_yaml_overrides(tmp_path):
    raw = tiny_config(tmp_path)
    path = write_config(tmp_path / "prec.yaml", raw)
    cfg = config.load(path)
    # YAML beats defaults ...
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2
    assert cfg.model.d_model == 32
    assert cfg.optim.lr == pytest.approx(3e-3)
    # ... and untouched fields keep their code defaults.
    assert cfg.train.seed == 1337
    assert cfg.model.dropout == 0.0
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.run.name == "tiny"  # set in the YAML, so not the file stem

    over = config.load(path, ["moe.top_k=1", "model.d_model=64", "train.seed=7", "run.name=other"])
    assert over.moe.top_k == 1  # --set beats YAML
    assert over.model.d_model == 64
    assert over.train.seed == 7  # --set beats defaults
    assert over.run.name == "other"
    assert over.moe.num_experts == 4  # YAML value not overridden stays
    # The last --set of a key wins.
    assert config.load(path, ["moe.top_k=1", "moe.top_k=3"]).moe.top_k == 3


def test_yaml_file_scalars(tmp_path):
    path = tmp_path / "scalars.yaml"
    path.write_text(
        "optim:\n  lr: 1e-3\n  eps: 3.0e-9\n  betas: [0.5, 0.6]\nmoe:\n  capacity_factor: null\n"
        "model:\n  tie_embeddings: no\ntrain:\n  eval_batches: ~\n"
    )
    cfg = config.load(path)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == pytest.approx(3e-9)
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.moe.capacity_factor is None
    assert cfg.model.tie_embeddings is False
    assert cfg.train.eval_batches is None
    # --set wins over the file for the same key.
    assert config.load(path, ["optim.lr=3.0e-3"]).optim.lr == 0.003


def test_run_name_defaults_to_file_stem(tmp_path):
    raw = tiny_config(tmp_path)
    del raw["run"]["name"]
    cfg = config.load(write_config(tmp_path / "my-experiment.yaml", raw))
    assert cfg.run.name == "my-experiment"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert config.load(empty).run.name == "empty"
    assert config.load(empty).model == config.load(None).model


@pytest.mark.parametrize(
    "item, attr, expected",
    [
        ("optim.lr=1e-3", ("optim", "lr"), 0.001),
        ("optim.lr=3.0e-3", ("optim", "lr"), 0.003),
        ("optim.lr=0.5", ("optim", "lr"), 0.5),
        ("train.max_steps=420", ("train", "max_steps"), 420),
        ("model.tie_embeddings=false", ("model", "tie_embeddings"), False),
        ("log.tensorboard=true", ("log", "tensorboard"), True),
        ("moe.capacity_factor=null", ("moe", "capacity_factor"), None),
        ("moe.capacity_factor=2", ("moe", "capacity_factor"), 2.0),
        ("train.eval_batches=null", ("train", "eval_batches"), None),
        ("optim.betas=[0.8, 0.99]", ("optim", "betas"), (0.8, 0.99)),
        ("run.name=a=b", ("run", "name"), "a=b"),
        ("train.device=cuda:1", ("train", "device"), "cuda:1"),
    ],
)
def test_override_values_are_yaml_scalars(item, attr, expected):
    cfg = config.load(None, [item])
    value = getattr(getattr(cfg, attr[0]), attr[1])
    assert value == expected
    assert type(value) is type(expected)


def test_override_list_and_new_section(tmp_path):
    raw = tiny_config(tmp_path)
    path = write_config(tmp_path / "t.yaml", raw)
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    cfg = config.load(path, [f"data.data_files=[{files[0]}, {files[1]}]"])
    assert cfg.data.data_files == files
    # A section absent from the YAML is created by the override.
    del raw["checkpoint"]
    path2 = write_config(tmp_path / "t2.yaml", raw)
    assert config.load(path2, ["checkpoint.keep_last=9"]).checkpoint.keep_last == 9
    assert config.load(path2, ["checkpoint.keep_last=9"]).checkpoint.every == 500


def test_parse_override():
    assert config.parse_override("moe.top_k=3") == ("moe.top_k", 3)
    assert config.parse_override(" moe.top_k =3") == ("moe.top_k", 3)
    assert config.parse_override("optim.betas=[0.1, 0.2]") == ("optim.betas", [0.1, 0.2])
    assert config.parse_override("moe.capacity_factor=") == ("moe.capacity_factor", None)
    assert config.parse_override("train.device=cpu") == ("train.device", "cpu")


# ---------------------------------------------------------------------------------------- errors


def test_unknown_key_did_you_mean(tmp_path):
    path, msg = yaml_error(tmp_path, {"moe": {"topk": 1}})
    assert msg == f"{path}: unknown key 'moe.topk' in section 'moe' (did you mean 'top_k'?)"


def test_unknown_section_did_you_mean(tmp_path):
    path, msg = yaml_error(tmp_path, {"modle": {"d_model": 32}})
    assert msg == f"{path}: unknown key 'modle' in the top level (did you mean 'model'?)"


def test_a_key_of_another_section_is_suggested(tmp_path):
    # The same name in another section comes first, then a close name in the key's own section, then elsewhere.
    path, msg = yaml_error(tmp_path, {"train": {"lr": 1e-3}})
    assert msg == f"{path}: unknown key 'train.lr' in section 'train' (did you mean 'optim.lr'?)"
    assert load_error(None, ["train.lr=1e-3"]) == "--set train.lr: unknown key 'train.lr' (did you mean 'optim.lr'?)"
    assert load_error(None, ["train.name=x"]) == (
        "--set train.name: unknown key 'train.name' (did you mean 'run.name', 'data.name' or 'tokenizer.name'?)")
    assert load_error(None, ["train.max_step=1"]).endswith("(did you mean 'max_steps'?)")
    assert load_error(None, ["train.warmup_step=1"]).endswith("(did you mean 'optim.warmup_steps'?)")
    # A section's key given at the top level.
    path, msg = yaml_error(tmp_path, {"lr": 1e-3})
    assert msg == f"{path}: unknown key 'lr' in the top level (did you mean 'optim.lr'?)"
    assert load_error(None, ["lr=1e-3"]) == "--set lr: unknown section 'lr' (did you mean 'optim.lr'?)"


def test_unknown_key_without_close_match_has_no_hint(tmp_path):
    path, msg = yaml_error(tmp_path, {"train": {"zzzzqqq": 1}})
    assert msg == f"{path}: unknown key 'train.zzzzqqq' in section 'train'"


def test_wrong_type_names_key_and_value(tmp_path):
    path, msg = yaml_error(tmp_path, {"model": {"d_model": "abc"}})
    assert msg.startswith(f"{path}: model.d_model='abc': must be a valid integer")
    path, msg = yaml_error(tmp_path, {"moe": {"top_k": 1.5}})
    assert msg.startswith(f"{path}: moe.top_k=1.5: must be a valid integer")
    path, msg = yaml_error(tmp_path, {"model": {"dropout": 1.0}})
    assert msg == f"{path}: model.dropout=1.0: must be less than 1"


def test_section_that_is_not_a_mapping(tmp_path):
    path, msg = yaml_error(tmp_path, {"moe": 3})
    assert msg == f"{path}: moe=3: must be a mapping of moe settings"


def test_literal_choice_did_you_mean(tmp_path):
    path, msg = yaml_error(tmp_path, {"model": {"arch": "transformer_mo"}})
    assert msg == (
        f"{path}: model.arch='transformer_mo': must be one of 'transformer_moe', 'lstm_moe', "
        "'transformer_dense' or 'lstm_dense' (did you mean 'transformer_moe'?)"
    )
    path, msg = yaml_error(tmp_path, {"model": {"activation": "swigl"}})
    assert msg == f"{path}: model.activation='swigl': must be one of 'swiglu', 'gelu' or 'relu' (did you mean 'swiglu'?)"


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"moe": {"num_experts": 8, "top_k": 9}}, "moe.top_k=9 must be <= moe.num_experts=8"),
        ({"model": {"d_model": 30, "n_heads": 4}}, "model.d_model=30 must be divisible by model.n_heads=4"),
        (
            {"model": {"d_model": 36, "n_heads": 4}},
            "model.d_model / model.n_heads = 9 must be even for rotary embeddings",
        ),
        (
            {"train": {"batch_size": 10, "micro_batch_size": 4}},
            "train.batch_size=10 must be a multiple of train.micro_batch_size=4",
        ),
        ({"data": {"source": "hub"}}, "data.name is required when data.source=hub"),
        ({"data": {"source": "files"}}, "data.data_files is required when data.source=files"),
        ({"data": {"source": "disk"}}, "data.path is required when data.source=disk"),
        (
            {"data": {"source": "stdlib", "path": "/x"}},
            "data.path is only used with data.source=disk, but data.source=stdlib",
        ),
        (
            {"model": {"arch": "lstm_moe", "n_layers": 1}},
            "model.n_layers=1 must be >= 2 for an LSTM model (FFN slots sit between layers)",
        ),
        (
            {"tokenizer": {"path": "t.json", "name": "gpt2"}},
            "tokenizer.path and tokenizer.name are both set; set at most one",
        ),
        ({"train": {"device": "gpu"}}, "train.device='gpu' must be auto, cpu, mps, cuda or cuda:N"),
    ],
)
def test_cross_field_checks(tmp_path, sections, expected):
    path, msg = yaml_error(tmp_path, sections)
    assert msg == f"{path}: {expected}"


def test_cross_field_checks_that_pass():
    # top_k > num_experts is fine for a dense model (no router); odd head dims are fine for an LSTM.
    assert config.from_dict({"model": {"arch": "transformer_dense"}, "moe": {"num_experts": 1, "top_k": 2}}).moe.top_k == 2
    assert config.from_dict({"model": {"arch": "lstm_moe", "d_model": 30, "n_heads": 4}}).model.d_model == 30
    assert config.from_dict({"train": {"batch_size": 12, "micro_batch_size": 4}}).train.micro_batch == 4


def test_from_dict_source_label():
    with pytest.raises(ConfigError) as info:
        config.from_dict({"moe": {"top_k": 9}})
    assert str(info.value) == "<config>: moe.top_k=9 must be <= moe.num_experts=8"


def test_errors_blame_the_override(tmp_path):
    path = write_config(tmp_path / "ok.yaml", tiny_config(tmp_path))
    # A bad value that came from --set names the flag, not the file.
    assert load_error(path, ["moe.top_k=9"]) == "--set moe.top_k: moe.top_k=9 must be <= moe.num_experts=4"
    assert load_error(path, ["moe.num_experts=1"]) == "--set moe.num_experts: moe.top_k=2 must be <= moe.num_experts=1"
    assert load_error(path, ["model.d_model=abc"]).startswith(
        "--set model.d_model: model.d_model='abc': must be a valid integer"
    )
    assert load_error(path, ["model.arch=lstm"]) == (
        "--set model.arch: model.arch='lstm': must be one of 'transformer_moe', 'lstm_moe', "
        "'transformer_dense' or 'lstm_dense' (did you mean 'lstm_moe'?)"
    )
    assert load_error(None, ["data.source=hub"]) == "--set data.source: data.name is required when data.source=hub"
    # A bad value in the file is still blamed on the file when an unrelated key is overridden.
    bad = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, moe={"top_k": 9}))
    assert load_error(bad, ["train.seed=1"]) == f"{bad}: moe.top_k=9 must be <= moe.num_experts=4"


def test_union_field_error_names_the_key_and_blames_the_override(tmp_path):
    msg = load_error(None, ["data.source=files", "data.data_files=true"])
    assert msg == "--set data.data_files: data.data_files=True: must be a string, a list or a mapping"
    assert "\n" not in msg
    assert "data.data_files.str" not in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\nmodel:\n  d_model: 32\n\tn_heads: 2\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}:5:")
    assert "invalid YAML" in msg
    path.write_text("model:\n  d_model: 32\n  n_heads: [2, 4\ntrain:\n  seed: 1\n")
    msg = load_error(path)
    assert re.match(re.escape(str(path)) + r":4:\d+: invalid YAML: ", msg), msg


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert load_error(path) == f"{path}: the top level must be a mapping of sections, not list"
    path.write_text("just a string\n")
    assert load_error(path) == f"{path}: the top level must be a mapping of sections, not str"


def test_missing_and_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert load_error(missing) == f"{missing}: no such config file"
    assert load_error(tmp_path) == f"{tmp_path}: cannot read the config file (IsADirectoryError)"


def test_set_without_equals():
    assert load_error(None, ["moe.top_k"]) == "--set 'moe.top_k': --set takes KEY=VALUE as one argument, e.g. --set moe.top_k=VALUE"
    assert load_error(None, ["moe.top_k 1"]) == "--set 'moe.top_k 1': --set takes KEY=VALUE as one argument, e.g. --set moe.top_k=1"


def test_set_unknown_key_or_section():
    assert load_error(None, ["moe.topk=1"]) == "--set moe.topk: unknown key 'moe.topk' (did you mean 'top_k'?)"
    assert load_error(None, ["mo.top_k=1"]) == "--set mo.top_k: unknown section 'mo' (did you mean 'moe'?)"
    assert load_error(None, ["moe.top_k.x=1"]) == "--set moe.top_k.x: unknown key 'moe.top_k.x'"
    assert load_error(None, ["zzzz.qqq=1"]) == "--set zzzz.qqq: unknown section 'zzzz'"


# ------------------------------------------------------------------------------------ references


def test_reference_yaml_lists_every_field_with_its_default():
    text = config.reference_yaml()
    parsed = yaml.safe_load(text)
    assert list(parsed) == list(config.SECTIONS)
    for name, section in config.SECTIONS.items():
        assert list(parsed[name]) == list(section.model_fields), name
        defaults = section().model_dump(mode="json")
        assert parsed[name] == defaults, name
        for key, field in section.model_fields.items():
            assert f"  {key}: " in text
            assert f"# {field.description}" in text, f"{name}.{key}"


def test_reference_markdown_lists_every_field():
    text = config.reference_markdown()
    rows = re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \| (?:`([^`]*)`)? \|", text, flags=re.M)
    expected = []
    for name, section in config.SECTIONS.items():
        for key, field in section.model_fields.items():
            expected.append(f"{name}.{key}")
            if isinstance(field.annotation, type) and issubclass(field.annotation, config.Section):  # train.lora
                expected += [f"{name}.{key}.{sub}" for sub in field.annotation.model_fields]
    assert [key for key, _ in rows] == expected
    assert "train.lora.rank" in expected
    defaults = {key: value for key, value in rows}
    assert defaults["moe.top_k"] == "2"
    assert defaults["data.source"] == '"stdlib"'
    assert defaults["optim.betas"] == "[0.9, 0.95]"
    assert defaults["model.activation"] == "null"
    for name in config.SECTIONS:
        assert f"**`{name}`**" in text


# -------------------------------------------------------------------------------- shipped configs


def test_at_least_two_shipped_configs():
    assert len(SHIPPED_CONFIGS) >= 2, [p.name for p in SHIPPED_CONFIGS]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.run.name == path.stem
    assert cfg.model.activation is not None


# ------------------------------------------------------------------------------------ hash / diff


def test_config_hash_and_changed_keys():
    a = config.load(None)
    b = config.load(None)
    assert a == b
    assert config.config_hash(a) == config.config_hash(b)
    assert re.fullmatch(r"[0-9a-f]{16}", config.config_hash(a))
    c = config.load(None, ["moe.top_k=1", "train.seed=5"])
    assert config.config_hash(c) != config.config_hash(a)
    # renormalize follows K unless set: a top-1 router keeps its raw weight.
    assert config.changed(a, c) == {"moe.top_k": (2, 1), "moe.renormalize": (True, False), "train.seed": (1337, 5)}
    assert config.changed(a, b) == {}
    d = config.load(None, ["optim.lr=2e-3"])
    assert config.changed(a, d) == {"optim.lr": (0.001, 0.002)}
    assert config.config_hash(d) != config.config_hash(a)


# ------------------------------------------------------------------------------------ activation


@pytest.mark.parametrize(
    "arch, expected",
    [("transformer_moe", "swiglu"), ("transformer_dense", "swiglu"), ("lstm_moe", "relu"), ("lstm_dense", "relu")],
)
def test_null_activation_resolves_per_arch(tmp_path, arch, expected):
    path = write_config(tmp_path / "a.yaml", {"model": {"arch": arch, "activation": None}})
    cfg = config.load(path)
    assert cfg.model.activation == expected
    assert config.load(None, [f"model.arch={arch}"]).model.activation == expected
    # An explicit choice is kept.
    assert config.load(path, ["model.activation=gelu"]).model.activation == "gelu"


def test_numbers_where_text_or_ints_are_expected():
    # A numeric run name is a name; YAML 1.1's string "1e3" is a number to a researcher.
    cfg = config.load(None, ["run.name=2024", "train.max_steps=1e3", "optim.lr=3e-4"])
    assert cfg.run.name == "2024"
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-4


def test_an_moe_arch_must_have_an_moe_layer():
    with pytest.raises(ConfigError, match=r"moe.every=3 leaves transformer_moe with no MoE layer: it has 2 FFN slots"):
        config.from_dict({"model": {"n_layers": 2}, "moe": {"every": 3}})
    with pytest.raises(ConfigError, match=r"moe.every=2 leaves lstm_moe with no MoE layer: it has 1 FFN slots"):
        config.from_dict({"model": {"arch": "lstm_moe", "n_layers": 2}, "moe": {"every": 2}})
    assert config.from_dict({"model": {"arch": "transformer_dense", "n_layers": 2}, "moe": {"every": 3}})


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_rejected(value):
    with pytest.raises(ConfigError, match="optim.lr"):
        config.load(None, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match="moe.capacity_factor"):
        config.load(None, [f"moe.capacity_factor={value}"])


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs/path", ""])
def test_run_name_must_be_a_plain_directory_name(name):
    with pytest.raises(ConfigError, match="run.name"):
        config.from_dict({"run": {"name": name}})


@pytest.mark.parametrize("betas", [[0.9], [1.5, 0.9], [0.9, -0.1], "0.9", [True, 0.9]])
def test_betas_must_be_two_numbers_below_one(betas):
    with pytest.raises(ConfigError, match=r"optim.betas=.*must be two numbers in \[0, 1\)"):
        config.from_dict({"optim": {"betas": betas}})


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("moe:\n  num_experts: 16\nmodel:\n  d_model: 64\nmoe:\n  top_k: 1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5:1: invalid YAML: key 'moe' appears twice"):
        config.load(path)


def test_validation_split_cannot_be_the_training_split():
    with pytest.raises(ConfigError, match="data.validation_split='train' is the training split"):
        config.from_dict({"data": {"validation_split": "train"}})


# ------------------------------------------------------------------------ switching the router


def test_a_router_set_on_the_command_line_brings_what_it_needs(tmp_path):
    """`--set moe.router=R` on a config written for another router sets what R needs (its K, its
    paper's losses, weight normalisation and drop order, no option of another router) unless the
    command line sets it too, and says what it set; an explicit value is never overridden."""
    from typer.testing import CliRunner

    from moectl.cli import app

    quickstart = REPO / "configs" / "quickstart.yaml"  # topk, top_k 4
    switch = config.load(quickstart, ["moe.router=switch"])
    assert (switch.moe.top_k, switch.moe.renormalize, switch.moe.aux_loss_coef, switch.moe.z_loss_coef) == (1, False, 0.01, 0.0)
    assert switch.router_filled == {"moe.top_k": 1, "moe.renormalize": None, "moe.z_loss_coef": None}
    gshard = config.load(quickstart, ["moe.router=gshard_top2"])
    assert (gshard.moe.top_k, gshard.moe.drop_policy) == (2, "rank")
    assert "moe.top_k=4 must be 1" in load_error(quickstart, ["moe.router=switch", "moe.top_k=4"])  # the user's value stands
    mine = config.load(quickstart, ["moe.router=hierarchical", "moe.z_loss_coef=0.01", "moe.num_groups=4"])
    assert (mine.moe.top_k, mine.moe.group_top_k, mine.moe.z_loss_coef) == (2, 2, 0.01)
    assert "moe.z_loss_coef" not in mine.router_filled and "moe.num_groups" not in mine.router_filled
    # From a group-limited sigmoid config, another router loses the options only sigmoid takes.
    v3 = write_config(tmp_path / "v3.yaml", {"moe": {"router": "sigmoid", "num_experts": 8, "top_k": 1, "n_group": 4,
                                                     "topk_group": 2, "seq_aux_loss_coef": 1e-3}})
    noisy = config.load(v3, ["moe.router=noisy_topk"])
    assert (noisy.moe.top_k, noisy.moe.n_group, noisy.moe.seq_aux_loss_coef, noisy.moe.importance_loss_coef) == (2, 1, 0.0, 0.1)
    assert config.load(quickstart, ["moe.router=topk"]).router_filled == {}  # not a change of router
    out = CliRunner().invoke(app, ["config", str(quickstart), "--set", "moe.router=switch"])
    assert out.exit_code == 0 and "top_k: 1" in out.stdout
    said = " ".join(out.stderr.split())
    assert "moe.router=switch brings moe.top_k=1, moe.renormalize=False, moe.z_loss_coef=0.0" in said, said


@pytest.mark.parametrize("key", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [0, -1, -0.5])
def test_capacity_factors_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"moe.{key}={value}: (must be greater than 0|must be a number > 0 or .dropless.)$"):
        config.from_dict({"moe": {key: value}})
    assert config.from_dict({"moe": {"eval_capacity_factor": "dropless"}}).moe.eval_capacity_factor == "dropless"
