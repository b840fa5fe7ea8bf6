"""Hugging Face transformers interop: `moectl export --format hf` writes a directory that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as-is, and
`train.init_from` reads a Mixtral directory back.

Only a model that transformers computes exactly is exported; anything else is refused with one
line naming the reason. A plain top-k MoE in every block becomes MixtralForCausalLM; a gated
shared expert, top-k weights without renormalising, or dense blocks between MoE blocks need
Qwen2MoeForCausalLM. Both use pre-norm RMSNorm, rotary embeddings in the rotate-half layout,
softmax routing in fp32 and SwiGLU experts silu(x W_gate) * (x W_up) W_down, as moectl does.
Mixtral names (moectl -> transformers):

  embed.weight                          model.embed_tokens.weight
  blocks.i.attn_norm.weight             model.layers.i.input_layernorm.weight
  blocks.i.attn.{q,k,v,o}_proj.weight   model.layers.i.self_attn.{q,k,v,o}_proj.weight
  blocks.i.ffn_norm.weight              model.layers.i.post_attention_layernorm.weight
  blocks.i.ffn.inner.router.weight      model.layers.i.block_sparse_moe.gate.weight
  blocks.i.ffn.inner.experts.w_gate[e]  model.layers.i.block_sparse_moe.experts.e.w1.weight (transposed)
  blocks.i.ffn.inner.experts.w_down[e]  model.layers.i.block_sparse_moe.experts.e.w2.weight (transposed)
  blocks.i.ffn.inner.experts.w_up[e]    model.layers.i.block_sparse_moe.experts.e.w3.weight (transposed)
  norm.weight, lm_head.weight           model.norm.weight, lm_head.weight

Qwen2-MoE uses mlp.gate, mlp.experts.e.{gate,up,down}_proj, mlp.shared_expert.{gate,up,down}_proj
and mlp.shared_expert_gate (a model without shared experts gets a zero one, which adds exactly 0).
The per-expert layouts are the ones these models' checkpoints use and transformers' loading reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moectl.config import Config
from moectl.errors import ConfigError, MoectlError
from moectl.fileio import staged_directory
from moectl.trained import Trained



def refusal(cfg: Config) -> Optional[str]:
    """Why transformers cannot compute this model exactly (None when it can)."""
    m, moe = cfg.model, cfg.moe
    if m.arch != "transformer_moe":
        return f"model.arch={m.arch}: only transformer_moe has a transformers equivalent; use --format safetensors"
    if moe.router not in ("topk", "noisy_topk"):
        return (f"moe.router={moe.router}: Mixtral and Qwen2-MoE route by softmax top-k; only topk and noisy_topk "
                "(whose evaluation routing is exactly that) export")
    eval_cf = moe.eval_capacity_factor
    drops = (moe.capacity_factor is not None and eval_cf is None) or isinstance(eval_cf, float)
    if drops:
        return ("moe.capacity_factor: a capacity that drops tokens at evaluation has no transformers equivalent (Mixtral "
                "and Qwen2-MoE are dropless); set moe.eval_capacity_factor=dropless if the model should run dropless")
    if moe.shared_experts and not moe.shared_expert_gate:
        return (f"moe.shared_experts={moe.shared_experts} without moe.shared_expert_gate: Qwen2-MoE, the transformers "
                "architecture with a shared expert, always scales it by a sigmoid gate")
    if m.activation != "swiglu":
        return f"model.activation={m.activation}: Mixtral's and Qwen2-MoE's experts are SwiGLU"
    return None


def architecture(cfg: Config) -> str:
    """`mixtral`, or `qwen2_moe` for what only it has: a gated shared expert, top-k weights that are
    not renormalised (its norm_topk_prob switch), or dense FFN blocks between MoE blocks (its
    decoder_sparse_step, which counts blocks as moe.every does)."""
    renormalized = cfg.moe.router == "noisy_topk" or cfg.moe.renormalize
    return "qwen2_moe" if cfg.moe.shared_experts or not renormalized or cfg.moe.every != 1 else "mixtral"


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise MoectlError(
            "--format hf needs Hugging Face transformers: pip install 'moectl[hf]' (or pip install transformers)"
        ) from None
    return transformers


def hf_config(trained: Trained, eot: Optional[int]):
    """The transformers config of the exported model (Mixtral or Qwen2-MoE)."""
    import inspect

    from transformers import MixtralConfig, Qwen2MoeConfig

    cfg, m, moe = trained.cfg, trained.cfg.model, trained.cfg.moe
    common = dict(
        vocab_size=trained.tokenizer.get_vocab_size(),
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.data.seq_len,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        num_experts_per_tok=moe.top_k,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    if architecture(cfg) == "qwen2_moe":
        klass = Qwen2MoeConfig
        kwargs = dict(
            common,
            intermediate_size=m.ffn_hidden,  # the dense blocks' FFN
            moe_intermediate_size=cfg.expert_hidden,
            shared_expert_intermediate_size=_shared_hidden(cfg) or 1,  # no shared experts: one zero expert
            num_experts=moe.num_experts,
            norm_topk_prob=moe.router == "noisy_topk" or moe.renormalize,
            decoder_sparse_step=moe.every,
            mlp_only_layers=[],
            qkv_bias=False,
            use_sliding_window=False,
            architectures=["Qwen2MoeForCausalLM"],
        )
    else:
        klass = MixtralConfig
        kwargs = dict(
            common,
            intermediate_size=cfg.expert_hidden,
            head_dim=m.d_model // m.n_heads,
            num_local_experts=moe.num_experts,
            router_jitter_noise=0.0,
            sliding_window=None,
            architectures=["MixtralForCausalLM"],
        )
    if "rope_parameters" in inspect.signature(klass.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:  # transformers 4.x
        kwargs["rope_theta"] = m.rope_theta
    return klass(**kwargs)


def _shared_hidden(cfg: Config) -> int:
    return cfg.moe.shared_experts * (cfg.moe.shared_expert_hidden or cfg.expert_hidden)


# Per-expert tensor names: (moectl, Mixtral, Qwen2-MoE)
EXPERT_NAMES = (("w_gate", "w1", "gate_proj"), ("w_down", "w2", "down_proj"), ("w_up", "w3", "up_proj"))


def hf_state_dict(trained: Trained, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """moectl's weights under the transformers architecture's names, in its per-expert layout."""
    if architecture(trained.cfg) == "mixtral":
        return mixtral_state_dict(trained, dtype)
    sd = trained.model.state_dict()
    out = _shared_outside_ffn(trained, sd)
    for i in range(trained.cfg.model.n_layers):
        moe, dst = f"blocks.{i}.ffn.inner.", f"model.layers.{i}.mlp."
        if moe + "router.weight" not in sd:  # a dense block: Qwen2MoeMLP
            for ours, _, theirs in EXPERT_NAMES:
                out[f"{dst}{theirs}.weight"] = sd[moe + ours].t()
            continue
        out[dst + "gate.weight"] = sd[moe + "router.weight"]
        _unstack_experts(out, sd, moe, dst, column=2)
        d, width = trained.cfg.model.d_model, _shared_hidden(trained.cfg)
        for ours, _, theirs in EXPERT_NAMES:
            w = sd.get(f"{moe}shared.{ours}")
            zero = torch.zeros((1, d) if ours != "w_down" else (d, 1))  # no shared expert: a zero one adds 0
            out[f"{dst}shared_expert.{theirs}.weight"] = w.t() if width else zero
        gate = sd.get(moe + "shared_gate.weight")
        out[dst + "shared_expert_gate.weight"] = gate if gate is not None else torch.zeros(1, d)
    return _cast(out, dtype)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}


def _unstack_experts(out: dict, sd: dict, moe: str, prefix: str, column: int) -> None:
    """moectl's stacked (E, in, out) expert weights as one (out, in) Linear weight per expert,
    named by EXPERT_NAMES[column] (1: Mixtral, 2: Qwen2-MoE)."""
    for names in EXPERT_NAMES:
        stacked = sd[f"{moe}experts.{names[0]}"]
        for e in range(stacked.shape[0]):
            out[f"{prefix}experts.{e}.{names[column]}.weight"] = stacked[e].t()


def _shared_outside_ffn(trained: Trained, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embeddings, norms and attention: the same names in Mixtral and Qwen2-MoE."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not trained.cfg.model.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(trained.cfg.model.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}self_attn.{proj}.weight"] = sd[f"{src}attn.{proj}.weight"]
    return out


def mixtral_state_dict(trained: Trained, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """moectl's weights under Mixtral's names, in the per-expert layout."""
    sd = trained.model.state_dict()
    out = _shared_outside_ffn(trained, sd)
    for i in range(trained.cfg.model.n_layers):
        moe, dst = f"blocks.{i}.ffn.inner.", f"model.layers.{i}."
        out[dst + "block_sparse_moe.gate.weight"] = sd[moe + "router.weight"]
        _unstack_experts(out, sd, moe, dst + "block_sparse_moe.", column=1)
    return _cast(out, dtype)


def export_hf(trained: Trained, out: Path, dtype: str = "fp32", overwrite: bool = False, verify: bool = True) -> Path:
    """Write the transformers directory atomically; with `verify`, load it in transformers and check
    that its logits equal moectl's before it is put in place."""
    from safetensors.torch import save_file

    from moectl.export import DTYPES, check_target, mark_bundle

    reason = refusal(trained.cfg)
    if reason:
        raise ConfigError(f"cannot export to transformers: {reason}")
    transformers = _require_transformers()
    transformers.utils.logging.set_verbosity_error()  # its load bars and notices; moectl reports the outcome
    transformers.utils.logging.disable_progress_bar()
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out = Path(out)
    check_target(out, overwrite)
    eot = trained.tokenizer.token_to_id(trained.cfg.tokenizer.eot_token)
    with staged_directory(out) as tmp:
        config_ = hf_config(trained, eot)
        setattr(config_, "dtype" if hasattr(config_, "dtype") else "torch_dtype", DTYPES[dtype])
        config_.save_pretrained(tmp)
        save_file(hf_state_dict(trained, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        eot_token = trained.cfg.tokenizer.eot_token if eot is not None else None
        fast = PreTrainedTokenizerFast(tokenizer_object=trained.tokenizer, eos_token=eot_token, pad_token=eot_token)
        fast.save_pretrained(tmp)
        GenerationConfig(eos_token_id=eot, pad_token_id=eot).save_pretrained(tmp)
        mark_bundle(tmp, trained, dtype, fmt="hf")
        if verify:
            diff = max_logit_difference(trained, tmp, DTYPES[dtype])
            if diff > 1e-4:
                raise MoectlError(
                    f"export check failed: transformers' logits differ from moectl's by {diff:.3g}; nothing was written "
                    "(please report this as a bug)"
                )
    return out


@torch.no_grad()
def max_logit_difference(trained: Trained, hf_dir: Path, stored: torch.dtype = torch.float32, length: int = 32) -> float:
    """Max |logit difference| between moectl and transformers on one random sequence, both in
    fp32 with the weights as stored (rounded to `stored`)."""
    import copy

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model = trained.model if stored == torch.float32 else copy.deepcopy(trained.model).to(stored).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, trained.tokenizer.get_vocab_size(), (1, min(length, trained.cfg.data.seq_len)), generator=g)
    ours = model(ids.to(trained.device)).logits.float().cpu()
    theirs = hf(ids).logits.float()
    return float((ours - theirs).abs().max())


# ---------------------------------------------------------------------------------- import


def is_mixtral_dir(path: Path) -> bool:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "mixtral"
    except (OSError, ValueError, AttributeError):
        return False


def check_mixtral_config(path: Path, cfg: Config) -> None:
    """The Mixtral directory's shapes must be the ones the moectl config builds; name the first that differs."""
    import json

    hc = json.loads((Path(path) / "config.json").read_text())
    rope = (hc.get("rope_parameters") or {}).get("rope_theta", hc.get("rope_theta", 10000.0))
    m = cfg.model
    pairs = [
        ("hidden_size", hc.get("hidden_size"), "model.d_model", m.d_model),
        ("num_hidden_layers", hc.get("num_hidden_layers"), "model.n_layers", m.n_layers),
        ("num_attention_heads", hc.get("num_attention_heads"), "model.n_heads", m.n_heads),
        ("num_key_value_heads", hc.get("num_key_value_heads"), "model.n_heads (moectl has no grouped-query attention)", m.n_heads),
        ("intermediate_size", hc.get("intermediate_size"), "moe.expert_hidden", cfg.expert_hidden),
        ("num_local_experts", hc.get("num_local_experts"), "moe.num_experts", cfg.moe.num_experts),
        ("num_experts_per_tok", hc.get("num_experts_per_tok"), "moe.top_k", cfg.moe.top_k),
        ("tie_word_embeddings", hc.get("tie_word_embeddings", False), "model.tie_embeddings", m.tie_embeddings),
        ("rms_norm_eps", hc.get("rms_norm_eps"), "model.norm_eps", m.norm_eps),
        ("rope theta", rope, "model.rope_theta", m.rope_theta),
    ]
    for theirs_name, theirs, ours_name, ours in pairs:
        if theirs != ours:
            raise ConfigError(
                f"train.init_from={str(path)!r}: its {theirs_name} is {theirs} but {ours_name} is {ours}; "
                "set the model and moe sections to match the Mixtral checkpoint"
            )
    reason = refusal(cfg) or (None if architecture(cfg) == "mixtral" else
                              "it has shared experts, dense blocks or unrenormalised top-k weights, which Mixtral has not")
    if reason:
        raise ConfigError(f"train.init_from={str(path)!r} is a Mixtral model, but this config is not: {reason}")
    if hc.get("head_dim") not in (None, m.d_model // m.n_heads):
        raise ConfigError(f"train.init_from={str(path)!r}: head_dim {hc['head_dim']} != model.d_model / model.n_heads")


def load_mixtral_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Mixtral directory (one or more safetensors files), by name."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"train.init_from={str(path)!r}: no .safetensors weights in the Mixtral directory")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def moectl_state_dict(hf_sd: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The inverse of `mixtral_state_dict`: Mixtral's per-expert tensors into moectl's names."""
    get = lambda k: hf_sd[k].float()  # noqa: E731
    out = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    out["lm_head.weight"] = get("lm_head.weight") if "lm_head.weight" in hf_sd else out["embed.weight"]
    for i in range(cfg.model.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = get(src + "post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}attn.{proj}.weight"] = get(f"{src}self_attn.{proj}.weight")
        moe = src + "block_sparse_moe."
        out[dst + "ffn.inner.router.weight"] = get(moe + "gate.weight")
        for ours, theirs, _ in EXPERT_NAMES:
            experts = [get(f"{moe}experts.{e}.{theirs}.weight").t() for e in range(cfg.moe.num_experts)]
            out[f"{dst}ffn.inner.experts.{ours}"] = torch.stack(experts)  # (E, in, out)
    return out
