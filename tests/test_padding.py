"""Tokens that are not text, and targets that are not scored.

Padding (the pad of an unpacked instruction-tuning row) goes through the backbone but chooses no
expert and is in no router loss, bias update, capacity count or routing statistic, as in
Megatron-core (padding_mask) and transformers' Mixtral aux loss (attention_mask): for every
router, a padded batch routes, drops and balances its real tokens exactly as the batch of those
tokens alone, and what the padding holds changes nothing. A micro-batch with no scored target
(a response lost to prompt-side truncation) adds zero loss and zero count instead of NaN.

Notation: N tokens, D model dim, E experts, K experts per token, T tokens per sequence.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import prepare_corpus, scalar_series, tiny_config, write_config
from moectl import config, data
from moectl.commands import evaluate
from moectl.data import sft
from moectl.config import ROUTERS
from moectl.models import build_model
from moectl.moe import make_router, routing_losses
from moectl.common.stats import RoutingProfile, RoutingStats
from moectl.commands.train import fit
from test_routers import CAPACITY_ROUTERS, D, _one_thread, build_layer  # noqa: F401 (_one_thread: autouse fixture)

B, T = 3, 10
LENGTHS = [10, 6, 3]  # real tokens of each sequence; the rest of the row is padding


def padded_batch(seed: int, pad_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) tokens of B rows of T, the rows' real tokens from `seed` and their padding from
    `pad_seed`; (N,) valid; (N,) positions."""
    real = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    torch.manual_seed(seed)
    x = torch.randn(B * T, D)
    torch.manual_seed(pad_seed)
    x[~real.reshape(-1)] = torch.randn(int((~real).sum()), D) * 3.0
    return x, real.reshape(-1), torch.arange(T).repeat(B)


def losses(record, seq_len=None) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in routing_losses(record, seq_len=seq_len).items()}


@pytest.mark.parametrize(
    "kind,cf", [(k, None) for k in ROUTERS] + [(k, 0.5) for k in ROUTERS if k != "soft"])  # soft has no capacity
def test_a_padded_batch_routes_its_real_tokens_as_they_route_alone(kind, cf):
    layer = build_layer(kind, cf=cf, seed=3).eval()  # eval: no noise, so both passes route alike
    x, valid, positions = padded_batch(seed=4, pad_seed=5)
    y, rec = layer(x, positions, valid)
    y_alone, alone = layer(x[valid], positions[valid])
    torch.testing.assert_close(y[valid], y_alone, rtol=1e-5, atol=1e-6)
    assert bool((y[~valid] == 0).all())  # padding reaches no expert
    assert not bool(rec.chosen[~valid].any()) and not bool(rec.kept[~valid].any())
    assert torch.equal(rec.kept[valid], alone.kept) and torch.equal(rec.tokens_per_expert, alone.tokens_per_expert)
    assert int(rec.num_dropped) == int(alone.num_dropped)
    if cf is not None and kind == "expert_choice":  # each expert takes C = ceil(cf * N * K / E) of the real tokens
        assert rec.tokens_per_expert.tolist() == [math.ceil(cf * sum(LENGTHS) * 2 / 8)] * 8
    elif cf is not None:
        assert int(alone.num_dropped) > 0  # the capacity binds, and counts the real tokens only
    for name, value in losses(alone).items():
        assert losses(rec)[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("kind", ROUTERS)
def test_what_the_padding_holds_changes_nothing_in_training(kind):
    """With noise, jitter and random second experts drawn alike, two batches that differ only in
    their padding give the same outputs, records, smooth load estimates and losses."""
    layer = build_layer(kind, cf=0.5 if kind in CAPACITY_ROUTERS else None, seed=6).train()
    out = []
    for pad_seed in (7, 8):
        x, valid, positions = padded_batch(seed=9, pad_seed=pad_seed)
        torch.manual_seed(10)
        y, rec = layer(x, positions, valid)
        out.append((y, rec, losses(rec, seq_len=T)))
    (y1, r1, l1), (y2, r2, l2) = out
    torch.testing.assert_close(y1, y2)
    assert torch.equal(r1.kept, r2.kept) and torch.equal(r1.tokens_per_expert, r2.tokens_per_expert)
    if r1.load is not None:
        torch.testing.assert_close(r1.load, r2.load)
    assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-9)


def test_the_sequence_wise_loss_counts_each_sequence_over_its_real_tokens():
    """DeepSeek-V3 eq. 17-20 with T_b the real tokens of sequence b; a sequence of padding alone
    (the fourth) is not in the mean."""
    e, k = 8, 2
    torch.manual_seed(11)
    router = make_router("sigmoid", D, e, k, init_std=1.0)
    router.expert_bias.copy_(torch.randn(e) * 0.3)
    lengths = [T, 6, 2, 0]
    valid = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).reshape(-1)
    with torch.no_grad():
        rec = router(torch.randn(len(lengths) * T, D), valid)
    s = torch.sigmoid(rec.logits).tolist()
    per_sequence = []
    for q, t_b in enumerate(lengths[:3]):
        tokens = range(q * T, q * T + t_b)
        top = {t: sorted(range(e), key=lambda i: -s[t][i])[:k] for t in tokens}
        f = [e / (k * t_b) * sum(i in top[t] for t in tokens) for i in range(e)]
        p = [sum(s[t][i] / sum(s[t]) for t in tokens) / t_b for i in range(e)]
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    assert losses(rec, seq_len=T)["seq_balance"] == pytest.approx(sum(per_sequence) / 3, rel=1e-5)


def test_statistics_count_real_tokens_only():
    layer = build_layer("soft", seed=12).eval()  # a dense gate: every expert takes every real token
    x, valid, positions = padded_batch(seed=13, pad_seed=14)
    _, rec = layer(x, positions, valid)
    _, alone = layer(x[valid], positions[valid])
    ids = torch.arange(B * T).remainder(7).view(B, T)
    prof = RoutingProfile(1, rec.num_experts, T, 7)
    prof.update([rec], ids)
    ref = RoutingProfile(1, rec.num_experts, sum(LENGTHS), 7)  # the real tokens as one row: positions differ
    ref.update([alone], ids.reshape(-1)[valid].view(1, -1))
    assert float(prof.tokens[0]) == sum(LENGTHS) == float(ref.tokens[0])
    torch.testing.assert_close(prof.entropy_sum, ref.entropy_sum)
    torch.testing.assert_close(prof.importance, ref.importance)
    torch.testing.assert_close(prof.token_counts, ref.token_counts)
    torch.testing.assert_close(prof.by_token, ref.by_token)  # the gate weights, not a count of every slot
    torch.testing.assert_close(prof.by_position.sum(1), ref.by_position.sum(1))
    s, r = prof.summary()[0], ref.summary()[0]
    assert s.router_entropy == pytest.approx(r.router_entropy) and s.load == r.load


def test_the_bias_update_and_the_model_losses_ignore_padding_tokens():
    """Through the whole model: the padding's token ids change no router loss, no bias count and
    no routing record of a real token (the backbone is causal and the padding comes last)."""
    cfg = config.from_dict({"model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32},
                            "moe": {"router": "sigmoid", "num_experts": 4, "top_k": 2, "capacity_factor": 1.0,
                                    "z_loss_coef": 1e-3}})
    torch.manual_seed(15)
    model = build_model(cfg.model, cfg.moe, 50).train()
    real = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    ids = torch.randint(0, 50, (B, T))
    out = []
    for pad_token in (0, 49):
        x = torch.where(real, ids, pad_token)
        y = torch.where(real, torch.roll(ids, -1, 1), -100)
        with torch.no_grad():
            out.append(model(x, y, valid=real))
    a, b = out
    assert float(a.aux_loss) == pytest.approx(float(b.aux_loss), rel=1e-6) and float(a.aux_loss) > 0
    assert float(a.z_loss) == pytest.approx(float(b.z_loss), rel=1e-6)
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(ra.chosen_per_expert(), rb.chosen_per_expert())  # what update_bias receives
        assert int(ra.chosen_per_expert().sum()) == 2 * sum(LENGTHS)


def _sft_rows(n: int) -> list[dict]:
    return [{"prompt": f"Say {w}{i}", "response": f"{w} {w} {w}."} for i in range(n) for w in ("alpha", "be")]


def test_unpacked_rows_mark_their_padding_and_eval_statistics_leave_it_out(tmp_path):
    from test_sft import _examples

    ex, tok = _examples(tmp_path, _sft_rows(3))
    blocks = sft.ExampleBlocks(ex, 24, packing=False, pad_id=0)
    ids = np.arange(len(blocks))
    layout = blocks.layout(ids)
    lengths = np.diff(ex.offsets)  # every example is shorter than a row: the rest of the row is padding
    assert "segments" not in layout and layout["valid"].sum(1).tolist() == np.minimum(lengths, 24).tolist()
    packed = sft.ExampleBlocks(ex, 24, packing=True, pad_id=0).layout(np.arange(2))
    assert torch.equal(packed["valid"], packed["segments"] >= 0)
    cfg = config.from_dict({"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_hidden": 32},
                            "moe": {"num_experts": 4}})
    model = build_model(cfg.model, cfg.moe, tok.get_vocab_size())
    stats = RoutingStats(1, 4)
    loss = evaluate.mean_loss(model, blocks, [ids[:3], ids[3:]], torch.device("cpu"), None, stats)
    assert math.isfinite(loss) and float(stats.tokens[0]) == float(layout["valid"].sum())


def test_a_micro_batch_without_a_scored_target_adds_zero_loss_and_zero_count():
    cfg = config.from_dict({"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_hidden": 32},
                            "moe": {"num_experts": 4}})
    model = build_model(cfg.model, cfg.moe, 50)
    x = torch.randint(0, 50, (2, 8))
    out = model(x, torch.full_like(x, -100))
    assert float(out.lm_loss.detach()) == 0.0 and int(out.scored) == 0 and math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    y = torch.randint(0, 50, (2, 8))
    y[0] = -100
    scored = model(x, y)
    assert int(scored.scored) == 8
    torch.testing.assert_close(scored.lm_loss, torch.nn.functional.cross_entropy(scored.logits[1], y[1]))


def test_responses_lost_to_truncation_are_counted_and_train_nothing(tmp_path):
    """A conversation that ends in a long user turn loses its only response to the prompt-side
    cut. With one example per micro-batch, training goes on, and every logged loss is finite."""
    long_user = "word " * 80
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."},
                          {"role": "user", "content": long_user}]} for i in range(8)]
    rows += [{"messages": [{"role": "user", "content": f"Name {i}"}, {"role": "assistant", "content": f"Bo {i}."}]}
             for i in range(8)]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config(tmp_path, data={"source": "files", "data_files": str(chats), "task": "sft", "seq_len": 24,
                                      "validation_fraction": 0.25, "sample_by": "line"},
                      train={"max_steps": 6, "batch_size": 4, "micro_batch_size": 1, "eval_every": 3, "eval_batches": 4},
                      log={"every": 1})
    cfg = config.load(write_config(tmp_path / "sft.yaml", raw))
    result = fit(cfg)
    assert result.step == 6 and math.isfinite(result.eval_loss)
    losses = [v for _, v in scalar_series(result.run_dir, "train/lm_loss")]
    assert len(losses) == 6 and all(math.isfinite(v) and v > 0 for v in losses)
    corpus = prepare_corpus(cfg)
    blocks = data.blocks(corpus.train, cfg.data, corpus.eot_id)
    lost = [i for i in range(len(blocks)) if not bool((blocks.batch(np.array([i]))[1] != sft.IGNORE).any())]
    assert blocks.responses_lost == len(lost) > 0
