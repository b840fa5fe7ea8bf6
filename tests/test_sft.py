"""Instruction tuning (data.task=sft).

What must hold: the loss mask covers exactly the response tokens (and the end-of-text token
that closes each), for prompt/response pairs, Alpaca rows and multi-turn `messages`; packed
examples never see each other (perturbing one leaves the other's logits unchanged, for the
Transformer and the LSTM, and a packed example's logits equal its logits alone); targets are
IGNORE outside responses and across example boundaries; long examples lose their prompt side;
bad rows are refused with the file, line and field; a tiny SFT run from a tiny pretrained run
lowers the response loss, evaluates on response tokens only, keeps its best checkpoint, logs
router drift against the starting checkpoint (exactly 0 when nothing trains) and stops early;
the recipe keys (freeze experts, LR multipliers) do what they say; a template's own markers
(ChatML's, Gemma's) are found, are single tokens of a BPE trained for it, its end-of-turn marker
is scored after assistant turns only, and `generate --chat` stops there.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import module_texts, prepare_corpus, scalar_series, tiny_config, weights, write_config
from moectl import config, data
from moectl.services import checkpoint
from moectl.data import chat, sft
from moectl.data import tokenizer as tokenizers_
from moectl.cli import app
from moectl.common.errors import ConfigError, DataError
from moectl.models import build_model
from moectl.training.optim import make_optimizer
from moectl.commands.train import fit

EOT = "<|endoftext|>"


def _pairs(limit: int = 200) -> list[dict[str, str]]:
    """Docstring pairs from a few standard-library modules, as a user's JSONL would hold them."""
    rows = []
    for text in module_texts(8):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                rows.append({"prompt": f"Document {node.name}({ast.unparse(node.args)})",
                             "response": ast.get_docstring(node).split("\n\n")[0]})
    return rows[:limit]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenizer():
    texts = [t for t in module_texts(4)]
    return tokenizers_.train_bpe(iter([texts]), 400, 2, EOT)


def _sft_config(tmp_path: Path, data_file: Path, **sections) -> config.Config:
    cfg = tiny_config(tmp_path, data={"source": "files", "data_files": str(data_file), "task": "sft", "seq_len": 48,
                                      "sample_by": "line", **sections.pop("data", {})}, **sections)
    return config.load(write_config(tmp_path / "sft.yaml", cfg))


def _examples(tmp_path: Path, rows: list, **data) -> tuple[sft.Examples, object]:
    cfg = _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", rows), data={"validation_split": None, **data})
    tok = _tokenizer()
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    template = chat.template_source(cfg.data.chat_template, None)
    return sft.tokenize(ds, "training", cfg.data, cfg.tokenizer.eot_token, tok, template, tmp_path / "cache"), tok


def _example(ex: sft.Examples, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = ex.offsets[i], ex.offsets[i + 1]
    return ex.tokens[a:b], ex.mask[a:b]


# ------------------------------------------------------------------------------------ the mask


def test_the_trained_bpe_reserves_the_role_markers_as_special_tokens():
    tok = _tokenizer()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    assert special == {EOT, *chat.ROLE_TOKENS}
    assert len(tok.encode("<|assistant|>\n").ids) == 2


@pytest.mark.parametrize("form", ["pair", "alpaca", "renamed"])
def test_the_mask_covers_exactly_each_response_and_its_end_of_text(tmp_path, form):
    rows = [{"prompt": "What is 2 + 2?", "response": "Four, as it always was."},
            {"prompt": "Name a colour.", "response": "Teal"}]
    extra = {}
    if form == "alpaca":
        rows = [{"instruction": r["prompt"], "input": "" if i else "be brief", "output": r["response"]} for i, r in enumerate(rows)]
    if form == "renamed":
        rows = [{"q": r["prompt"], "a": r["response"]} for r in rows]
        extra = {"prompt_field": "q", "response_field": "a"}
    ex, tok = _examples(tmp_path, rows, **extra)
    assert ex.num_docs == 2
    for i, row in enumerate(rows):
        ids, mask = _example(ex, i)
        response = row.get("response") or row.get("output") or row.get("a")
        assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == response + EOT
        prompt = tok.decode(ids[~mask].tolist(), skip_special_tokens=False)
        user = row.get("prompt") or row.get("q") or row["instruction"] + ("\n\nbe brief" if row.get("input") else "")
        assert prompt == f"<|user|>\n{user}{EOT}<|assistant|>\n"
        assert mask[-1] and not mask[0] and np.all(np.diff(mask.astype(int)) >= 0)  # prompt, then response
    assert ex.num_bytes == sum(len((r.get("response") or r.get("output") or r.get("a")).encode()) for r in rows)


def test_every_assistant_turn_of_a_conversation_counts_and_nothing_else(tmp_path):
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Goodbye, then."}]
    ex, tok = _examples(tmp_path, [{"messages": turns}])
    ids, mask = _example(ex, 0)
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == f"Hello.{EOT}Goodbye, then.{EOT}"
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == chat.Template(chat.BUILTIN_TEMPLATE, EOT).render(turns)
    # Exactly two stretches of response tokens, the turns' own.
    assert int(np.sum(np.diff(np.concatenate([[0], mask.astype(int)])) == 1)) == 2


def test_a_hugging_face_style_template_renders_and_masks_its_own_markup(tmp_path):
    mixtral_like = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}"
                    "{{ raise_exception('only user and assistant roles') }}{% endif %}{% endfor %}")
    ex, tok = _examples(tmp_path, [{"prompt": "Hi", "response": "Hello."}], chat_template=mixtral_like)
    ids, mask = _example(ex, 0)
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == "Hello." + EOT
    assert tok.decode(ids[~mask].tolist(), skip_special_tokens=False) == "[INST] Hi [/INST]"


# ------------------------------------------------------------------------------ rows and targets


def _blocks(ex, seq_len, packing, pad=0):
    return sft.ExampleBlocks(ex, seq_len, packing, pad)


def test_targets_are_response_tokens_of_the_same_example_only(tmp_path):
    rows = [{"prompt": f"Say {w}", "response": f"{w} {w}."} for w in ("alpha", "beta", "gamma", "delta", "omega")]
    ex, _ = _examples(tmp_path, rows)
    longest = int(np.diff(ex.offsets).max())
    for packing in (False, True):
        blocks = _blocks(ex, 3 * longest, packing)
        ids = np.arange(len(blocks))
        x, y = blocks.batch(ids)
        tokens, mask, segments = blocks.rows(ids)
        assert len(blocks) == (5 if not packing else 2)
        scored = y != sft.IGNORE
        # A target is scored iff it is a response token and belongs to the same example as its input.
        expected = torch.from_numpy(mask[:, 1:] & (segments[:, 1:] == segments[:, :-1]))
        assert torch.equal(scored, expected)
        assert torch.equal(y[scored], torch.from_numpy(tokens[:, 1:])[scored])
        # Every response token but none at a row's first position is scored, so the count is known.
        assert int(scored.sum()) == int(ex.mask.sum())
        assert ("segments" in blocks.layout(ids)) == packing


def test_long_examples_lose_their_prompt_side(tmp_path):
    rows = [{"prompt": "word " * 60, "response": "The answer."}, {"prompt": "Short?", "response": "Yes."}]
    ex, tok = _examples(tmp_path, rows)
    blocks = _blocks(ex, 16, packing=False)
    assert blocks.truncated == 1 and blocks.responses_cut == 0
    tokens, mask, _ = blocks.rows(np.array([0]))
    kept = _example(ex, 0)[0][-17:]
    assert np.array_equal(tokens[0], kept)
    assert tok.decode(tokens[0][mask[0]].tolist(), skip_special_tokens=False) == "The answer." + EOT
    tiny = _blocks(ex, 3, packing=True)  # responses longer than a row are cut too, and counted
    assert tiny.truncated == 2 and tiny.responses_cut == 2


# ------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("arch", ["transformer_moe", "lstm_moe"])
def test_packed_examples_never_see_each_other(tmp_path, arch):
    cfg = config.load(write_config(tmp_path / "m.yaml", tiny_config(
        tmp_path, arch=arch, moe={"capacity_factor": None}, model={"dropout": 0.0})))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 50).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(50, (7,), generator=gen), torch.randint(50, (9,), generator=gen)
    pad = torch.zeros(4, dtype=torch.long)
    x = torch.cat([a, b, pad])[None]  # one row: example a, example b, padding
    segments = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4])
    with torch.no_grad():
        logits = model(x, segments=segments).logits[0]
        a2 = a.clone()
        a2[:5] = (a2[:5] + 17) % 50  # perturb example a
        changed = model(torch.cat([a2, b, pad])[None], segments=segments).logits[0]
        alone_b = model(b[None]).logits[0]
        alone_a = model(a[None]).logits[0]
    # b cannot tell, to fp32 rounding (its rows share the experts' matmuls with a's, whose number changed)
    torch.testing.assert_close(changed[7:16], logits[7:16], rtol=1e-5, atol=1e-6)
    assert (changed[:7] - logits[:7]).abs().max() > 1e-2  # a itself did change
    # Each example computes what it computes alone (positions and state restart).
    torch.testing.assert_close(logits[7:16], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:7], alone_a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rows,message", [
    ([{"question": "x", "answer": "y"}], "none of the instruction-tuning forms"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}], "d.jsonl, line 2: field 'response' is empty"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "d.jsonl, line 2: field 'response' is missing"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
     "d.jsonl, line 1: field 'messages[1].role' is 'bot'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "d.jsonl, line 1: field 'messages' has no assistant turn"),
])
def test_bad_rows_are_refused_with_file_line_and_field(tmp_path, rows, message):
    cfg = _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", rows * 3), data={"validation_fraction": 0.3})
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare_corpus(cfg)


def test_a_template_that_cannot_render_a_turn_is_refused_with_the_row(tmp_path):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    rows = [{"prompt": "a", "response": "b"}, {"messages": [{"role": "system", "content": "s"},
                                                           {"role": "user", "content": "u"},
                                                           {"role": "assistant", "content": "v"}]}]
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3 + rows[1:]
    cfg = _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", rows), data={"chat_template": strict, "validation_fraction": 0.25})
    with pytest.raises(DataError, match=r"d.jsonl, line 4: field 'messages\[0\]': the chat template \(data.chat_template\) cannot render "
                       r"turn 0 \(system\): no system turns"):
        prepare_corpus(cfg)


def test_config_refuses_sft_options_without_sft_and_sft_with_stateful_or_em(tmp_path):
    base = tiny_config(tmp_path)
    for sets, key in ((["data.packing=true"], "data.packing"), (["data.chat_template=builtin"], "data.chat_template"),
                      (["data.task=sft", "model.arch=lstm_moe", "train.lstm_stateful=true"], "train.lstm_stateful"),
                      (["data.task=sft", "model.head=mixture", "model.head_experts=2", "model.tie_embeddings=false",
                        "train.objective=em"], "train.objective")):
        with pytest.raises(ConfigError, match=key):
            config.load(write_config(tmp_path / "c.yaml", base), sets)


# ------------------------------------------------------------------------------ training on it


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny MoE pretrained for 6 steps, then instruction-tuned from it on written pairs."""
    tmp = tmp_path_factory.mktemp("sft")
    pre = fit(config.load(write_config(tmp / "pre.yaml", tiny_config(tmp, run={"name": "pre"}))))
    data_file = _jsonl(tmp / "pairs.jsonl", _pairs())
    cfg = _sft_config(tmp, data_file, run={"name": "sft"}, data={"packing": True},
                      train={"init_from": str(pre.run_dir), "max_steps": 12, "eval_every": 4, "eval_batches": 4},
                      checkpoint={"every": 4, "keep_last": 5, "keep_best": True})
    result = fit(cfg)
    return {"pre": pre, "result": result, "cfg": cfg, "data": data_file, "tmp": tmp}


def test_instruction_tuning_lowers_the_response_loss_and_keeps_the_best_checkpoint(tuned):
    result = tuned["result"]
    assert result.eval_loss < result.first_eval_loss - 0.1
    best = checkpoint.checkpoints_dir(result.run_dir) / "best"
    assert best.is_symlink() and checkpoint.read_meta(best)["step"] == result.best_step
    assert result.best_eval_loss == pytest.approx(min(v for _, v in scalar_series(result.run_dir, "eval/loss")))
    assert [s for s, _ in checkpoint.list_checkpoints(result.run_dir)] == [0, 4, 8, 12]  # 0: the starting weights
    assert (result.run_dir / chat.TEMPLATE_FILE).read_text() == chat.BUILTIN_TEMPLATE


def test_router_drift_is_logged_against_the_starting_checkpoint(tuned):
    drift = scalar_series(tuned["result"].run_dir, "routing/layer01/top1_changed")
    assert [s for s, _ in drift] == [4, 8, 12]
    assert all(0.0 < v <= 1.0 for _, v in drift)


def test_eval_scores_response_tokens_only(tuned):
    run_dir = tuned["result"].run_dir
    out = CliRunner().invoke(app, ["eval", str(run_dir / "checkpoints" / "best"), "--json"])
    assert out.exit_code == 0, out.output
    rep = json.loads(out.stdout)
    assert rep["targets"] == "response tokens"
    loaded_cfg = config.load(run_dir / "config.yaml", saved=True)
    corpus = prepare_corpus(loaded_cfg, tokenizer_file=run_dir / "tokenizer.json", only="validation")
    blocks = data.blocks(corpus.validation, loaded_cfg.data, corpus.eot_id)
    from moectl.data import eval_batches

    scored = sum(int((blocks.batch(ids)[1] != sft.IGNORE).sum()) for ids in eval_batches(blocks, loaded_cfg.train.micro_batch, 4))
    assert rep["tokens"] == scored < sum(len(ids) for ids in eval_batches(blocks, loaded_cfg.train.micro_batch, 4)) * 48
    assert rep["loss"] == pytest.approx(tuned["result"].best_eval_loss, rel=1e-5)


def test_generate_answers_a_prompt_as_a_user_turn(tuned):
    run_dir = tuned["result"].run_dir
    for flag in ([], ["--chat"]):
        out = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "Document add(a, b)", "--temperature", "0",
                                       "--max-new-tokens", "5", *flag])
        assert out.exit_code == 0, out.output
    raw = CliRunner().invoke(app, ["generate", str(tuned["pre"].run_dir), "--prompt", "x", "--chat"])
    assert raw.exit_code != 0 and "was not instruction-tuned" in raw.output


def test_the_transformers_model_card_uses_the_chat_template(tuned):
    from moectl.commands.export import model_card
    from moectl.services.loaded_model import load

    loaded = load(tuned["result"].run_dir)
    card = model_card(loaded, checkpoint.read_meta(loaded.checkpoint), None, None, fmt="hf")
    assert "instruction-tuned (data.task=sft)" in card and "tokenizer.apply_chat_template(messages" in card
    assert f"Training started from the weights of `{tuned['pre'].run_dir}`" in card


def test_the_end_of_run_panel_names_generate_and_eval_for_an_instruction_tuned_run(tmp_path):
    _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", _pairs(60)), train={"max_steps": 2, "eval_every": 2})
    res = CliRunner().invoke(app, ["train", str(tmp_path / "sft.yaml")])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "tiny"
    flat = re.sub(r"[│╭╮╰╯─\s]", "", res.stdout)  # the panel wraps a long path across its lines
    assert re.sub(r"\s", "", f'moectl generate {run_dir} --prompt "..."') in flat
    assert re.sub(r"\s", "", f"moectl eval {run_dir}") in flat


def test_nothing_trained_means_no_drift_and_an_early_stop(tuned):
    """Experts frozen by an LR multiplier of 0 and everything else by train.freeze: the eval loss
    never improves, so train.early_stopping=2 stops at the second evaluation after the start."""
    cfg = _sft_config(tuned["tmp"], tuned["data"], run={"name": "still"},
                      train={"init_from": str(tuned["pre"].run_dir), "max_steps": 12, "eval_every": 1, "eval_batches": 2,
                             "freeze": "all_but_experts", "early_stopping": 2},
                      optim={"expert_lr_mult": 0.0})
    result = fit(cfg)
    assert result.early_stopped and result.step == 2 and not result.interrupted
    assert [v for _, v in scalar_series(result.run_dir, "routing/layer01/top1_changed")] == [0.0, 0.0]
    assert checkpoint.read_meta(checkpoint.latest(result.run_dir))["step"] == 2
    assert weights(checkpoint.latest(result.run_dir)) .keys() == weights(checkpoint.latest(tuned["pre"].run_dir)).keys()
    for name, w in weights(checkpoint.latest(result.run_dir)).items():
        assert torch.equal(w, weights(checkpoint.latest(tuned["pre"].run_dir))[name]), name


def test_a_resumed_tuning_run_measures_drift_as_the_uninterrupted_one(tuned, tmp_path):
    """The starting model's routes travel in the checkpoint: a run stopped at step 4 and resumed
    logs the same drift and eval losses as the run that never stopped."""
    import shutil

    result = tuned["result"]
    copy = tmp_path / "runs" / "sft"
    shutil.copytree(result.run_dir, copy, symlinks=True)
    for step, path in checkpoint.list_checkpoints(copy):
        if step > 4:
            shutil.rmtree(path)
    resumed = fit(config.load(copy / "config.yaml", [f"run.dir={copy.parent}"], saved=True), resume=True)
    assert resumed.step == 12
    for tag in ("routing/layer01/top1_changed", "routing/layer00/top1_changed", "eval/loss"):
        again, once = scalar_series(copy, tag), scalar_series(result.run_dir, tag)
        assert [s for s, _ in again] == [s for s, _ in once], tag
        assert [v for _, v in again] == pytest.approx([v for _, v in once], rel=1e-6), tag


# ------------------------------------------------------------------------------- recipe keys


def test_lr_multipliers_and_frozen_experts(tmp_path):
    cfg = config.load(write_config(tmp_path / "t.yaml", tiny_config(tmp_path, optim={"router_lr_mult": 0.5, "expert_lr_mult": 2.0})))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 100)
    opt = make_optimizer(model, cfg.optim)
    by_mult = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            by_mult[names[id(p)]] = group["lr_mult"]
    assert {n: m for n, m in by_mult.items() if ".router." in n} and all(
        by_mult[n] == (0.5 if ".router." in n else 2.0 if ".experts." in n else 1.0) for n in by_mult)
    assert len(by_mult) == sum(1 for _ in model.parameters())
    from moectl.services import warmstart

    frozen = warmstart.freeze(model, "experts")
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert all(p.requires_grad == (".experts." not in n) for n, p in model.named_parameters())


def test_the_best_checkpoint_survives_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.step_dir(tmp_path, step).mkdir(parents=True)
    checkpoint.prune(tmp_path, keep_last=1, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 4]
    checkpoint.mark_best(tmp_path, 2)
    checkpoint.mark_best(tmp_path, 4)  # replaced in place
    assert (checkpoint.checkpoints_dir(tmp_path) / "best").resolve() == checkpoint.step_dir(tmp_path, 4).resolve()
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 4]  # the link is not a checkpoint


def test_the_offline_instruction_set_is_the_standard_librarys_documented_functions():
    import sysconfig

    from conftest import CORPUS_MODULES

    root = Path(sysconfig.get_paths()["stdlib"])
    pairs = sft.docstring_pairs([root / m for m in CORPUS_MODULES[:8]])
    assert len(pairs["prompt"]) > 100 and len(pairs["prompt"]) == len(pairs["response"]) == len(pairs["path"])
    assert all(p.startswith(sft.DOCSTRING_PROMPT + "def ") or p.startswith(sft.DOCSTRING_PROMPT + "async def ")
               for p in pairs["prompt"])
    assert all(p.endswith(":") for p in pairs["prompt"])
    assert all(10 <= len(r) <= 400 and "\n\n" not in r for r in pairs["response"])
    i = pairs["prompt"].index(sft.DOCSTRING_PROMPT + "def b64encode(s, altchars=None):")
    assert pairs["response"][i] == "Encode the bytes-like object s using Base64 and return a bytes object."


def test_every_response_token_weighs_the_same_however_the_batch_is_split(tuned, tmp_path):
    """Gradient accumulation over micro-batches with different numbers of response tokens, and
    two processes, give the weights of the whole batch at once (a mean of micro-batch means
    would not)."""
    from test_distributed import moectl

    out = {}
    for name, micro, nproc in (("whole", 4, None), ("split", 1, None), ("ddp", 1, "2")):
        cfg = _sft_config(tmp_path, tuned["data"], run={"name": name}, data={"packing": False},
                          train={"init_from": str(tuned["pre"].run_dir), "max_steps": 2, "eval_every": 2,
                                 "eval_batches": 1, "micro_batch_size": micro},
                          moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})
        if nproc is None:
            out[name] = weights(checkpoint.latest(fit(cfg).run_dir))
        else:
            proc = moectl("train", str(tmp_path / "sft.yaml"), "--nproc-per-node", nproc)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            out[name] = weights(checkpoint.latest(tmp_path / "runs" / name))
    for name in ("split", "ddp"):
        for key in out["whole"]:
            torch.testing.assert_close(out[name][key], out["whole"][key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_bad_data_stops_moectl_train_with_one_line_and_no_run(tmp_path):
    from test_distributed import moectl

    rows = [{"prompt": "a", "response": "b"}] * 4 + [{"prompt": "c", "response": "  "}]
    _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", rows), data={"validation_fraction": 0.2})
    proc = moectl("train", str(tmp_path / "sft.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "d.jsonl, line 5: field 'response' is empty" in errors[0], proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_tokenizer_brings_its_own_chat_template(tmp_path):
    """A Hugging Face directory's tokenizer_config.json (as Mixtral's) gives the template and its
    beginning-of-sequence token; the run keeps it and renders prompts with it."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tok = _tokenizer()
    tokenizers_.save(tok, hf_dir / "tokenizer.json")
    template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA: " \
               "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": EOT}))
    cfg = _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello."}] * 4),
                      tokenizer={"path": str(hf_dir / "tokenizer.json")}, data={"validation_fraction": 0.25})
    corpus = prepare_corpus(cfg)
    assert corpus.chat_template.endswith(template) and corpus.chat_template.startswith("{% set bos_token")
    ids, mask = _example(corpus.train, 0)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == f"{EOT}Q: Hi\nA: Hello.{EOT}"
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == f"Hello.{EOT}"


# ------------------------------------------------------------------------ a template's own markers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
         "{% set role = m['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.mark.parametrize("source,bos,end,markers", [
    (CHATML, "", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    (GEMMA, "<bos>", "<end_of_turn>", ("<bos>", "<start_of_turn>", "<end_of_turn>")),
    (chat.BUILTIN_TEMPLATE, "", EOT, ("<|user|>", EOT, "<|assistant|>", "<|system|>")),
    # Llama 2's closing: a space and eos; Phi-3's: its own tag, then eos on the next line.
    ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]{% else %} "
     "{{ m['content'] }} </s>{% endif %}{% endfor %}", "", "</s>", ("<s>", "[INST]", "[/INST]", "</s>")),
    ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% if m['role'] == 'assistant' %}"
     "{{ eos_token }}{% endif %}{% endfor %}", "", "<|end|>", ("<|user|>", "<|end|>", "<|assistant|>", EOT, "<|system|>")),
    # No tags: the closing's first line is the marker; a turn closed by whitespace alone has none.
    ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n### End\n\n{% endfor %}", "", "### End", ()),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}", "", None, ()),
])
def test_a_templates_end_of_turn_marker_is_what_closes_an_assistant_turn(source, bos, end, markers):
    template = chat.Template(source, EOT, bos)
    assert template.end_of_turn() == end
    assert template.markers() == markers


def test_a_trained_bpe_makes_a_templates_markers_single_tokens_and_scores_its_end_of_turn(tmp_path):
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Goodbye, then."}]
    rows = [{"messages": turns}] * 4
    cfg = _sft_config(tmp_path, _jsonl(tmp_path / "d.jsonl", rows), data={"chat_template": CHATML,
                                                                          "validation_fraction": 0.5})
    corpus = prepare_corpus(cfg)
    tok = corpus.tokenizer
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert start is not None and end is not None
    assert tok.encode("<|im_start|>assistant\nHi<|im_end|>\n").ids[0] == start
    assert tok.encode("Hi<|im_end|>", add_special_tokens=False).ids[-1] == end
    ids, mask = _example(corpus.train, 0)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == chat.Template(CHATML, EOT).render(turns)
    # One <|im_end|> per turn; scored after the assistant's turns (2nd and 4th) and after no other.
    closes = np.flatnonzero(ids == end)
    assert len(closes) == len(turns) and mask[closes].tolist() == [False, False, True, False, True]
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == "Hello.<|im_end|>\nGoodbye, then.<|im_end|>\n"
    # The built-in template's tokenizer is unchanged: no markers beyond its own.
    assert tokenizers_.reserved(EOT, chat.Template(chat.BUILTIN_TEMPLATE, EOT).markers()) == tokenizers_.reserved(EOT)


class _Scripted(torch.nn.Module):
    """A model that writes a fixed sequence of tokens, one per call, whatever it is shown."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, x, **_):
        from types import SimpleNamespace

        logits = torch.zeros(1, x.shape[1], self.vocab)  # (1, T, V)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits, routing=[])


@pytest.mark.parametrize("case", ["chatml, one token", "chatml, spelled out", "built-in"])
def test_generate_chat_stops_at_the_templates_end_of_turn_marker(tmp_path, case):
    """The answer ends where the model closes its turn, with the marker one token (a BPE trained
    for the template) or several (a tokenizer that does not know it), and the marker is not shown;
    the built-in template stops at end-of-text as it always has."""
    from moectl.commands import generate as generation
    from moectl.services.loaded_model import LoadedModel

    template = chat.BUILTIN_TEMPLATE if case == "built-in" else CHATML
    markers = chat.Template(CHATML, EOT).markers() if case == "chatml, one token" else ()
    tok = tokenizers_.train_bpe(iter([module_texts(2)]), 400, 2, EOT, markers=markers)
    (tmp_path / chat.TEMPLATE_FILE).write_text(template)
    end = EOT if case == "built-in" else "<|im_end|>"
    script = tok.encode(f"Hello there.{end}\nand on it goes", add_special_tokens=False).ids
    assert (len(tok.encode(end, add_special_tokens=False).ids) == 1) == (case != "chatml, spelled out")
    cfg = config.load(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    loaded = LoadedModel(cfg=cfg, model=_Scripted(script, tok.get_vocab_size()), tokenizer=tok, checkpoint=tmp_path,
                         run_dir=tmp_path, step=0, device=torch.device("cpu"))
    result = generation.generate(loaded, "Greet me.", max_new_tokens=len(script), temperature=0, chat_turn=True)
    assert result.text == "Hello there."
    assert tok.decode(result.token_ids) == "Hello there." and len(result.pieces) == len(result.token_ids)
    loaded.model.calls = 0  # a raw continuation stops at end-of-text alone
    raw = generation.generate(loaded, "Greet me.", max_new_tokens=len(script), temperature=0, chat_turn=False)
    assert raw.text.startswith("Hello there.") and (raw.text == "Hello there.") == (case == "built-in")


def test_a_pruned_instruction_tuned_run_keeps_its_chat_template_and_scores_responses(tuned, tmp_path):
    out = tmp_path / "pruned"
    res = CliRunner().invoke(app, ["prune", str(tuned["result"].run_dir), "--keep", "2", "--criterion", "naee",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / chat.TEMPLATE_FILE).read_text() == chat.BUILTIN_TEMPLATE
    rep = json.loads(CliRunner().invoke(app, ["eval", str(out), "--json"]).stdout)
    assert rep["targets"] == "response tokens" and all(len(layer["load"]) == 2 for layer in rep["layers"])


def test_a_quantised_instruction_tuned_run_keeps_its_chat_template(tuned, tmp_path):
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(tuned["result"].run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / chat.TEMPLATE_FILE).read_text() == chat.BUILTIN_TEMPLATE
    assert json.loads(CliRunner().invoke(app, ["eval", str(out), "--json"]).stdout)["targets"] == "response tokens"


def test_an_instruction_tuned_run_evaluates_the_same_with_its_experts_offloaded(tuned):
    run = str(tuned["result"].run_dir)
    plain = json.loads(CliRunner().invoke(app, ["eval", run, "--json"]).stdout)
    res = CliRunner().invoke(app, ["eval", run, "--json", "--offload-experts", "--expert-cache", "2", "--prefetch"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["loss"] == plain["loss"]


def test_lora_instruction_tuning_from_the_command_line(tuned):
    """The issue's user path: `moectl train SFT.yaml --set train.init_from=RUN --set train.lora.rank=8`,
    then eval scores the responses of the adapted model."""
    runner = CliRunner()
    sft_yaml = tuned["tmp"] / "sft_lora.yaml"
    config.save(tuned["cfg"], sft_yaml)  # the tuned run's config (other tests rewrite sft.yaml)
    res = runner.invoke(app, ["train", str(sft_yaml), "--set", f"train.init_from={tuned['pre'].run_dir}", "--set",
                              "train.lora.rank=8", "--set", "train.max_steps=4", "--run-name", "sft_lora"])
    assert res.exit_code == 0, res.output
    assert "LoRA rank 8" in res.output and "trained" in res.output
    run_dir = tuned["tmp"] / "runs" / "sft_lora"
    assert (checkpoint.latest(run_dir) / checkpoint.ADAPTER).is_file()
    ev = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert ev.exit_code == 0, ev.output
    rep = json.loads(ev.stdout)
    assert rep["targets"] == "response tokens" and rep["adapters"].startswith("LoRA rank 8")
