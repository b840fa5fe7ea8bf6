"""The classic mixture of experts trained by EM (Jordan & Jacobs 1994) as a language model's
output head: p(y | h) = sum_i g_i(h) softmax(W_i h)_y, g = softmax(W_g h).

The M-step gradient identity, EM's monotone likelihood and its recovery of a planted mixture,
and the head in real runs: both backbones, with and without MoE layers, its gate reported like
a router's, eval, route-stats, export.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import events, tiny_config
from moectl import config
from moectl.cli import app
from moectl.services.hf import refusal
from moectl.models import build_model
from moectl.models.head import MixtureHead, mixture_log_probs, objective_loss
from moectl.commands.train import fit

runner = CliRunner()
V = 50


def mixture_model(objective: str, arch: str = "transformer_dense", seed: int = 0):
    cfg = config.from_dict({
        "model": {"arch": arch, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32, "head": "mixture",
                  "head_experts": 3, "tie_embeddings": False, "init_std": 0.3},
        "moe": {"num_experts": 4, "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
        "train": {"objective": objective},
    })
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.moe, V, cfg.train.objective)


def gradients(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["transformer_dense", "lstm_moe"])
def test_the_em_gradient_equals_the_likelihood_gradient(arch):
    # At the current parameters the M-step's gradient is the log-likelihood's (the classical identity).
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 11))
    likelihood, em, hard = (gradients(mixture_model(o, arch), ids) for o in ("likelihood", "em", "hard_em"))
    assert likelihood.keys() == em.keys() and any(k.startswith("head.gate") for k in em)
    for name in likelihood:
        torch.testing.assert_close(em[name], likelihood[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(not torch.allclose(hard[n], likelihood[n], atol=1e-6) for n in likelihood)  # hard EM is another step


def test_objectives_transcribe_the_formulas():
    torch.manual_seed(2)
    head = MixtureHead(5, 7, 3, init_std=1.0)
    h, y = torch.randn(9, 5), torch.randint(0, 7, (9,))
    with torch.no_grad():
        log_g, log_p, record = head(h)
    g = torch.softmax(h @ head.gate.weight.detach().t(), -1)
    p = torch.softmax(torch.einsum("nd,evd->nev", h, head.proj.detach()), -1)  # (N, E_h, V)
    torch.testing.assert_close(mixture_log_probs(log_g, log_p).exp(), (g[..., None] * p).sum(1))
    q = g * p[torch.arange(9), :, y]  # (N, E_h): g_i p_i(y)
    r = q / q.sum(1, keepdim=True)
    assert float(objective_loss(log_g, log_p, y, "likelihood")) == pytest.approx(float(-q.sum(1).log().mean()), rel=1e-5)
    assert float(objective_loss(log_g, log_p, y, "em")) == pytest.approx(float(-(r * q.log()).sum(1).mean()), rel=1e-5)
    best = q.log()[torch.arange(9), r.argmax(1)]
    assert float(objective_loss(log_g, log_p, y, "hard_em")) == pytest.approx(float(-best.mean()), rel=1e-5)
    assert torch.allclose(record.probs, g) and bool(record.chosen.all())  # the gate's record: every expert used


def test_em_never_lowers_the_likelihood_and_recovers_a_planted_mixture():
    """Full-batch generalised EM on features h = (x, 1): two planted experts over 4 tokens, the
    gate g = softmax(3 x (1, -1))."""
    gen = torch.Generator().manual_seed(5)
    n = 4000
    x = torch.randn(n, generator=gen)
    h = torch.stack([x, torch.ones(n)], dim=1)  # (N, 2)
    planted = torch.tensor([[0.45, 0.45, 0.05, 0.05], [0.05, 0.05, 0.45, 0.45]])
    gate = torch.softmax(3.0 * x[:, None] * torch.tensor([1.0, -1.0]), dim=1)  # (N, 2)
    component = torch.multinomial(gate, 1, generator=gen).squeeze(1)
    y = torch.multinomial(planted[component], 1, generator=gen).squeeze(1)

    torch.manual_seed(6)
    head = MixtureHead(2, 4, 2, init_std=0.5)
    optimiser = torch.optim.SGD(head.parameters(), lr=2.0)

    def log_likelihood() -> float:
        with torch.no_grad():
            return float(-objective_loss(*head(h)[:2], y, "likelihood"))

    history = [log_likelihood()]
    rows = torch.arange(n)
    for _ in range(150):
        with torch.no_grad():  # E-step: the responsibilities, fixed for the M-step
            log_g, log_p, _ = head(h)
            r = (log_g + log_p[rows, :, y]).softmax(1)
        for _ in range(10):  # M-step: gradient steps on Q = sum_i r_i (log g_i + log p_i(y))
            log_g, log_p, _ = head(h)
            q = (r * (log_g + log_p[rows, :, y])).sum(1).mean()
            optimiser.zero_grad()
            (-q).backward()
            optimiser.step()
        history.append(log_likelihood())
    steps = torch.tensor(history).diff()
    assert bool((steps >= -1e-6).all()), steps.min()
    true = float((gate * planted[:, y].T).sum(1).log().mean())  # the planted model's own log-likelihood
    assert history[-1] == pytest.approx(true, abs=0.01) and history[0] < true - 0.3
    with torch.no_grad():
        log_g, log_p, _ = head(h)
        experts = log_p.exp().mean(0)  # (2, 4) each learned expert's distribution (it ignores x)
    match = min(((experts - planted[list(perm)]).abs().sum(1).max() for perm in ((0, 1), (1, 0))))
    assert float(match) < 0.1, experts


@torch.no_grad()
def test_the_em_objective_of_the_model_matches_the_head_loss():
    model = mixture_model("em")
    ids = torch.randint(0, V, (2, 6))
    out = model(ids[:, :-1], ids[:, 1:])
    h = model.body(model.embed(ids[:, :-1]))[0].reshape(10, -1)  # (B, T, D) -> (N, D), final norm included
    expect = objective_loss(*model.head(h)[:2], ids[:, 1:].reshape(-1), "em")
    assert float(out.loss) == pytest.approx(float(expect), rel=1e-5)
    assert float(out.loss) > float(out.lm_loss)  # -Q = -log p(y) + H(r): the reported lm_loss is the likelihood's


@pytest.mark.parametrize("arch,objective", [("lstm_moe", "em"), ("transformer_dense", "hard_em")])
def test_a_mixture_head_trains_reports_and_ships(tmp_path, arch, objective):
    raw = tiny_config(tmp_path, arch=arch, run={"name": arch},
                      model={"head": "mixture", "head_experts": 3, "tie_embeddings": False},
                      train={"objective": objective, "max_steps": 3, "eval_every": 3})
    run = fit(config.from_dict(raw))
    slots = {"lstm_moe": [0, 1], "transformer_dense": [2]}[arch]  # MoE layers by FFN slot, then the head's gate
    tags = events(run.run_dir).Tags()["scalars"]
    assert f"routing/layer{slots[-1]:02d}/router_entropy" in tags and "train/loss" in tags
    ev = json.loads(runner.invoke(app, ["eval", str(run.run_dir), "--json"]).stdout)
    assert ev["loss"] == pytest.approx(run.eval_loss, abs=1e-6) and ev["bits_per_byte"] > 0
    assert [layer["slot"] for layer in ev["layers"]] == slots and len(ev["layers"][-1]["load"]) == 3
    rs = runner.invoke(app, ["route-stats", str(run.run_dir), "--json"])
    assert rs.exit_code == 0, rs.output
    assert len(json.loads(rs.stdout)["layers"][-1]["experts"]) == 3
    refused = runner.invoke(app, ["export", str(run.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert refused.exit_code == 2 and "cannot export to transformers" in refused.output and not (tmp_path / "hf").exists()
    moe_with_head = config.from_dict({**raw, "model": {**raw["model"], "arch": "transformer_moe"}})
    assert "model.head=mixture" in refusal(moe_with_head.model, moe_with_head.moe)  # the head alone is reason enough
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(run.run_dir), "--out", str(bundle)]).exit_code == 0
    again = json.loads(runner.invoke(app, ["eval", str(bundle), "--json"]).stdout)
    assert again["loss"] == pytest.approx(ev["loss"], abs=1e-6)


def test_expert_choice_routing_warns_in_eval_and_route_stats_and_generate_refuses(tmp_path, capsys):
    raw = tiny_config(tmp_path, moe={"router": "expert_choice"}, train={"max_steps": 2, "eval_every": 2})
    run = fit(config.from_dict(raw))
    # Training says first what will refuse the model, before the why.
    warned = " ".join(capsys.readouterr().err.split())
    assert ("warning: moe.router=expert_choice: moectl generate and moectl export --format hf will refuse this model"
            in warned), warned
    for command in (["eval"], ["route-stats"]):
        res = runner.invoke(app, [*command, str(run.run_dir)])
        assert res.exit_code == 0 and "moe.router=expert_choice" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["generate", str(run.run_dir), "--prompt", "def"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "token-by-token generation cannot route" in said and "Traceback" not in said


def test_the_head_gate_is_read_by_its_weights_and_frozen_with_the_routers():
    # A dense gate sends every token to every expert, so route-stats reads who takes what from the
    # gate weights: token 5 goes 0.9 + 0.9 to expert 0, token 6 mostly to expert 1.
    from moectl.moe.record import make_record
    from moectl.common.stats import RoutingProfile
    from moectl.services.warmstart import freeze

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.9, 0.1]])
    rec = make_record(probs.log(), probs, torch.arange(2).expand(3, 2), probs)
    prof = RoutingProfile(1, 2, seq_len=3, vocab_size=8)
    prof.update([rec], torch.tensor([[5, 6, 5]]))
    assert prof.load[0].tolist() == [3, 3]  # each expert computed every token
    assert prof.by_token[0, 5].tolist() == pytest.approx([1.8, 0.2]) and prof.by_token[0, 6].tolist() == pytest.approx([0.2, 0.8])
    # A sparse router (top-1 of 2 here) is read by its assignments, whatever their weights.
    sparse = make_record(probs.log(), probs, probs.argmax(1, keepdim=True), probs.max(1, keepdim=True).values)
    prof = RoutingProfile(1, 2, seq_len=3, vocab_size=8)
    prof.update([sparse], torch.tensor([[5, 6, 5]]))
    assert prof.by_token[0, 5].tolist() == [2.0, 0.0] and prof.by_token[0, 6].tolist() == [0.0, 1.0]
    model = mixture_model("likelihood", "lstm_moe")
    freeze(model, "router")
    assert not model.head.gate.weight.requires_grad and model.head.proj.requires_grad
