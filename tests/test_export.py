"""`moectl export --format safetensors`: the bundle is complete, exact, and read by every command."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from conftest import tiny_config, weights
from moectl import config
from moectl.cli import app
from moectl.models import parameter_counts
from moectl.commands.train import fit
from moectl.services.loaded_model import load

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return fit(config.from_dict(tiny_config(tmp, train={"max_steps": 4, "eval_every": 4})))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fp32_bundle_is_exact_and_every_command_reads_it(run, tmp_path):
    out = tmp_path / "bundle"
    res = invoke("export", run.run_dir, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "meta.json", "model.safetensors", "tokenizer.json"]
    w_run, w_bundle = weights(run.checkpoint), weights(out)
    assert w_run.keys() == w_bundle.keys() and all(w_run[k].equal(w_bundle[k]) for k in w_run)
    assert config.load(out / "config.yaml") == config.load(run.run_dir / "config.yaml")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 4 and meta["dtype"] == "fp32" and meta["eval_loss"] == pytest.approx(run.eval_loss, abs=1e-6)

    from_run = json.loads(invoke("eval", run.run_dir, "--json").stdout)
    from_bundle = json.loads(invoke("eval", out, "--json").stdout)
    assert from_bundle["loss"] == from_run["loss"] and from_bundle["checkpoint"] == str(out)
    rs = invoke("route-stats", out, "--json")
    assert rs.exit_code == 0 and json.loads(rs.stdout)["layers"][0]["stats"] == json.loads(
        invoke("route-stats", run.run_dir, "--json").stdout)["layers"][0]["stats"]
    gen = ("--prompt", "def f(", "--max-new-tokens", "12", "--seed", "3")
    assert invoke("generate", out, *gen).stdout == invoke("generate", run.run_dir, *gen).stdout

    card = (out / "README.md").read_text()
    total, active = parameter_counts(load(run.run_dir).model)
    assert f"{total:,} total, {active:,} active per token" in card
    assert f"{from_run['loss']:.4f} nats/token" in card and "| layer | cv |" in card


def test_bf16_bundle_is_half_the_size_and_close(run, tmp_path):
    res = invoke("export", run.run_dir, "--out", tmp_path / "b16", "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    w = weights(tmp_path / "b16")
    assert all(str(t.dtype) == "torch.bfloat16" for t in w.values() if t.is_floating_point())
    full = json.loads(invoke("eval", run.run_dir, "--json").stdout)["loss"]
    half = json.loads(invoke("eval", tmp_path / "b16", "--json").stdout)["loss"]
    assert half == pytest.approx(full, rel=1e-2) and half != full


def test_export_never_replaces_what_is_not_a_bundle(run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        res = invoke("export", run.run_dir, "--out", out, *extra)
        assert res.exit_code == 2 and res.output.count("error:") == 1
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1

    bundle = tmp_path / "bundle"
    assert invoke("export", run.run_dir, "--out", bundle).exit_code == 0
    res = invoke("export", run.run_dir, "--out", bundle)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = invoke("export", run.run_dir, "--out", bundle, "--overwrite", "--dtype", "fp16")
    assert res.exit_code == 0 and json.loads((bundle / "meta.json").read_text())["dtype"] == "fp16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    for args, message in ((("--dtype", "fp8"), "--dtype 'fp8'"), (("--format", "onnx"), "--format 'onnx'")):
        res = invoke("export", run.run_dir, "--out", tmp_path / "x", *args)
        assert res.exit_code == 2 and message in res.output
        assert not (tmp_path / "x").exists()


def test_a_corrupt_bundle_is_one_clear_error(run, tmp_path):
    out = tmp_path / "bundle"
    assert invoke("export", run.run_dir, "--out", out).exit_code == 0
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    res = invoke("eval", out)
    assert res.exit_code == 2 and "is corrupt: model.safetensors" in res.output and "Traceback" not in res.output


def test_every_exported_file_has_the_mode_a_new_file_gets(run, tmp_path):
    """safetensors writes its file 0600; a directory for sharing gives every file one mode."""
    umask = os.umask(0)
    os.umask(umask)
    for fmt in ("safetensors", "hf"):
        out = tmp_path / fmt
        res = invoke("export", run.run_dir, "--out", out, "--format", fmt)
        assert res.exit_code == 0, res.output
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_file()}
        assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
