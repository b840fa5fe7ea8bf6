"""`moectl export --format hf`: transformers loads the directory as-is and computes the same model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from moectl import config
from moectl.services import hf
from moectl.cli import app
from moectl.commands.generate import generate
from moectl.services.loaded_model import load
from moectl.models import build_model
from moectl.commands.train import fit

transformers = pytest.importorskip("transformers")  # the `test` extra installs it, so CI runs these
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("hf")
    return tmp, tiny_config(tmp, train={"max_steps": 3, "eval_every": 3}, model={"n_heads": 4})


def trained_run(corpus_config, name: str, **sections):
    tmp, raw = corpus_config
    raw = {**raw, "run": {**raw["run"], "name": name}}
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values}
    return fit(config.from_dict(raw))


@pytest.mark.parametrize(
    "name,sections",
    [
        ("tied", {}),
        ("untied_noisy", {"model": {"tie_embeddings": False}, "moe": {"router": "noisy_topk", "load_loss_coef": 0.1}}),
        # Top-1 keeps its raw weight (a renormalised one is always 1), which only Qwen2-MoE expresses.
        ("qwen_top1_dropless_eval", {"moe": {"top_k": 1, "capacity_factor": 1.25, "eval_capacity_factor": "dropless"}}),
        ("qwen_shared", {"moe": {"shared_experts": 2, "shared_expert_gate": True, "shared_expert_hidden": 16}}),
        ("qwen_raw_weights", {"moe": {"renormalize": False}}),
        # The routed scaling folds into each expert's down projection.
        ("scaled_top_k", {"moe": {"routed_scaling": "top_k"}}),
        ("qwen_scaled", {"moe": {"routed_scaling": 1.7, "renormalize": False}}),
        ("qwen_every2", {"model": {"n_layers": 4, "ffn_hidden": 48}, "moe": {"every": 2}}),
    ],
)
def test_transformers_loads_the_export_and_computes_the_same_logits(corpus_config, tmp_path, name, sections):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained_run(corpus_config, name, **sections)
    out = tmp_path / "hf"
    res = invoke("export", run.run_dir, "--format", "hf", "--out", out)
    assert res.exit_code == 0, res.output
    model = load(run.run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    expected = "Qwen2MoeForCausalLM" if name.startswith("qwen") else "MixtralForCausalLM"
    assert type(theirs).__name__ == expected
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def greet(name):\n    return f'hello {name}'\n"
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, hf_logits = model.model(x).logits, theirs(x).logits
    assert float((ours - hf_logits).abs().max()) <= 1e-4

    # Greedy generation of 20 tokens is the same token for token (prompt + 20 < data.seq_len = 32,
    # so moectl never crops its context).
    prompt = "def f(x):"
    p_ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert len(p_ids) + 20 <= model.cfg.data.seq_len
    g = generate(model, prompt, max_new_tokens=20, temperature=0.0)
    hf_ids = theirs.generate(torch.tensor([p_ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert g.token_ids == hf_ids[0, len(p_ids) :].tolist()[: len(g.token_ids)] and len(g.token_ids) > 0
    assert json.loads((out / "meta.json").read_text())["format"] == "moectl-hf-export-1"

    # A model card for the Hub: what the model is, where it came from, how to load it.
    card = (out / "README.md").read_text()
    moe = model.cfg.moe
    assert card.startswith("---\nlibrary_name: transformers\n") and f"(`{expected}`)" in card
    assert f"{moe.num_experts} experts" in card and f"router `{moe.router}`, top-{moe.top_k}" in card
    assert f"exported from `{run.checkpoint}` (step 3)" in card and "3 steps of 4 sequences" in card
    assert 'AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")' in card and "apply_chat_template" not in card
    # moectl's own commands say what they read instead.
    res = invoke("generate", out, "--prompt", prompt)
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output
    assert "is a transformers export" in res.output and str(run.checkpoint) in res.output


def test_bf16_export_is_checked_against_bf16_rounded_weights(corpus_config, tmp_path):
    run = trained_run(corpus_config, "bf16")
    res = invoke("export", run.run_dir, "--format", "hf", "--out", tmp_path / "hf16", "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "hf16" / "model.safetensors"))
    assert {str(t.dtype) for t in w.values()} == {"torch.bfloat16"}
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in w  # the per-expert layout


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"model": {"arch": "lstm_moe"}}, "model.arch=lstm_moe"),
        ({"moe": {"router": "expert_choice"}}, "moe.router=expert_choice"),
        ({"moe": {"router": "sigmoid"}}, "moe.router=sigmoid"),
        ({"moe": {"capacity_factor": 1.0}}, "a capacity that drops tokens"),
        ({"moe": {"capacity_factor": 2.0, "eval_capacity_factor": 1.5}}, "a capacity that drops tokens"),
        ({"moe": {"shared_experts": 1}}, "moe.shared_experts=1 without moe.shared_expert_gate"),
        ({"model": {"activation": "gelu"}}, "model.activation=gelu"),
    ],
)
def test_models_transformers_would_compute_differently_are_refused(changes, reason):
    cfg = config.from_dict({"model": {"arch": "transformer_moe"}, **changes})
    assert reason in hf.refusal(cfg.model, cfg.moe)
    plain = config.from_dict({"model": {"arch": "transformer_moe"}})
    assert hf.refusal(plain.model, plain.moe) is None


def test_architecture_choice():
    def arch(**moe):
        return hf.architecture(config.from_dict({"model": {"arch": "transformer_moe"}, "moe": moe}).moe)

    assert arch() == "mixtral" and arch(router="noisy_topk", renormalize=False) == "mixtral"
    assert arch(renormalize=False) == arch(every=2) == arch(shared_experts=1, shared_expert_gate=True) == "qwen2_moe"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mapped_tensor_keeps_the_weights_dtype(dtype):
    # Qwen2-MoE without shared experts gets zero placeholders for them: in the export dtype too.
    cfg = config.from_dict({"model": {"arch": "transformer_moe", "d_model": 32, "n_layers": 2, "n_heads": 2},
                            "moe": {"num_experts": 4, "every": 2}})
    assert hf.architecture(cfg.moe) == "qwen2_moe"
    tensors = hf.to_transformers(cfg.model, cfg.moe, build_model(cfg.model, cfg.moe, 300).to(dtype).state_dict())
    assert "model.layers.1.mlp.shared_expert_gate.weight" in tensors
    assert {t.dtype for t in tensors.values()} == {dtype}


def test_refusal_is_one_line_and_writes_nothing(corpus_config, tmp_path):
    run = trained_run(corpus_config, "ec", moe={"router": "expert_choice"})
    res = invoke("export", run.run_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert res.exit_code == 2 and res.output.count("error:") == 1
    assert "cannot export to transformers: moe.router=expert_choice" in res.output
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
