"""LoRA (train.lora): the adapters' math on every target, the grouped experts' low-rank path against
plain autograd and the merged weights, what trains, the config's refusals, and (slow) a LoRA run
end to end: train, resume, eval, route-stats, export with and without merging."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.autograd import gradcheck
from typer.testing import CliRunner

from conftest import tiny_config, write_config
from moectl import config
from moectl.cli import app
from moectl.commands.train import fit
from moectl.common.errors import CheckpointError, ConfigError
from moectl.models import build_model, lora
from moectl.moe.adapter import Adapter
from moectl.moe.experts import GroupedExperts, _GroupedFFN, ffn
from moectl.services import checkpoint, loaded_model


def _experts(activation: str, per_expert: bool, dropout: float = 0.0, dtype=torch.float32, rank: int = 4):
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, 12, activation).to(dtype)
    ex.adapters = torch.nn.ModuleDict({
        n: Adapter(getattr(ex, n).shape[1], getattr(ex, n).shape[2], rank, 0.5, dropout, experts=4 if per_expert else 1)
        for n in ("w_up", "w_gate", "w_down") if getattr(ex, n) is not None}).to(dtype)
    for a in ex.adapters.values():
        torch.nn.init.normal_(a.B, std=0.3)
    return ex


def _reference(ex: GroupedExperts, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each expert with its effective weights W + s A B, by plain autograd."""
    outs, start = [], 0
    for e, n in enumerate(sizes):
        w = {}
        for name in ("w_up", "w_gate", "w_down"):
            base = getattr(ex, name)
            if base is None:
                w[name] = None
                continue
            a, b = ex.adapters[name].factors(e)
            w[name] = base[e] + ex.adapters[name].scale * a @ b
        outs.append(ffn(x[start:start + n], w["w_up"], w["w_gate"], w["w_down"], ex.activation))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("per_expert", [True, False])
def test_the_grouped_low_rank_path_equals_the_merged_weights_values_and_gradients(activation, per_expert):
    ex = _experts(activation, per_expert)
    sizes = [5, 0, 7, 4]  # an expert with no rows
    x = torch.randn(sum(sizes), 8, requires_grad=True)
    out = ex(x, sizes)
    grad = torch.randn_like(out)
    out.backward(grad)
    mine = {n: p.grad.clone() for n, p in ex.named_parameters()}
    dx = x.grad.clone()
    ex.zero_grad()
    x.grad = None
    ref = _reference(ex, x, sizes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.backward(grad)
    torch.testing.assert_close(dx, x.grad, atol=1e-5, rtol=1e-5)
    for n, p in ex.named_parameters():
        torch.testing.assert_close(mine[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("per_expert", [True, False])
def test_the_low_rank_backward_passes_gradcheck_with_adapter_dropout(per_expert):
    ex = _experts("swiglu", per_expert, dropout=0.3, dtype=torch.float64)
    sizes = [3, 2, 0, 4]
    x = torch.randn(sum(sizes), 8, dtype=torch.float64, requires_grad=True)
    f = [ex.adapters[n].factors() for n in ("w_up", "w_gate", "w_down")]
    tensors = (x, ex.w_up, ex.w_gate, ex.w_down, *[t for pair in f for t in pair])

    def fn(x, w_up, w_gate, w_down, *factors):
        torch.manual_seed(5)  # the same dropout masks on every call
        return _GroupedFFN.apply(x, sizes, "swiglu", (0.5, 0.3), w_up, w_gate, w_down, *factors)

    assert gradcheck(fn, tensors, eps=1e-6, atol=1e-5)
    torch.manual_seed(5)
    dropped = fn(*tensors)
    assert not torch.allclose(dropped, _GroupedFFN.apply(x, sizes, "swiglu", (0.5, 0.0), *tensors[1:]))


def test_a_frozen_base_gets_no_gradient_and_adapters_get_theirs():
    ex = _experts("swiglu", True)
    for n in ("w_up", "w_gate", "w_down"):
        getattr(ex, n).requires_grad_(False)
    ex(torch.randn(8, 8), [2, 2, 2, 2]).sum().backward()
    assert all(getattr(ex, n).grad is None for n in ("w_up", "w_gate", "w_down"))
    assert all(a.A.grad is not None and a.B.grad.abs().sum() > 0 for a in ex.adapters.values())


def test_the_adapter_starts_at_zero_and_initialises_a_as_peft():
    a = Adapter(64, 16, 8, 2.0)
    assert torch.equal(a.delta(), torch.zeros(64, 16)) and a.A.abs().max() <= 1 / 64 ** 0.5
    t = Adapter(64, 16, 8, 2.0, transposed=True)
    torch.nn.init.normal_(t.B)
    assert t.delta().shape == (16, 64)
    torch.testing.assert_close(t.delta(), 2.0 * (t.A @ t.B).T)


def _model(arch: str, targets: list[str], **sections):
    cfg_dict = tiny_config_dict(arch, **sections)
    cfg = config.from_dict(cfg_dict)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 300)
    lora_cfg = config.with_values(cfg, "test", **{"train.init_from": "base", "train.lora": {"rank": 4, "targets": targets}})
    return model, lora_cfg


def tiny_config_dict(arch: str, **sections) -> dict:
    cfg = {"model": {"arch": arch, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64},
           "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}, "data": {"seq_len": 16}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


CASES = [
    ("transformer_moe", ["attention", "experts", "shared_experts", "dense_ffn", "head", "router"],
     dict(moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32, "shared_experts": 1, "every": 2},
          model={"arch": "transformer_moe", "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
                 "tie_embeddings": False})),
    ("lstm_moe", ["lstm", "experts", "head"], dict(model={"arch": "lstm_moe", "d_model": 32, "n_layers": 3, "n_heads": 2,
                                                         "ffn_hidden": 64, "tie_embeddings": False})),
    ("transformer_dense", ["attention", "dense_ffn", "head"], {}),  # the head tied to the embedding
]


@pytest.mark.parametrize("arch, targets, sections", CASES, ids=[c[0] for c in CASES])
def test_every_target_adapts_its_weights_starts_as_the_base_and_merges_exactly(arch, targets, sections):
    model, cfg = _model(arch, targets, **sections)
    x = torch.randint(0, 300, (2, 16))
    model.eval()
    base = model(x).logits
    trainable = lora.attach(model, cfg.train)
    assert torch.equal(model(x).logits, base)  # B = 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) == trainable
    assert all(".adapters." in n or ("router" in targets and ".router." in n) for n in names)
    r = cfg.train.lora.rank
    expected = 0
    for module in model.modules():  # r (in + out) per matrix, E times for a stack
        for a in (getattr(module, "adapters", None) or {}).values():
            expected += a.A.shape[0] * r * (a.A.shape[-2] + a.B.shape[-1]) if a.stacked else r * (a.A.shape[0] + a.B.shape[1])
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n) if "router" in targets else 0
    assert trainable == expected + routers
    kinds = {"attention": "attn.q_proj.adapters", "experts": "experts.adapters.w_up", "shared_experts": "shared.adapters",
             "dense_ffn": "ffn.inner.adapters", "lstm": "adapters.weight_hh_l0", "head": "lm_head.adapters"}
    for target in targets:
        if target in kinds:
            assert any(kinds[target] in n for n in names), target
    for n, p in model.named_parameters():
        if n.endswith(".B"):
            torch.nn.init.normal_(p, std=0.05)
    adapted = model(x).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    merged = copy.deepcopy(model)
    assert lora.merge(merged) > 0 and not lora.adapted(merged)
    torch.testing.assert_close(merged(x).logits, adapted, atol=2e-5, rtol=1e-5)
    assert torch.equal(merged.embed.weight, model.embed.weight)  # a tied head's adapter changed the head alone
    with lora.detached(model):
        assert torch.equal(model(x).logits, base)
    assert torch.equal(model(x).logits, adapted)


def test_shared_expert_adapters_are_one_pair_per_layer():
    model, cfg = _model("transformer_moe", ["experts"])
    cfg = config.with_values(cfg, "test", **{"train.lora.experts_rank_per_expert": False})
    n = lora.attach(model, cfg.train)
    assert n == 2 * 3 * 4 * (32 + 32)  # 2 layers x 3 matrices x r (D + H), no E


@pytest.mark.parametrize("sets, key", [
    (["train.lora.rank=4"], "train.init_from"),
    (["train.lora.rank=0", "train.init_from=x"], "train.lora.rank"),
    (["train.lora.rank=40", "train.init_from=x"], "train.lora.rank=40 is larger than the attention"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[gates]"], "train.lora.targets"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[lstm]"], "has no lstm"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[shared_experts]"], "no shared experts"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[dense_ffn]"], "every FFN slot"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[head]", "model.head=mixture",
      "model.tie_embeddings=false"], "only a linear head"),
    (["train.lora.rank=4", "train.init_from=x", "model.arch=transformer_dense", "train.lora.targets=[experts]"],
     "is dense"),
    (["train.lora.rank=4", "train.init_from=x", "train.freeze=router"], "train.freeze"),
    (["train.lora.rank=4", "train.init_from=x", "train.expert_parallel=2"], "expert_parallel"),
    (["train.lora.rank=4", "train.init_from=x", "model.arch=lstm_moe", "model.n_layers=3", "train.lora.dropout=0.1"],
     "train.lora.dropout"),
    (["train.lora.rank=4", "train.init_from=x", "train.lora.targets=[experts, experts]"], "more than once"),
    (["train.lora.rnak=4"], "did you mean 'rank'"),
    (["train.lora.targets=[attention]"], "train.lora.rank is null"),
])
def test_bad_lora_settings_are_one_line_naming_the_key(tmp_path, sets, key):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict("transformer_moe"))
    with pytest.raises(ConfigError, match=key) as info:
        config.load(path, sets)
    assert "\n" not in str(info.value)


def test_default_targets_are_what_the_model_has_and_saved_explicitly(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict("lstm_moe", model={"n_layers": 3}))
    cfg = config.load(path, ["train.lora.rank=4", "train.init_from=x"])
    assert cfg.train.lora.targets == ["lstm", "experts"] and cfg.train.lora.alpha == 8.0
    assert "targets:\n    - lstm" in config.dump(cfg)


def test_changing_lora_on_resume_is_a_conflict(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict("transformer_moe"))
    a = config.load(path, ["train.lora.rank=4", "train.init_from=x"])
    b = config.load(path, ["train.init_from=x"])
    assert any(c.startswith("train.lora") for c in checkpoint.resume_conflicts(a, b))


# ------------------------------------------------------------------------------ a LoRA run end to end


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny MoE trained for 6 steps (the base), then adapted by LoRA for 6 more on the same data."""
    tmp = tmp_path_factory.mktemp("lora")
    base = fit(config.load(write_config(tmp / "base.yaml", tiny_config(tmp, run={"name": "base"}))))
    raw = tiny_config(tmp, run={"name": "lora"}, model={"dropout": 0.1},
                      train={"init_from": str(base.run_dir), "micro_batch_size": 2,
                             "lora": {"rank": 4, "targets": ["attention", "experts", "router", "head"], "dropout": 0.1}})
    cfg_file = write_config(tmp / "lora.yaml", raw)
    result = fit(config.load(cfg_file))
    return {"tmp": tmp, "base": base, "result": result, "cfg_file": cfg_file}


def test_a_lora_run_trains_its_adapters_and_saves_them_alone_with_its_base(adapted):
    base, result = adapted["base"], adapted["result"]
    assert result.eval_loss < result.first_eval_loss
    base_ckpt = checkpoint.latest(base.run_dir)
    for _, ckpt in checkpoint.list_checkpoints(result.run_dir):
        assert not (ckpt / "model.safetensors").exists() and (ckpt / checkpoint.ADAPTER).is_file()
        meta = checkpoint.read_meta(ckpt)
        assert meta["lora_base"]["path"] == str(base_ckpt.resolve())
        assert meta["lora_base"]["sha256"] == hashlib.sha256((base_ckpt / "model.safetensors").read_bytes()).hexdigest()
    saved = load_file(str(checkpoint.latest(result.run_dir) / checkpoint.ADAPTER))
    assert saved and all(".adapters." in k or ".router." in k for k in saved)
    assert any(".router." in k for k in saved) and any("experts.adapters.w_down.B" in k for k in saved)
    # the base is untouched: every tensor of the loaded model but the trained ones is the base's
    model = loaded_model.load(result.run_dir).model
    base_weights = load_file(str(base_ckpt / "model.safetensors"))
    for name, t in model.state_dict().items():
        if name in base_weights and ".router." not in name:
            assert torch.equal(t, base_weights[name]), name
    router = next(k for k in saved if k.endswith("router.weight"))
    assert not torch.equal(saved[router], base_weights[router])  # the router trained in full


def test_a_lora_run_resumes_bitwise_and_refuses_a_changed_base(adapted, tmp_path):
    result = adapted["result"]
    run_dir = tmp_path / "lora"
    shutil.copytree(result.run_dir, run_dir)
    shutil.rmtree(checkpoint.step_dir(run_dir, 6))
    cfg = config.load(adapted["cfg_file"], [f"run.dir={tmp_path}"])
    resumed = fit(cfg, resume=True)
    a = load_file(str(checkpoint.step_dir(result.run_dir, 6) / checkpoint.ADAPTER))
    b = load_file(str(checkpoint.step_dir(run_dir, 6) / checkpoint.ADAPTER))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.eval_loss == result.eval_loss
    # a base that changed since: the adapters do not belong to it
    base_copy = tmp_path / "base"
    shutil.copytree(adapted["base"].run_dir, base_copy)
    cfg = config.load(adapted["cfg_file"], [f"run.dir={tmp_path}", "run.name=moved", f"train.init_from={base_copy}",
                                            "train.max_steps=3"])
    fit(cfg)
    weights_file = checkpoint.latest(base_copy) / "model.safetensors"
    tensors = load_file(str(weights_file))
    tensors["norm.weight"] = tensors["norm.weight"] + 1
    save_file(tensors, str(weights_file))
    with pytest.raises(CheckpointError, match="the base model changed"):
        fit(config.load(adapted["cfg_file"], [f"run.dir={tmp_path}", "run.name=moved", f"train.init_from={base_copy}",
                                              "train.max_steps=6"]), resume=True)
    with pytest.raises(CheckpointError, match="has changed since"):
        loaded_model.load(tmp_path / "moved")
    with pytest.raises(ConfigError, match="train.lora"):  # resuming without LoRA
        fit(config.load(adapted["cfg_file"], [f"run.dir={tmp_path}", "run.name=moved", "train.lora.rank=null",
                                              "train.max_steps=6"]), resume=True)


def test_eval_route_stats_and_bundles_read_a_lora_run(adapted, tmp_path):
    result = adapted["result"]
    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(result.run_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["loss"] == pytest.approx(result.eval_loss, abs=1e-6)
    rep = runner.invoke(app, ["route-stats", str(result.run_dir), "--json", "--max-batches", "2"])
    assert rep.exit_code == 0, rep.output
    drift = json.loads(rep.stdout)["compare"]
    assert drift["other"] == str(checkpoint.latest(adapted["base"].run_dir).resolve())
    assert all(0 <= layer["top1_changed"] <= 1 for layer in drift["layers"])
    gen = runner.invoke(app, ["generate", str(result.run_dir), "--prompt", "def f(x):", "--max-new-tokens", "5"])
    assert gen.exit_code == 0, gen.output
    losses = {}
    for name, flags in (("kept", []), ("merged", ["--merge-lora"])):
        res = runner.invoke(app, ["export", str(result.run_dir), "--out", str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        ev = runner.invoke(app, ["eval", str(tmp_path / name), "--json"])
        losses[name] = json.loads(ev.stdout)["loss"]
    assert (tmp_path / "kept" / checkpoint.ADAPTER).is_file() and not (tmp_path / "merged" / checkpoint.ADAPTER).exists()
    assert losses["kept"] == pytest.approx(result.eval_loss, abs=1e-6)
    assert losses["merged"] == pytest.approx(result.eval_loss, abs=1e-4)
    merged_cfg = config.load(tmp_path / "merged" / "config.yaml", saved=True)
    assert merged_cfg.train.lora.rank is None and not merged_cfg.model.tie_embeddings  # the head's adapter untied it
    assert "merged into the weights" in (tmp_path / "merged" / "README.md").read_text()
    twice = runner.invoke(app, ["export", str(tmp_path / "merged"), "--out", str(tmp_path / "again"), "--merge-lora"])
    assert twice.exit_code != 0 and "holds no LoRA adapters" in twice.output and not (tmp_path / "again").exists()
    for command in (["prune", "--ratio", "0.25"], ["quantize", "--experts", "int8"]):  # plain weights only
        res = runner.invoke(app, [command[0], str(result.run_dir), "--out", str(tmp_path / command[0]), *command[1:]])
        assert res.exit_code != 0 and "--merge-lora" in res.output and not (tmp_path / command[0]).exists()
    # a LoRA run is no base for another run until merged
    with pytest.raises(ConfigError, match="--merge-lora"):
        fit(config.load(adapted["cfg_file"], [f"run.dir={tmp_path}", "run.name=x", f"train.init_from={result.run_dir}"]))


def test_two_processes_train_the_same_adapters_as_one(adapted, tmp_path):
    """DDP with gradient accumulation: only the adapters and routers are reduced, and the result is
    the one-process run's (no dropout or router losses, so the two compute the same gradients)."""
    import subprocess
    import sys

    raw = tiny_config(adapted["tmp"], run={"name": "one", "dir": str(tmp_path)}, model={"dropout": 0.0},
                      moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
                      train={"init_from": str(adapted["base"].run_dir), "max_steps": 4, "batch_size": 4,
                             "micro_batch_size": 1, "eval_every": 4,
                             "lora": {"rank": 4, "targets": ["attention", "experts", "router"]}},
                      checkpoint={"every": 4})
    cfg_file = write_config(tmp_path / "ddp.yaml", raw)
    one = fit(config.load(cfg_file))
    env = {k: v for k, v in __import__("os").environ.items() if k != "RANK"}
    proc = subprocess.run([sys.executable, "-m", "moectl", "train", str(cfg_file), "--nproc-per-node", "2",
                           "--run-name", "two"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = load_file(str(checkpoint.latest(one.run_dir) / checkpoint.ADAPTER))
    b = load_file(str(checkpoint.latest(tmp_path / "two") / checkpoint.ADAPTER))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith(".B"))


# ------------------------------------------------------------------------- PEFT's format, in transformers

PEFT_CASES = {
    "mixtral": (["attention", "experts", "router", "head"], {"model": {"tie_embeddings": False}}, True),
    "mixtral_shared_adapter": (["attention", "experts", "head"], {"moe": {"routed_scaling": "top_k"}}, False),
    "qwen2_moe": (["attention", "experts", "shared_experts", "dense_ffn", "router"],
                  {"moe": {"shared_experts": 1, "shared_expert_gate": True, "every": 2}, "model": {"n_layers": 4}}, True),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_transformers_with_peft_computes_the_adapted_models_logits(case, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moectl.services import hf

    targets, sections, per_expert = PEFT_CASES[case]
    raw = tiny_config_dict("transformer_moe")
    for name, values in sections.items():
        raw[name].update(values)
    cfg = config.from_dict(raw)
    cfg = config.with_values(cfg, "test", **{"train.init_from": "base", "train.lora": {
        "rank": 4, "alpha": 12, "targets": targets, "experts_rank_per_expert": per_expert}})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 300).eval()
    lora.attach(model, cfg.train)
    for n, p in model.named_parameters():
        if n.endswith(".B") or ".router." in n:
            torch.nn.init.normal_(p, std=0.1)
    with lora.detached(model):
        base = hf.to_transformers(cfg.model, cfg.moe, model.state_dict())
    hf.hf_config(cfg.model, cfg.moe, 300, None, 16).save_pretrained(tmp_path)
    save_file({k: v.contiguous().clone() for k, v in base.items()}, str(tmp_path / "model.safetensors"))
    tensors, adapter_config = hf.to_peft(cfg.model, cfg.moe, cfg.train.lora, lora.trained_state(model, targets))
    (tmp_path / "adapter").mkdir()
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(theirs).__name__ == hf.CLASSES[hf.architecture(cfg.moe)]
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        plain = theirs(ids).logits
        peft = PeftModel.from_pretrained(theirs, str(tmp_path / "adapter")).eval()
        adapted, ours = peft(ids).logits, model(ids).logits
        with lora.detached(model):
            torch.testing.assert_close(plain, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(adapted, ours, atol=1e-5, rtol=1e-5)
    wrapped = {n for n, _ in peft.named_modules()}
    if "router" in targets:
        assert any(n.endswith("mlp.gate.modules_to_save.default") for n in wrapped)
        assert not any("shared_expert_gate.modules_to_save" in n for n in wrapped)


def test_a_transformers_export_of_a_lora_run_keeps_the_adapter_for_peft_or_merges_it(adapted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = adapted["result"].run_dir
    runner = CliRunner()
    ours = loaded_model.load(run_dir).model
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        expected = ours(ids).logits
    for name, flags in (("kept", []), ("merged", ["--merge-lora"])):
        res = runner.invoke(app, ["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), dtype=torch.float32).eval()
        if name == "kept":
            assert json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
            model = PeftModel.from_pretrained(model, str(tmp_path / name / "adapter")).eval()
        else:
            assert not (tmp_path / name / "adapter").exists()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert "PEFT's format" in (tmp_path / "kept" / "README.md").read_text()


def test_an_lstm_moe_adapts_its_lstms_and_experts_end_to_end(tmp_path):
    base = fit(config.load(write_config(tmp_path / "base.yaml", tiny_config(
        tmp_path, "lstm_moe", run={"name": "base"}, model={"n_layers": 3}, train={"max_steps": 3}))))
    raw = tiny_config(tmp_path, "lstm_moe", run={"name": "lora"}, model={"n_layers": 3},
                      train={"max_steps": 3, "init_from": str(base.run_dir), "lora": {"rank": 4}})
    result = fit(config.load(write_config(tmp_path / "lora.yaml", raw)))
    saved = load_file(str(checkpoint.latest(result.run_dir) / checkpoint.ADAPTER))
    assert {k.split(".adapters.")[1] for k in saved} == {
        f"{w}.{f}" for w in ("weight_ih_l0", "weight_hh_l0", "w_up", "w_down") for f in "AB"}  # relu experts: no gate
    assert result.eval_loss < result.first_eval_loss
    again = runner_eval(result.run_dir)
    assert again == pytest.approx(result.eval_loss, abs=1e-6)


def runner_eval(run_dir) -> float:
    out = CliRunner().invoke(app, ["eval", str(run_dir), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)["loss"]


def test_the_end_of_run_panel_says_what_a_lora_run_trained(monkeypatch):
    import io

    from rich.console import Console

    from moectl.common import console
    from moectl.training.state import RunResult

    buf = io.StringIO()
    monkeypatch.setattr(console, "out", Console(file=buf, width=120))
    result = RunResult(step=3, max_steps=3, run_dir=Path("runs/x"), params_total=4_000_000, params_active=1_500_000)
    console.train_summary(RunResult(**{**vars(result), "params_trained": 434_000}))
    console.train_summary(result)  # full fine-tuning: nothing to add
    first, second = buf.getvalue().split("moectl train: done")[1:]
    assert "434k trained" in first and "trained" not in second.split("parameters")[1].split("\n")[0]
