"""Bad input: one clear error line, a non-zero exit, no traceback, nothing on disk changed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from moectl.services import checkpoint
from moectl.cli import app

runner = CliRunner()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: proof that nothing was touched."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_clean_failure(result, *needles: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train_tiny(tmp_path, own_corpus: bool = False):
    """A finished tiny run: its config file and run directory."""
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, own_corpus=own_corpus, train={"max_steps": 3}))
    assert runner.invoke(app, ["train", str(cfg_file)]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    return cfg_file, run_dir


@pytest.fixture
def trained(tmp_path):
    """A finished tiny run, and a snapshot of its directory."""
    return train_tiny(tmp_path)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("model: [unclosed\n", ["invalid YAML", ":1:"]),
        ("moe:\n  topk: 2\n", ["unknown key 'moe.topk'", "did you mean 'top_k'"]),
        ("model:\n  d_model: wide\n", ["model.d_model='wide'", "integer"]),
        ("moe:\n  num_experts: 4\n  top_k: 9\n", ["moe.top_k=9 must be <= moe.num_experts=4"]),
        ("model:\n  d_model: 30\n  n_heads: 4\n", ["model.d_model=30 must be divisible by model.n_heads=4"]),
        ("data:\n  seq_len: 0\n", ["data.seq_len=0", "greater than 0"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
    ],
)
def test_bad_config(tmp_path, text, needles):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    line = assert_clean_failure(runner.invoke(app, ["train", str(cfg_file)]), *needles)
    assert str(cfg_file) in line
    assert not (tmp_path / "runs").exists() and not Path("runs/bad").exists()


def test_missing_config_file(tmp_path):
    assert_clean_failure(runner.invoke(app, ["train", str(tmp_path / "nope.yaml")]), "no such config file")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("moe.topk=1", ["--set moe.topk", "did you mean 'top_k'"]),
        ("moe.top_k=99", ["--set moe.top_k", "must be <= moe.num_experts"]),
        ("train.max_steps=many", ["--set train.max_steps", "'many'"]),
        ("train.max_steps", ["--set takes KEY=VALUE"]),
        ("train.lr=1e-3", ["--set train.lr", "did you mean 'optim.lr'"]),
    ],
)
def test_bad_override(tiny_config_file, override, needles):
    assert_clean_failure(runner.invoke(app, ["train", str(tiny_config_file), "--set", override]), *needles)


@pytest.mark.parametrize("command", [["train", "CONFIG"], ["config", "CONFIG"], ["config"]])
def test_set_with_a_space_for_the_equals_sign_says_what_set_takes(tiny_config_file, command):
    # Click would take the value as an extra argument (or as CONFIG) and answer with its usage box.
    args = [str(tiny_config_file) if a == "CONFIG" else a for a in command]
    line = assert_clean_failure(runner.invoke(app, [*args, "--set", "train.max_steps", "10"]), "--set takes KEY=VALUE")
    assert "--set train.max_steps=VALUE" in line


def test_moectl_commands_refuse_a_transformers_export_in_one_line(tmp_path):
    # What `moectl export --format hf` writes: transformers' config.json and weights, moectl's meta.json.
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    (out / "model.safetensors").write_bytes(b"")
    source = str(tmp_path / "runs" / "tiny" / "checkpoints" / "step_000006")
    (out / "meta.json").write_text(json.dumps({"format": "moectl-hf-export-1", "step": 6, "source_checkpoint": source}))
    for command in (["generate"], ["eval"], ["route-stats"]):
        line = assert_clean_failure(runner.invoke(app, [*command, str(out)]), "is a transformers export")
        assert source in line and "safetensors bundle" in line and "AutoModelForCausalLM" in line
    (out / "meta.json").unlink()  # a transformers model from elsewhere
    assert_clean_failure(runner.invoke(app, ["generate", str(out)]), "is a transformers model directory")


def test_unknown_flag_is_a_usage_error(tiny_config_file):
    result = runner.invoke(app, ["train", str(tiny_config_file), "--no-such-flag"])
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize(
    "data, needles",
    [
        ({"data_files": "/nonexistent/*.txt"}, ["matches no files"]),
        ({"text_column": "body"}, ["data.text_column='body'", "columns are: text"]),
        ({"seq_len": 10_000_000}, ["fewer than one block", "data.seq_len"]),
    ],
)
def test_bad_data(tmp_path, data, needles):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, data=data))
    assert_clean_failure(runner.invoke(app, ["train", str(cfg_file)]), *needles)
    assert snapshot(tmp_path / "runs") == {}


def test_empty_text_column(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text('{"text": ""}\n' * 20)
    cfg = tiny_config(tmp_path, data={"data_files": str(tmp_path / "empty" / "a.jsonl"), "format": "json"})
    assert_clean_failure(runner.invoke(app, ["train", str(write_config(tmp_path / "t.yaml", cfg))]), "every row is empty")


def test_unreachable_hub_says_offline(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"] = {"source": "hub", "name": "wikitext", "config_name": "wikitext-103-raw-v1"}
    line = assert_clean_failure(runner.invoke(app, ["train", str(write_config(tmp_path / "t.yaml", cfg))]), "unreachable")
    assert "data.source=files" in line


def test_resume_with_nothing_to_resume(tiny_config_file):
    assert_clean_failure(runner.invoke(app, ["train", str(tiny_config_file), "--resume"]), "no checkpoint", "drop --resume")


def test_fresh_run_into_existing_run_is_refused_and_overwrite_replaces_it(trained):
    cfg_file, run_dir = trained
    before = snapshot(run_dir)
    assert_clean_failure(runner.invoke(app, ["train", str(cfg_file)]), "already holds", "--resume", "--overwrite")
    assert snapshot(run_dir) == before
    result = runner.invoke(app, ["train", str(cfg_file), "--overwrite", "--set", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [2]


def test_resume_with_a_different_model_is_refused(trained):
    cfg_file, run_dir = trained
    before = snapshot(run_dir)
    assert_clean_failure(
        runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "model.d_model=64"]),
        "model.d_model: 32 -> 64",
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt", "meta.json"])
def test_corrupt_checkpoint(trained, victim):
    cfg_file, run_dir = trained
    path = checkpoint.latest(run_dir) / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated by a crash or a bad copy
    before = snapshot(run_dir)
    resume = ["train", str(cfg_file), "--resume", "--set", "train.max_steps=5"]  # a run with steps left to train
    line = assert_clean_failure(runner.invoke(app, resume), "is corrupt", victim)
    assert "delete that directory" in line
    assert snapshot(run_dir) == before


def test_debug_shows_the_traceback(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("moe:\n  topk: 2\n")
    result = runner.invoke(app, ["train", str(cfg_file), "--debug"])
    assert result.exit_code != 0
    assert result.exception is not None and "unknown key" in str(result.exception)


def test_entry_points_show_help():
    for cmd in ([sys.executable, "-m", "moectl", "--help"], ["moectl", "train", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "train" in out.stdout


def test_config_command_prints_reference_and_resolved_config(tiny_config_file):
    ref = runner.invoke(app, ["config"])
    assert ref.exit_code == 0 and "moe:" in ref.output and "top_k: 2" in ref.output
    resolved = runner.invoke(app, ["config", str(tiny_config_file), "--set", "moe.top_k=1"])
    assert resolved.exit_code == 0 and "top_k: 1" in resolved.output and "name: tiny" in resolved.output


def test_overwrite_never_deletes_what_is_not_a_run(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    precious = tmp_path / "runs" / "notes"
    precious.mkdir(parents=True)
    (precious / "thesis.txt").write_text("irreplaceable")
    for flags in (["--overwrite"], []):  # neither replaced nor written into
        assert_clean_failure(
            runner.invoke(app, ["train", str(cfg_file), "--run-name", "notes", *flags]), "does not look like a moectl run"
        )
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    assert (precious / "thesis.txt").read_text() == "irreplaceable"


@pytest.mark.parametrize("name", ["..", ".", "a/b"])
def test_run_names_that_escape_the_runs_directory_are_refused(tmp_path, name):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    (tmp_path / "keep.txt").write_text("x")
    for args in (["--set", f"run.name={name}"], ["--run-name", name]):
        assert_clean_failure(runner.invoke(app, ["train", str(cfg_file), *args, "--overwrite"]), "run.name")
    assert (tmp_path / "keep.txt").exists()


def test_the_current_directory_is_never_a_run_directory(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    write_config(tmp_path / "config.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert_clean_failure(runner.invoke(app, ["train", ".", "--overwrite"]), "current directory")
    assert snapshot(tmp_path) == before


def test_run_directory_that_is_a_file(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("not a directory")
    assert_clean_failure(runner.invoke(app, ["train", str(cfg_file)]), "is a file, not a run directory")


def test_a_run_that_never_checkpointed_says_how_to_restart(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg_file.read_text())
    assert_clean_failure(runner.invoke(app, ["train", str(cfg_file)]), "never saved a checkpoint", "--overwrite")
    assert runner.invoke(app, ["train", str(cfg_file), "--overwrite", "--set", "train.max_steps=2"]).exit_code == 0


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    cfg = tiny_config(tmp_path, data={"data_files": str(bad), "format": "parquet"})
    assert_clean_failure(runner.invoke(app, ["train", str(write_config(tmp_path / "t.yaml", cfg))]), "cannot read them as parquet")


@pytest.mark.parametrize("value", ["-1", "0", "banana", "nan"])
def test_capacity_factor_flag_names_itself_and_the_values_it_takes(tmp_path, value):
    line = assert_clean_failure(runner.invoke(app, ["eval", str(tmp_path / "nowhere"), "--capacity-factor", value]),
                                f"--capacity-factor {value}: must be a number > 0 or dropless")
    assert "--set" not in line and "literal" not in line
    for good in ("dropless", "1.5"):  # taken at the flag: the error is then the missing run's
        assert_clean_failure(runner.invoke(app, ["eval", str(tmp_path / "nowhere"), "--capacity-factor", good]),
                             "no such run")


def _rows(task: str, n: int) -> list[str]:
    if task == "lm":
        return [json.dumps({"text": f"document {i}: " + "some words of text " * 20}) for i in range(n)]
    return [json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) for i in range(n)]


def _json_config(tmp_path: Path, file: Path, task: str) -> Path:
    data = {"data_files": str(file), "format": "json", **({"task": "sft"} if task == "sft" else {})}
    return write_config(tmp_path / "t.yaml", tiny_config(tmp_path, data=data))


@pytest.mark.parametrize("blank", [False, True])
@pytest.mark.parametrize("task", ["lm", "sft"])
def test_a_malformed_json_line_is_named_by_its_line_in_the_file(tmp_path, task, blank):
    lines = _rows(task, 16)
    if blank:
        lines[4] = ""  # line 5 holds no row: datasets' row numbers drift from the file's lines
    lines[12] = '{"text": "cut off'  # line 13
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(lines) + "\n")
    assert_clean_failure(runner.invoke(app, ["train", str(_json_config(tmp_path, file, task))]),
                         f"{file}, line 13: not valid JSON")
    assert snapshot(tmp_path / "runs") == {}


def test_an_instruction_row_is_named_by_its_line_in_the_file(tmp_path):
    lines = _rows("sft", 10)
    lines[2] = ""
    lines[6] = json.dumps({"prompt": "a question", "response": ""})  # line 7, the 6th row
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(lines) + "\n")
    assert_clean_failure(runner.invoke(app, ["train", str(_json_config(tmp_path, file, "sft"))]),
                         f"{file}, line 7: field 'response' is empty")


@pytest.mark.parametrize(
    "name, text, data",
    [
        ("empty.txt", "", {}),
        ("blank.txt", "\n \n\n", {"sample_by": "line"}),
        ("empty.jsonl", "", {"format": "json"}),
        ("blank.jsonl", "\n\n", {"format": "json", "task": "sft"}),
    ],
)
def test_an_empty_data_file_is_named(tmp_path, name, text, data):
    file = tmp_path / "data" / name
    file.parent.mkdir()
    file.write_text(text)
    cfg = tiny_config(tmp_path, data={"data_files": str(file), **data})
    line = assert_clean_failure(runner.invoke(app, ["train", str(write_config(tmp_path / "t.yaml", cfg))]),
                                f"{file} is empty")
    assert "features" not in line
    assert snapshot(tmp_path / "runs") == {}


def test_a_text_column_empty_in_every_row_names_the_file(tmp_path):
    file = tmp_path / "data" / "a.jsonl"
    file.parent.mkdir()
    file.write_text('{"text": "", "id": 1}\n' * 20)
    cfg = tiny_config(tmp_path, data={"data_files": str(file), "format": "json"})
    assert_clean_failure(runner.invoke(app, ["train", str(write_config(tmp_path / "t.yaml", cfg))]),
                         f"{file}: column 'text'", "every row is empty")


def test_resuming_a_finished_run_says_so_before_loading_data(tmp_path):
    """A no-op that succeeds (a job script may rerun its one --resume command), and says how to train on."""
    cfg_file, run_dir = train_tiny(tmp_path, own_corpus=True)  # a corpus of its own, to move away
    (tmp_path / "corpus").rename(tmp_path / "moved")  # loading the data would fail: it is not loaded
    before = snapshot(run_dir)
    for target in (run_dir, cfg_file):
        result = runner.invoke(app, ["train", str(target), "--resume"])
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())  # rich wraps long lines
        assert "already finished at step 3 (train.max_steps=3), nothing to train" in said
        assert "--resume --set train.max_steps=6" in said and "tokens/s" not in said and "error" not in said
    assert snapshot(run_dir) == before


def test_version_flag_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"moectl {version('moectl')}\n"


@pytest.mark.parametrize(
    "command, flag, choices, bad",
    [
        ("eval", "--split", ["validation", "train"], "test"),
        ("route-stats", "--split", ["validation", "train"], "test"),
        ("export", "--format", ["safetensors", "hf"], "onnx"),
        ("export", "--dtype", ["fp32", "bf16", "fp16"], "int8"),
    ],
)
def test_flags_with_a_fixed_set_of_values_list_them_and_refuse_others(tmp_path, command, flag, choices, bad):
    assert "|".join(choices) in runner.invoke(app, [command, "--help"]).output
    out = ["--out", str(tmp_path / "out")] if command == "export" else []
    said = f"{flag} '{bad}': choose {', '.join(choices[:-1])} or {choices[-1]}"
    assert_clean_failure(runner.invoke(app, [command, str(tmp_path), flag, bad, *out]), said)  # before loading the run
    assert not (tmp_path / "out").exists()


def test_the_cli_offers_the_formats_and_dtypes_export_knows():
    from moectl import cli
    from moectl.commands import export

    assert cli.EXPORT_FORMATS == tuple(export.FORMATS) and cli.EXPORT_DTYPES == tuple(export.DTYPES)
