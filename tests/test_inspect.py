"""`moectl eval`, `moectl route-stats` and `moectl generate` on checkpoints the tests train."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import events, tiny_config
from moectl import config
from moectl.commands import route_stats
from moectl.common import plots
from moectl.services import loaded_model
from moectl.cli import app
from moectl.commands.evaluate import JSON_KEYS as EVAL_KEYS
from moectl.commands.generate import filter_logits, token_pieces
from moectl.moe.record import make_record
from moectl.common.stats import RoutingProfile, summarize
from moectl.commands.train import fit

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Transformer-MoE and LSTM-MoE, trained once for every test here."""
    tmp = tmp_path_factory.mktemp("inspect")
    out = {}
    for arch in ("transformer_moe", "lstm_moe"):
        raw = tiny_config(tmp, arch=arch, run={"name": arch}, train={"max_steps": 4, "eval_every": 4})
        out[arch] = fit(config.from_dict(raw))
    out["tmp"] = tmp
    return out


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------ statistics maths


def test_uniform_and_one_hot_routing_give_the_known_numbers():
    uniform = summarize(torch.full((8,), 100.0), entropy_sum=0.0, tokens=0, dropped=0)
    assert uniform.cv == 0 and uniform.load_entropy == pytest.approx(1.0) and uniform.max_over_mean == 1
    assert uniform.top20_share == pytest.approx(2 / 8) and uniform.bottom20_share == pytest.approx(2 / 8)
    one_hot = summarize(torch.tensor([0, 0, 400.0, 0, 0, 0, 0, 0]), entropy_sum=0.0, tokens=400, dropped=100)
    assert one_hot.max_over_mean == 8 and one_hot.min_over_mean == 0 and one_hot.dead_experts == 7
    assert one_hot.load_entropy == 0 and one_hot.top20_share == 1 and one_hot.bottom20_share == 0
    assert one_hot.drop_fraction == pytest.approx(100 / 500)
    assert one_hot.cv == pytest.approx(math.sqrt(7))  # std of (8, 0 x 7) over its mean 1


def test_routing_profile_counts_a_hand_made_batch():
    # 4 tokens (one sequence), E=3, K=2; token 3 drops its second slot.
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [0, 1]])
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.2, 0.4], [0.7, 0.2, 0.1]])
    rec = make_record(probs.log(), probs, idx, torch.ones(4, 2))
    rec.kept = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    rec.tokens_per_expert = torch.tensor([3, 2, 2])
    rec.num_dropped = torch.tensor(1)
    ids = torch.tensor([[5, 6, 5, 7]])
    prof = RoutingProfile(1, 3, seq_len=4, vocab_size=8)
    prof.update([rec], ids)
    assert prof.load[0].tolist() == [3, 2, 2] and prof.chosen[0].tolist() == [3, 3, 2]
    torch.testing.assert_close(prof.importance[0], probs.sum(0).double())
    assert prof.coselect[0].tolist() == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]
    assert prof.by_position[0].tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]]
    assert prof.by_token[0, 5].tolist() == [2, 1, 1] and prof.by_token[0, 7].tolist() == [1, 0, 0]
    s = prof.summary()[0]
    assert s.drop_fraction == pytest.approx(1 / 8) and s.load == [3, 2, 2]
    # Expert 0 took token 5 twice and token 7 once of its 3: lift(5) = (2/3) / (2/4), lift(7) = (1/3) / (1/4).
    spec = prof.specialisation(0, 0, min_count=1)
    assert [(t["id"], t["count"]) for t in spec["top_tokens"]] == [(5, 2), (7, 1)]
    assert spec["top_tokens"][0]["lift"] == pytest.approx(4 / 3) and spec["top_tokens"][1]["lift"] == pytest.approx(4 / 3)
    assert spec["top10_share"] == 1.0


def test_js_divergence():
    assert route_stats.js_divergence([1, 1, 2], [2, 2, 4]) == pytest.approx(0.0)
    assert route_stats.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum()
    assert route_stats.js_divergence(p, q) == pytest.approx(expected)


def test_sampling_filters_and_token_pieces(runs):
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [True, False, False, True]
    # probabilities 0.64, 0.24, 0.09, 0.03: top-p 0.7 keeps the two that reach it
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [True, False, False, True]
    tok = loaded_model.load(runs["transformer_moe"].run_dir).tokenizer
    ids = tok.encode("é → ü ok", add_special_tokens=False).ids
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "é → ü ok" and len(pieces) == len(ids)


# ------------------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
def test_eval_matches_training_and_reports_bits_per_byte(runs, arch, tmp_path):
    run = runs[arch]
    out_file = tmp_path / "eval.json"
    res = invoke("eval", run.run_dir, "--json", "--out", out_file)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep == json.loads(out_file.read_text())
    assert set(rep) == set(EVAL_KEYS)
    assert rep["loss"] == pytest.approx(run.eval_loss, abs=1e-6)  # the training loop's final evaluation
    assert rep["ppl"] == pytest.approx(math.exp(rep["loss"]))
    assert rep["bits_per_byte"] == pytest.approx(rep["loss"] * rep["tokens"] / math.log(2) / rep["bytes"])
    assert rep["bytes_exact"] and rep["step"] == 4
    # The bytes are the UTF-8 bytes of the scored text.
    model = loaded_model.load(run.run_dir)
    from moectl.commands import evaluate

    blocks, _, batches = evaluate.split_batches(model, "validation", None)
    text_bytes = sum(len(model.tokenizer.decode(blocks.batch(b)[1].reshape(-1).tolist()).encode()) for b in batches)
    assert rep["bytes"] == pytest.approx(text_bytes, rel=0.01)
    assert [layer["slot"] for layer in rep["layers"]] == model.slots
    assert all(layer["tokens"] == rep["tokens"] for layer in rep["layers"])


def test_eval_capacity_factor_drops_tokens_and_changes_loss(runs):
    run = runs["transformer_moe"]
    full = json.loads(invoke("eval", run.run_dir, "--json").stdout)
    tight = json.loads(invoke("eval", run.run_dir, "--json", "--capacity-factor", "0.5").stdout)
    assert tight["eval_capacity_factor"] == 0.5 and full["eval_capacity_factor"] is None
    assert all(layer["drop_fraction"] >= 0.5 for layer in tight["layers"])  # capacity 0.5 keeps at most half
    assert all(layer["drop_fraction"] == 0 for layer in full["layers"])
    assert tight["loss"] != full["loss"]


def test_eval_other_split_and_other_data(runs, tmp_path):
    run = runs["transformer_moe"]
    train_split = json.loads(invoke("eval", run.run_dir, "--json", "--split", "train", "--max-batches", "3").stdout)
    assert train_split["split"] == "train" and train_split["batches"] == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(400)))
    res = invoke("eval", run.run_dir, "--json", "--set", f"data.data_files={other / 'a.txt'}", "--set", "data.sample_by=line")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["loss"] != train_split["loss"]


def test_eval_report_for_people(runs):
    res = invoke("eval", runs["lstm_moe"].run_dir)
    assert res.exit_code == 0, res.output
    assert "bits per byte" in res.stdout and "perplexity" in res.stdout and "max/mean" in res.stdout


# ----------------------------------------------------------------------------------- route-stats


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
def test_route_stats_report_and_files(runs, arch, tmp_path):
    run = runs[arch]
    out = tmp_path / "rs"
    res = invoke("route-stats", run.run_dir, "--out", out)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "layer 00" in res.stdout and "most used" in res.stdout and "collapsed layers" in res.stdout

    rep = json.loads((out / "stats.json").read_text())
    assert set(rep) <= {k for k in route_stats.JSON_KEYS if "." not in k and "[" not in k}
    documented = {k.split("].")[1] for k in route_stats.JSON_KEYS if "]." in k}
    e = 4
    for layer in rep["layers"]:
        assert set(layer) == documented
        assert len(layer["experts"]) == e and sum(x["load"] for x in layer["experts"]) == layer["stats"]["tokens"] * 2
        assert sum(x["share"] for x in layer["experts"]) == pytest.approx(1.0)
        assert sum(x["importance"] for x in layer["experts"]) == pytest.approx(1.0)
        co = np.array(layer["coselection"])
        assert co.shape == (e, e) and np.allclose(co, co.T)
        assert np.diag(co).sum() == pytest.approx(2.0)  # each token chose 2 experts
        assert np.allclose(np.array(layer["by_position"]["share"]).sum(1), 1.0)
        for x in layer["experts"]:
            assert all(t["lift"] > 0 and t["count"] >= 5 and isinstance(t["text"], str) for t in x["top_tokens"])
        rows = (out / f"layer{layer['slot']:02d}.csv").read_text().splitlines()
        assert rows[0].startswith("expert,load,share") and len(rows) == e + 1

    # The PNGs and the TensorBoard images are the plots module's figures of what stats.json holds.
    slots = [layer["slot"] for layer in rep["layers"]]
    heatmap = plots.rgb_array(plots.load_heatmap([layer["stats"]["share"] for layer in rep["layers"]], slots, rep["step"]))
    with Image.open(out / "load_heatmap.png") as img:
        assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), heatmap)
    for layer in rep["layers"]:
        with Image.open(out / f"coselection_layer{layer['slot']:02d}.png") as img:
            figure = plots.rgb_array(plots.coselection(np.array(layer["coselection"]), layer["slot"]))
            assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), figure)
    acc = events(out / "tensorboard")
    assert (acc.Images("routing/load_heatmap")[-1].height, acc.Images("routing/load_heatmap")[-1].width) == heatmap.shape[:2]
    tags = acc.Tags()
    assert "routing/layer00/experts" in tags["histograms"] and "routing/load_heatmap" in tags["images"]
    assert "routing/layer00/coselection" in tags["images"] and "routing/layer00/cv" in tags["scalars"]


def test_route_stats_json_matches_the_files_and_compare_with_itself_has_no_drift(runs, tmp_path):
    run = runs["transformer_moe"]
    res = invoke("route-stats", run.run_dir, "--json", "--compare", run.checkpoint)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [c["js_divergence"] for c in rep["compare"]["layers"]] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert [c["top1_changed"] for c in rep["compare"]["layers"]] == [0.0, 0.0]


def test_route_stats_compare_sees_drift_between_checkpoints(runs):
    run = runs["transformer_moe"]
    early = run.run_dir / "checkpoints" / "step_000003"
    rep = json.loads(invoke("route-stats", run.run_dir, "--json", "--compare", early).stdout)
    assert any(c["top1_changed"] > 0 for c in rep["compare"]["layers"])
    assert all(0 <= c["js_divergence"] <= 1 for c in rep["compare"]["layers"])


# -------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
def test_generate_is_reproducible_and_shows_routing(runs, arch):
    run = runs[arch]
    args = ("generate", run.run_dir, "--prompt", "def f(x):", "--max-new-tokens", "20", "--seed", "7", "--top-k", "50")
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("def f(x):")
    assert first.stdout.endswith("\n")  # the shell's prompt starts on a line of its own
    other = invoke(*args[:-4], "--seed", "8", "--temperature", "1.5")
    assert other.stdout != first.stdout
    model = loaded_model.load(run.run_dir)
    layer = model.slots[-1]  # transformer: layers 0 and 1; LSTM: the one gap, 0
    shown = invoke(*args, "--show-routing", layer)
    assert shown.exit_code == 0, shown.output
    assert f"layer {layer:02d}, top-1 expert of each new token" in shown.stdout and shown.stdout.endswith("\n")
    from moectl.commands.generate import generate

    g = generate(model, "def f(x):", 20, 0.8, 50, None, 7, show_layer=layer)
    assert len(g.experts) == len(g.token_ids) == len(g.pieces)
    assert all(0 <= e < 4 for e in g.experts)
    assert first.stdout.rstrip("\n").endswith(g.text.rstrip("\n")[-10:])


def test_generate_prints_the_text_as_it_is_with_a_final_newline(runs):
    # Piped or not, the prompt and the new text are printed whole: not wrapped at the console's
    # width, and followed by one newline.
    prompt = "x = [" + ", ".join(str(i) for i in range(60)) + "]"  # one line of 200 characters
    res = invoke("generate", runs["transformer_moe"].run_dir, "--prompt", prompt, "--max-new-tokens", "8",
                 "--temperature", "0")
    assert res.exit_code == 0, res.output
    from moectl.commands.generate import generate

    text = generate(loaded_model.load(runs["transformer_moe"].run_dir), prompt, 8, 0.0).text
    assert res.stdout == prompt + text + "\n"


# ------------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_line_and_change_nothing(runs, tmp_path):
    run = runs["transformer_moe"]
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))

    cases = [
        (("eval", tmp_path / "nope"), "no such run or checkpoint directory"),
        (("route-stats", copy / "config.yaml"), "is a file"),
        (("generate", copy, "--show-routing", "5"), "layer 5 is not an MoE layer of this model; its MoE layers are [0, 1]"),
        (("eval", copy, "--set", "model.d_model=64"), "only data.*"),
        (("eval", copy, "--split", "test"), "choose validation or train"),
        (("generate", copy, "--top-p", "1.5"), "--top-p 1.5"),
        (("eval", copy, "--set", f"data.data_files={tmp_path / 'missing' / '*.txt'}"), "missing"),
    ]
    for args, message in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in res.output.replace("\n", " "), (args, res.output)
        assert "Traceback" not in res.output
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((copy / "config.yaml").read_text())
    res = invoke("eval", empty_run)
    assert res.exit_code == 2 and "never saved a checkpoint" in res.output

    no_tok = tmp_path / "no_tok"
    shutil.copytree(run.run_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    res = invoke("route-stats", no_tok)
    assert res.exit_code == 2 and "tokenizer.json is missing" in res.output

    wrong_tok = tmp_path / "wrong_tok"
    shutil.copytree(run.run_dir, wrong_tok)
    shutil.copy(tmp_path / "copy" / "tokenizer.json", wrong_tok / "tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(wrong_tok / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(7)])
    tok.save(str(wrong_tok / "tokenizer.json"))
    res = invoke("generate", wrong_tok)
    assert res.exit_code == 2 and "the tokenizer does not belong to this checkpoint" in res.output

    wrong_cfg = tmp_path / "wrong_cfg"
    shutil.copytree(run.run_dir, wrong_cfg)
    text = (wrong_cfg / "config.yaml").read_text()
    (wrong_cfg / "config.yaml").write_text(text.replace("expert_hidden: 32", "expert_hidden: 48"))
    res = invoke("eval", wrong_cfg)
    assert res.exit_code == 2 and "does not match this model" in res.output, res.output

    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    res = invoke("eval", copy, "--set", f"data.data_files={blank}", "--set", "data.sample_by=line")
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output, res.output


def test_dense_models_have_no_routing_to_report(tmp_path):
    raw = tiny_config(tmp_path, model={"arch": "transformer_dense"}, train={"max_steps": 2, "eval_every": 2})
    result = fit(config.from_dict(raw))
    res = invoke("route-stats", result.run_dir)
    assert res.exit_code == 2 and "dense model" in res.output
    ok = invoke("eval", result.run_dir, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["layers"] == []
