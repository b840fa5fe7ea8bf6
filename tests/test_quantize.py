"""Weight-only quantisation: the stored integers and scales give back each weight to half a step,
int4 packs two to a byte, tied tensors stay tied, and `moectl quantize` writes a smaller bundle
that every command reads, dequantised, as the numbers its card reports."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, weights
from moectl import config
from moectl.cli import app
from moectl.commands.quantize import plan, roles
from moectl.commands.train import fit
from moectl.common import quant
from moectl.models import build_model
from moectl.services.loaded_model import load

runner = CliRunner()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 40), (7,)])  # 40 and 7: rows end in a padded group
def test_a_round_trip_is_within_half_a_step_of_each_group(bits, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * 0.05
    stored, scales = quant.quantize(w, bits, 16)
    back = quant.dequantize(stored, scales, bits, 16, list(shape))
    assert back.shape == w.shape
    groups, _ = quant._rows(w, 16)
    step = scales.float()[:, None].expand_as(groups)  # each value's own group scale
    err, _ = quant._rows(back - w, 16)
    assert (err.abs() <= step / 2 * 1.001 + 1e-9).all()
    assert stored.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert stored.numel() * 8 == groups.numel() * bits  # int4: two values a byte
    assert stored.numel() + 2 * scales.numel() == quant.stored_bytes(w.numel(), bits, 16, shape[-1])


def test_int4_packs_low_nibble_first_and_stores_exact_values_exactly():
    s = 0.25
    q = torch.tensor([[-7, 7, 0, 3, -1, 2, 5, -4]], dtype=torch.float32)
    stored, scales = quant.quantize(q * s, 4, 8)  # absmax 7 * s: scale = s
    assert float(scales[0]) == s
    assert stored.tolist() == [(-7 + 8) | ((7 + 8) << 4), (0 + 8) | ((3 + 8) << 4), (-1 + 8) | ((2 + 8) << 4),
                               (5 + 8) | ((-4 + 8) << 4)]
    assert quant.dequantize(stored, scales, 4, 8, [1, 8]).equal(q * s)
    zeros, zero_scales = quant.quantize(torch.zeros(8), 8, 8)
    assert zeros.eq(0).all() and quant.dequantize(zeros, zero_scales, 8, 8, [8]).eq(0).all()


def test_pack_keeps_tied_tensors_tied_and_unpack_refuses_another_scheme():
    shared = torch.randn(6, 16)
    state = {"embed.weight": shared, "head.weight": shared, "norm.weight": torch.ones(16), "w": torch.randn(16, 16)}
    tensors, meta = quant.pack(state, {"embed.weight": "int8", "w": "bf16"}, 8)
    assert "head.weight.qweight" not in tensors and tensors["w"].dtype == torch.bfloat16
    back = quant.unpack(tensors, meta)
    assert back["head.weight"] is back["embed.weight"] and back["norm.weight"].equal(state["norm.weight"])
    header = json.loads(meta[quant.QUANT_KEY])
    with pytest.raises(ValueError, match="written by another moectl version"):
        quant.unpack(tensors, {quant.QUANT_KEY: json.dumps({**header, "scheme": "gptq"})})


def test_roles_put_experts_router_shared_experts_and_vectors_apart(tmp_path):
    cfg = config.from_dict(tiny_config(tmp_path, moe={"shared_experts": 1, "router": "sigmoid"}))
    model = build_model(cfg.model, cfg.moe, 300)
    found = roles(model)
    assert found["blocks.0.ffn.inner.experts.w_up"] == "experts"
    assert found["blocks.0.ffn.inner.router.weight"] == "router"
    assert found["blocks.0.ffn.inner.router.expert_bias"] == "vector"
    assert found["blocks.0.ffn.inner.shared.w_up"] == "rest" and found["embed.weight"] == "rest"
    assert plan(model, "int4", "int8")["blocks.0.ffn.inner.router.weight"] == "bf16"  # never below bf16
    assert plan(model, "int4", "none")["blocks.0.ffn.inner.router.weight"] is None


# ------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize")
    cfg = tiny_config(tmp, moe={"num_experts": 4, "top_k": 2, "expert_hidden": 64}, train={"max_steps": 4, "eval_every": 4})
    return fit(config.from_dict(cfg))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("experts, rest", [("int4", "bf16"), ("int8", "int8"), ("int4", "none")])
def test_moectl_quantize_writes_a_smaller_bundle_that_loads_as_reported(run, tmp_path, experts, rest):
    out = tmp_path / "q"
    res = invoke("quantize", run.run_dir, "--experts", experts, "--rest", rest, "--group-size", 32, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    original = (run.checkpoint / "model.safetensors").stat().st_size
    assert rep["file_bytes"] == (out / "model.safetensors").stat().st_size < original * (0.5 if rest != "none" else 0.75)
    assert rep["bytes_by_role"]["experts"]["after"] * (3 if experts == "int8" else 6) < rep["bytes_by_role"]["experts"]["before"]
    full, loaded = weights(run.checkpoint), load(out).model.state_dict()
    name = "blocks.0.ffn.inner.experts.w_down"
    assert loaded[name].equal(quant.fake_quantize(full[name], quant.BITS[experts], 32))
    router = "blocks.1.ffn.inner.router.weight"
    assert loaded[router].equal(full[router] if rest == "none" else full[router].bfloat16().float())
    assert loaded["norm.weight"].equal(full["norm.weight"])
    ev = json.loads(invoke("eval", out, "--json").stdout)
    assert ev["loss"] == pytest.approx(rep["eval_loss_after"], abs=1e-6) and ev["derived"] == [rep["summary"]]
    assert invoke("generate", out, "--max-new-tokens", 4).exit_code == 0
    assert invoke("route-stats", out, "--json").exit_code == 0


def test_a_quantised_bundle_exports_dequantised_weights_to_transformers(run, tmp_path):
    pytest.importorskip("transformers")
    assert invoke("quantize", run.run_dir, "--out", tmp_path / "q").exit_code == 0
    res = invoke("export", tmp_path / "q", "--format", "hf", "--out", tmp_path / "hf")  # checks the logits itself
    assert res.exit_code == 0, res.output


def test_pruned_then_quantised_says_both_and_quantising_twice_is_refused(run, tmp_path):
    assert invoke("prune", run.run_dir, "--keep", 2, "--out", tmp_path / "p").exit_code == 0
    assert invoke("quantize", tmp_path / "p", "--out", tmp_path / "pq").exit_code == 0
    card = (tmp_path / "pq" / "README.md").read_text()
    assert "1. pruned to 2 of 4 experts" in card and "2. weights quantised: experts int4" in card
    res = invoke("quantize", tmp_path / "pq", "--out", tmp_path / "pqq")
    assert res.exit_code == 2 and "already quantised" in res.output and not (tmp_path / "pqq").exists()


@pytest.mark.parametrize("args, message", [
    (["--experts", "int2"], "--experts 'int2': choose int8 or int4"),
    (["--rest", "fp8"], "--rest 'fp8': choose bf16, int8 or none"),
    (["--group-size", "7"], "--group-size 7: choose an even number"),
])
def test_bad_quantize_requests_get_one_line(run, tmp_path, args, message):
    res = invoke("quantize", run.run_dir, "--out", tmp_path / "x", *args)
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "x").exists()


def test_an_lstm_moe_quantises(tmp_path):
    lstm = fit(config.from_dict(tiny_config(tmp_path, "lstm_moe", train={"max_steps": 2, "eval_every": 2})))
    res = invoke("quantize", lstm.run_dir, "--rest", "int8", "--out", tmp_path / "q", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(invoke("eval", tmp_path / "q", "--json").stdout)
    assert ev["loss"] == pytest.approx(json.loads(res.stdout)["eval_loss_after"], abs=1e-6)
