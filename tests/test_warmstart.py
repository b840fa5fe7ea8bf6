"""train.init_from: fine-tuning, sparse upcycling, Mixtral import; train.freeze."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, weights
from moectl import config
from moectl.services import warmstart
from moectl.cli import app
from moectl.common.errors import ConfigError
from moectl.models import build_model
from moectl.commands.train import fit
from moectl.services.loaded_model import load

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    raw = tiny_config(tmp, train={"max_steps": 3, "eval_every": 3}, model={"n_heads": 4})
    return tmp, raw, fit(config.from_dict(raw))


def with_changes(raw: dict, name: str, **sections) -> dict:
    out = copy.deepcopy(raw)
    out["run"]["name"] = name
    for key, values in sections.items():
        out.setdefault(key, {}).update(values)
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_export_to_mixtral_and_back_gives_identical_logits(base, tmp_path):
    pytest.importorskip("transformers")
    tmp, raw, run = base
    out = tmp_path / "mixtral"
    assert runner.invoke(app, ["export", str(run.run_dir), "--format", "hf", "--out", str(out)]).exit_code == 0
    cfg = config.from_dict(with_changes(raw, "from_hf", train={"init_from": str(out)}))
    source = load(run.run_dir)
    model = build_model(cfg.model, cfg.moe, source.tokenizer.get_vocab_size())
    assert "Mixtral" in warmstart.initialize(model, cfg.model, cfg.moe, cfg.train)
    ids = torch.randint(0, source.tokenizer.get_vocab_size(), (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(model, ids), logits_of(source.model, ids))

    # A run from it trains, with the Mixtral directory's tokenizer.
    result = fit(cfg)
    assert (result.run_dir / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()

    wrong = config.from_dict(with_changes(raw, "bad", train={"init_from": str(out)}, moe={"num_experts": 8}))
    with pytest.raises(ConfigError, match="num_local_experts is 4 but moe.num_experts is 8"):
        warmstart.initialize(build_model(wrong.model, wrong.moe, 300), wrong.model, wrong.moe, wrong.train)
    scaled = config.from_dict(with_changes(raw, "scaled", train={"init_from": str(out)}, moe={"routed_scaling": "top_k"}))
    with pytest.raises(ConfigError, match="routed output scale is 1.0 but moe.routed_scaling is 2"):
        warmstart.initialize(build_model(scaled.model, scaled.moe, 300), scaled.model, scaled.moe, scaled.train)


@pytest.mark.parametrize("mode", ["router", "all_but_experts"])
def test_fine_tuning_on_other_data_with_frozen_parts(base, tmp_path, mode):
    tmp, raw, run = base
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(3000)))
    tuned = fit(config.from_dict(with_changes(
        raw, f"tuned-{mode}", data={"data_files": str(other / "a.txt"), "sample_by": "line"},
        train={"init_from": str(run.run_dir), "freeze": mode, "max_steps": 3},
    )))
    before, after = weights(run.checkpoint), weights(tuned.checkpoint)
    for key in before:
        same = torch.equal(before[key], after[key])
        frozen = ".router." in key if mode == "router" else ".experts." not in key
        assert same == frozen, key
    assert (tuned.run_dir / "tokenizer.json").read_text() == (run.run_dir / "tokenizer.json").read_text()


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_upcycled_model_starts_with_the_dense_models_loss(base, tmp_path, arch):
    tmp, raw, _ = base
    dense_raw = with_changes(raw, f"dense-{arch}", model={"arch": f"{arch}_dense", "ffn_hidden": 32})
    dense = fit(config.from_dict(dense_raw))
    source = load(dense.run_dir)
    ids = torch.randint(0, source.tokenizer.get_vocab_size(), (2, 33), generator=torch.Generator().manual_seed(1))
    for scaling in (1.0, "top_k", 2.5):  # the experts' last matrix absorbs the routed scale
        moe_cfg = config.from_dict(with_changes(
            raw, f"up-{arch}", model={"arch": f"{arch}_moe", "ffn_hidden": 32},
            moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32, "renormalize": True, "routed_scaling": scaling},
            train={"init_from": str(dense.run_dir)},
        ))
        model = build_model(moe_cfg.model, moe_cfg.moe, source.tokenizer.get_vocab_size())
        assert "upcycled" in warmstart.initialize(model, moe_cfg.model, moe_cfg.moe, moe_cfg.train)
        with torch.no_grad():
            up, ref = model.eval()(ids[:, :-1], ids[:, 1:]), source.model(ids[:, :-1], ids[:, 1:])
        assert float(up.lm_loss) == pytest.approx(float(ref.lm_loss), abs=1e-5), scaling
        torch.testing.assert_close(up.logits, ref.logits, rtol=1e-4, atol=1e-5)

    noisy = config.from_dict(with_changes(raw, "noisy", model={"arch": f"{arch}_moe", "ffn_hidden": 32},
                                          moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32},
                                          train={"init_from": str(dense.run_dir), "upcycle_noise": 0.05}))
    m2 = build_model(noisy.model, noisy.moe, source.tokenizer.get_vocab_size())
    warmstart.initialize(m2, noisy.model, noisy.moe, noisy.train)
    w = [layer for layer in m2.modules() if hasattr(layer, "experts")][0].experts.w_up
    assert not torch.equal(w[0], w[1])  # noise makes the copies differ

    mismatched = config.from_dict(with_changes(raw, "mismatch", model={"arch": f"{arch}_moe", "ffn_hidden": 32},
                                               moe={"expert_hidden": 48}, train={"init_from": str(dense.run_dir)}))
    m3 = build_model(mismatched.model, mismatched.moe, source.tokenizer.get_vocab_size())
    with pytest.raises(ConfigError, match="moe.expert_hidden"):
        warmstart.initialize(m3, mismatched.model, mismatched.moe, mismatched.train)


def test_init_from_errors_are_one_line(base, tmp_path):
    tmp, raw, run = base
    missing = config.from_dict(with_changes(raw, "missing", train={"init_from": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="no such directory"):
        warmstart.source_tokenizer(missing.train.init_from)
    lstm = config.from_dict(with_changes(raw, "lstm", model={"arch": "lstm_moe"}, train={"init_from": str(run.run_dir)}))
    with pytest.raises(ConfigError, match="backbones must match"):
        warmstart.initialize(build_model(lstm.model, lstm.moe, 300), lstm.model, lstm.moe, lstm.train)


def test_init_from_an_export_bundle_loads_every_tensor(base, tmp_path):
    tmp, raw, run = base
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(run.run_dir), "--out", str(bundle)]).exit_code == 0
    cfg = config.from_dict(with_changes(raw, "from_bundle", train={"init_from": str(bundle)}))
    assert warmstart.source_tokenizer(cfg.train.init_from) == bundle / "tokenizer.json"
    source = load(run.run_dir)
    model = build_model(cfg.model, cfg.moe, source.tokenizer.get_vocab_size())
    warmstart.initialize(model, cfg.model, cfg.moe, cfg.train)
    ids = torch.randint(0, source.tokenizer.get_vocab_size(), (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits_of(model, ids), logits_of(source.model, ids))
