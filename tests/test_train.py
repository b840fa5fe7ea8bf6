"""`moectl train` end to end: outputs, TensorBoard, exact resume, determinism, Ctrl-C."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import events, interrupt_after_first_checkpoint, scalar_series, tiny_config, weights, write_config
from moectl import config
from moectl.common import plots
from moectl.services import checkpoint
from moectl.cli import app
from moectl.common.errors import ConfigError
from moectl.training.optim import lr_at, make_optimizer
from moectl.commands.train import fit

runner = CliRunner()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_train_writes_checkpoint_config_and_tensorboard(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    result = runner.invoke(app, ["train", str(cfg_file)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert "validation" in result.output and "tensorboard --logdir" in result.output

    # Checkpoints every 3 steps and at the end; each holds the three files.
    ckpts = checkpoint.list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [3, 6]
    for _, path in ckpts:
        assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    meta = checkpoint.read_meta(ckpts[-1][1])
    assert meta["step"] == 6 and meta["tokens_seen"] == 6 * 4 * 32

    # The resolved config reloads to an equal config.
    resolved = config.load(run_dir / "config.yaml")
    assert resolved == config.load(cfg_file)
    assert config.config_hash(resolved) == meta["config_hash"]
    assert (run_dir / "tokenizer.json").is_file()

    acc = events(run_dir)
    tags = acc.Tags()
    for tag in ["train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_sec", "eval/loss", "eval/ppl", "routing/layer00/cv", "routing/layer01/max_over_mean",
                "routing/layer00/load_entropy", "routing/layer00/router_entropy", "routing/layer00/drop_fraction",
                "routing/layer00/dead_experts", "routing/layer00/top20_share", "routing/layer00/bottom20_share",
                "routing/worst_max_over_mean", "train/router/load_balance", "train/router/z"]:
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 3, 6]
    # loss = lm + aux + z, window means of each.
    for loss, lm, aux, z in zip(*(acc.Scalars(f"train/{t}") for t in ("loss", "lm_loss", "aux_loss", "z_loss"))):
        assert loss.value == pytest.approx(lm.value + aux.value + z.value, rel=1e-5)

    # One histogram per MoE layer, one bucket per expert (edges e +- 0.5), summing to the window's assignments.
    assert {"routing/layer00/experts", "routing/layer01/experts"} <= set(tags["histograms"])
    for h in acc.Histograms("routing/layer00/experts"):
        v = h.histogram_value
        assert list(v.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
        assert sum(v.bucket) == 2 * 4 * 32 * 2  # log.every steps * batch * seq_len * top_k (dropless)
    assert "routing/load_heatmap" in tags["images"]
    image = acc.Images("routing/load_heatmap")[-1]
    drawn = plots.rgb_array(plots.load_heatmap([[0.25] * 4] * 2, [0, 1], 6))  # the figure of 2 layers x 4 experts
    assert (image.height, image.width) == drawn.shape[:2]
    assert "config/text_summary" in tags["tensors"]


def test_resume_from_earlier_checkpoint_reproduces_the_run(tmp_path):
    # Dropout and gradient accumulation exercise the RNG and data-position state.
    raw = tiny_config(tmp_path, model={"dropout": 0.1}, train={"micro_batch_size": 2, "max_steps": 8}, checkpoint={"every": 2})
    cfg_file = write_config(tmp_path / "tiny.yaml", raw)
    cfg = config.load(cfg_file)
    first = fit(cfg)
    run_dir = first.run_dir
    reference = tmp_path / "reference_step8"
    shutil.copytree(run_dir / "checkpoints" / "step_000008", reference)
    losses_before = scalar_series(run_dir, "train/loss")

    # Throw away everything after step 4 and continue from there.
    for step in (6, 8):
        shutil.rmtree(checkpoint.step_dir(run_dir, step))
    resumed = fit(cfg, resume=True)
    assert resumed.step == 8
    assert_same_weights(reference, run_dir / "checkpoints" / "step_000008")
    assert scalar_series(run_dir, "train/loss") == losses_before  # steps 6 and 8 purged and re-logged identically
    assert resumed.eval_loss == pytest.approx(first.eval_loss, abs=0)


def test_same_seed_gives_same_loss_curve_and_other_seed_differs(tmp_path):
    curves = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        raw = tiny_config(tmp_path, run={"name": name}, train={"seed": seed})
        fit(config.from_dict(raw))
        curves.append(scalar_series(tmp_path / "runs" / name, "train/loss"))
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


@pytest.mark.parametrize("arch", ["lstm_moe", "transformer_dense"])
def test_other_backbones_train_from_yaml(tmp_path, arch):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, arch=arch))
    result = runner.invoke(app, ["train", str(cfg_file), "--set", "train.max_steps=3", "--run-name", arch])
    assert result.exit_code == 0, result.output
    tags = events(tmp_path / "runs" / arch).Tags()
    assert "train/loss" in tags["scalars"]
    has_routing = any(t.startswith("routing/") for t in tags["scalars"])
    assert has_routing == arch.endswith("_moe")


def test_set_overrides_and_run_name(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    result = runner.invoke(
        app, ["train", str(cfg_file), "--set", "moe.top_k=1", "--set", "train.max_steps=2", "--run-name", "top1"]
    )
    assert result.exit_code == 0, result.output
    saved = config.load(tmp_path / "runs" / "top1" / "config.yaml")
    assert saved.moe.top_k == 1 and saved.train.max_steps == 2 and saved.run.name == "top1"
    hist = events(tmp_path / "runs" / "top1").Histograms("routing/layer00/experts")[-1]
    assert sum(hist.histogram_value.bucket) == 2 * 4 * 32 * 1  # top-1: one assignment per token


def test_resume_from_run_directory_can_extend_training(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    assert runner.invoke(app, ["train", str(cfg_file), "--set", "train.max_steps=3"]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    result = runner.invoke(app, ["train", str(run_dir), "--resume", "--set", "train.max_steps=5"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [3, 5]


def test_collapse_warning_reaches_console_and_tensorboard(tmp_path):
    raw = tiny_config(tmp_path, log={"collapse_threshold": 1.0001})  # any imbalance counts as collapse
    result = runner.invoke(app, ["train", str(write_config(tmp_path / "c.yaml", raw))])
    assert result.exit_code == 0, result.output
    assert "is collapsing" in result.output
    assert "routing/warnings/text_summary" in events(tmp_path / "runs" / "tiny").Tags()["tensors"]


def test_optimizer_is_fused_adamw_with_the_reference_update(tmp_path):
    """The fused AdamW kernel makes the same update as torch's per-parameter AdamW, decay groups included."""
    from moectl.models import build_model

    cfg = config.load(write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path)), [])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, 64)
    twin = build_model(cfg.model, cfg.moe, 64)
    twin.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    fused = make_optimizer(model, cfg.optim)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2
    twins = dict(twin.named_parameters())
    reference = torch.optim.AdamW(  # the same groups (by parameter name), nothing else taken from `fused`
        [{"params": [twins[n] for n, p in model.named_parameters() if any(p is q for q in g["params"])],
          "weight_decay": g["weight_decay"]} for g in fused.param_groups],
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, foreach=False)
    assert not reference.defaults["fused"] and {g["weight_decay"] for g in fused.param_groups} == {cfg.optim.weight_decay, 0.0}
    for step in range(3):
        for m in (model, twin):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
        fused.step()
        reference.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), start))  # every parameter moved


def test_lr_schedule():
    cfg = config.from_dict({"optim": {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}, "train": {"max_steps": 110}})
    assert lr_at(0, cfg.optim, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg.optim, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg.optim, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg.optim, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg.optim, 110) == pytest.approx(0.1)
    const = config.from_dict({"optim": {"lr": 1.0, "warmup_steps": 0, "schedule": "constant"}})
    assert lr_at(500, const.optim, 1000) == 1.0


def test_constant_schedule_with_a_cool_down():
    cfg = config.from_dict({"optim": {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, "schedule": "constant",
                                      "cooldown_steps": 20}, "train": {"max_steps": 110}})
    lrs = [lr_at(s, cfg.optim, 110) for s in range(110)]
    assert lrs[9] == lrs[10] == lrs[89] == 1.0  # warmup done; constant up to the cool-down
    assert lrs[90] == pytest.approx(1.0 - 0.9 / 20)  # first cool-down step, one twentieth down
    assert lrs[99] == pytest.approx(0.55) and lrs[109] == pytest.approx(0.1)  # linear to min_lr_ratio at the end
    assert all(a > b for a, b in zip(lrs[89:], lrs[90:]))
    # A cool-down longer than the run after warmup starts when warmup ends.
    assert lr_at(10, cfg.optim, 25) == pytest.approx(1.0 - 0.9 / 15) and lr_at(24, cfg.optim, 25) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="optim.cooldown_steps=20 needs optim.schedule=constant"):
        config.from_dict({"optim": {"cooldown_steps": 20}})


def test_ctrl_c_saves_and_resume_matches_uninterrupted_run(tmp_path):
    raw = tiny_config(tmp_path, train={"max_steps": 100, "eval_every": 1000}, checkpoint={"every": 5, "keep_last": 2})
    cfg_file = write_config(tmp_path / "tiny.yaml", raw)
    run_dir = tmp_path / "runs" / "tiny"
    code, output, stopped_at = interrupt_after_first_checkpoint(["train", str(cfg_file)], run_dir)
    assert code == 130, output
    assert "stopped at step" in output and "Traceback" not in output
    assert 5 <= stopped_at < 100
    # `moectl train --resume` in this process: what the interrupted process saved is all it has.
    resumed = runner.invoke(app, ["train", str(cfg_file), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output

    straight = fit(config.from_dict({**raw, "run": {"name": "straight", "dir": str(tmp_path / "runs")}}))
    assert_same_weights(straight.checkpoint, checkpoint.latest(run_dir))


def test_ctrl_c_during_a_step_finishes_that_step_and_saves_it(tmp_path, monkeypatch):
    import signal

    from moectl import training

    sent, real_lr_at = [], training.lr_at

    def lr_at(step, *args):
        if step == 1 and not sent:  # step 2 has begun: Ctrl-C arrives before its forward pass
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, *args)

    monkeypatch.setattr(training, "lr_at", lr_at)  # the loop reads it from the package at each step
    result = fit(config.from_dict(tiny_config(tmp_path)))
    assert sent and result.interrupted and result.step == 2
    assert checkpoint.latest(result.run_dir).name == "step_000002"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Without router losses (they are per micro-batch by design) and dropout, 2 x 2 accumulated
    # sequences give the same update as one batch of 4.
    finals = []
    for name, micro in (("big", None), ("accum", 2)):
        raw = tiny_config(
            tmp_path,
            run={"name": name},
            moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
            train={"micro_batch_size": micro, "max_steps": 2, "eval_every": 100},
            optim={"warmup_steps": 0},
        )
        finals.append(weights(fit(config.from_dict(raw)).checkpoint))
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_with_a_longer_schedule_warns_about_the_lr_jump(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    assert runner.invoke(app, ["train", str(cfg_file)]).exit_code == 0
    result = runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "train.max_steps=12"])
    assert result.exit_code == 0, result.output
    assert "the LR schedule changed: step 6 trained at lr" in result.output
    same = runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "train.max_steps=12"])
    assert "LR schedule changed" not in same.output  # nothing changed this time


def test_training_seconds_add_up_over_sessions_and_are_logged_at_each_evaluation(tmp_path):
    """eval/train_seconds, what equal-time comparisons read, counts the steps of every session."""
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    assert runner.invoke(app, ["train", str(cfg_file)]).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    first = checkpoint.read_meta(checkpoint.latest(run_dir))["seconds_trained"]
    assert runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "train.max_steps=12"]).exit_code == 0
    series = scalar_series(run_dir, "eval/train_seconds")
    assert [step for step, _ in series] == [0, 3, 6, 9, 12]
    seconds = [value for _, value in series]
    assert seconds[0] == 0.0 and seconds[2] == pytest.approx(first) and all(b > a for a, b in zip(seconds, seconds[1:]))
    assert checkpoint.read_meta(checkpoint.latest(run_dir))["seconds_trained"] == pytest.approx(seconds[-1])


def test_resume_refuses_changed_data(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, own_corpus=True, train={"max_steps": 3}))
    assert runner.invoke(app, ["train", str(cfg_file)]).exit_code == 0
    doc = next((tmp_path / "corpus").glob("*.txt"))
    doc.write_text(doc.read_text() + "\n# an edit after the run started\n")
    result = runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "train.max_steps=6"])
    assert result.exit_code == 2, result.output
    assert "data changed since" in result.output and "Traceback" not in result.output


def test_divergence_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    raw = tiny_config(tmp_path, train={"max_steps": 20, "grad_clip": None}, optim={"lr": 1e12, "warmup_steps": 0},
                      checkpoint={"every": 1})
    result = runner.invoke(app, ["train", str(write_config(tmp_path / "d.yaml", raw))])
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.output and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "tiny"
    steps = [s for s, _ in checkpoint.list_checkpoints(run_dir)]
    # Every saved checkpoint holds finite weights: the diverged step was never applied or saved.
    for _, path in checkpoint.list_checkpoints(run_dir):
        assert all(torch.isfinite(t).all() for t in weights(path).values()), path
    assert max(steps, default=0) < 20


def test_a_run_shorter_than_its_warmup_warms_up_over_all_its_steps(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, optim={"lr": 3e-3, "warmup_steps": 100}))
    result = runner.invoke(app, ["train", str(cfg_file), "--set", "train.max_steps=4"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "warning: optim.warmup_steps=100 is longer than train.max_steps=4: warming up over all 4 steps" in said
    run_dir = tmp_path / "runs" / "tiny"
    assert config.load(run_dir / "config.yaml").optim.warmup_steps == 100  # the config as asked; lr_at fits it
    # Logged every 2 steps: the LR of the step just taken, linear up to the peak at the last step.
    assert [v for _, v in scalar_series(run_dir, "train/lr")] == pytest.approx([3e-3 * 2 / 4, 3e-3 * 4 / 4])


def test_resume_starts_again_a_run_killed_before_its_first_checkpoint(tmp_path):
    cfg_file = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, checkpoint={"every": 100}))
    reference = fit(config.load(cfg_file, ["run.name=reference"]))
    # The killed run: its directory holds config.yaml, tokenizer.json and logs, but no checkpoint.
    killed = fit(config.load(cfg_file))
    shutil.rmtree(checkpoint.checkpoints_dir(killed.run_dir))

    def said(result, code):  # rich wraps long lines
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())

    assert "never saved a checkpoint; pass --resume to start it again" in said(runner.invoke(app, ["train", str(cfg_file)]), 2)
    other_model = runner.invoke(app, ["train", str(cfg_file), "--resume", "--set", "model.d_model=64"])
    assert "model.d_model: 32 -> 64" in said(other_model, 2)
    result = runner.invoke(app, ["train", str(cfg_file), "--resume"])
    assert "has no checkpoint yet: starting it again from step 0" in said(result, 0)
    assert_same_weights(reference.checkpoint, checkpoint.latest(killed.run_dir))
    # The killed run's TensorBoard events are purged, not shown twice.
    for tag in ("train/loss", "eval/loss"):
        assert scalar_series(killed.run_dir, tag) == scalar_series(reference.run_dir, tag)


def test_collapse_warning_names_the_steps_of_its_window(tmp_path):
    """A window shorter than log.every (the run ends first) covers steps 1..3, not -6..3."""
    raw = tiny_config(tmp_path, log={"collapse_threshold": 1.0001, "every": 10},  # any imbalance counts as collapse
                      train={"max_steps": 3, "eval_every": 3})
    result = runner.invoke(app, ["train", str(write_config(tmp_path / "c.yaml", raw))])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "step 3: routing in layer" in said and "over steps 1-3" in said
