"""The mapping between moectl models and Hugging Face transformers' Mixtral and Qwen2-MoE: which
configs have an exact equivalent, their transformers configs, and the state dicts both ways.
Pure functions of the model and moe config sections, plain values and tensors: export.py writes
the directory, warmstart.py reads one.

Only a model that transformers computes exactly maps; `refusal` names the reason otherwise. A
plain top-k MoE in every block becomes MixtralForCausalLM; a gated shared expert, top-k weights
without renormalising, or dense blocks between MoE blocks need Qwen2MoeForCausalLM. Both use pre-norm RMSNorm, rotary embeddings in the rotate-half layout,
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

from typing import Any, Optional

import torch

from moectl.config import LoRAConfig, ModelConfig, MoEConfig

Tensors = dict[str, torch.Tensor]
# Each architecture() by its name in words and its transformers model class.
NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Per-expert tensor names: (moectl, Mixtral, Qwen2-MoE)
EXPERT_NAMES = (("w_gate", "w1", "gate_proj"), ("w_down", "w2", "down_proj"), ("w_up", "w3", "up_proj"))


def refusal(model: ModelConfig, moe: MoEConfig) -> Optional[str]:
    """Why transformers cannot compute this model exactly (None when it can)."""
    if model.arch != "transformer_moe":
        return f"model.arch={model.arch}: only transformer_moe has a transformers equivalent; use --format safetensors"
    if model.head != "linear":
        return (f"model.head={model.head}: Mixtral and Qwen2-MoE end in one linear softmax, not a mixture of softmax "
                "experts; use --format safetensors")
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
    if model.activation != "swiglu":
        return f"model.activation={model.activation}: Mixtral's and Qwen2-MoE's experts are SwiGLU"
    return None


def _renormalized(moe: MoEConfig) -> bool:
    return moe.router == "noisy_topk" or moe.renormalize


def routed_scale(moe: MoEConfig) -> float:
    """moe.routed_scaling as the number the MoE layers multiply by (`top_k`: K)."""
    return moe.top_k if moe.routed_scale is None else moe.routed_scale


def architecture(moe: MoEConfig) -> str:
    """`mixtral`, or `qwen2_moe` for what only it has: a gated shared expert, top-k weights that are
    not renormalised (its norm_topk_prob switch), or dense FFN blocks between MoE blocks (its
    decoder_sparse_step, which counts blocks as moe.every does)."""
    return "qwen2_moe" if moe.shared_experts or not _renormalized(moe) or moe.every != 1 else "mixtral"


def _shared_hidden(moe: MoEConfig) -> int:
    return moe.shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)


def hf_config(model: ModelConfig, moe: MoEConfig, vocab_size: int, eot: Optional[int], seq_len: int):
    """The transformers config of the model (MixtralConfig or Qwen2MoeConfig); `seq_len` (data.seq_len)
    becomes its max_position_embeddings."""
    import inspect

    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=model.d_model,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_heads,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        num_experts_per_tok=moe.top_k,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    if architecture(moe) == "qwen2_moe":
        klass = Qwen2MoeConfig
        kwargs = dict(
            common,
            intermediate_size=model.ffn_hidden,  # the dense blocks' FFN
            moe_intermediate_size=moe.expert_hidden,
            shared_expert_intermediate_size=_shared_hidden(moe) or 1,  # no shared experts: one zero expert
            num_experts=moe.num_experts,
            norm_topk_prob=_renormalized(moe),
            decoder_sparse_step=moe.every,
            mlp_only_layers=[],
            qkv_bias=False,
            use_sliding_window=False,
            architectures=[CLASSES["qwen2_moe"]],
        )
    else:
        klass = MixtralConfig
        kwargs = dict(
            common,
            intermediate_size=moe.expert_hidden,
            head_dim=model.d_model // model.n_heads,
            num_local_experts=moe.num_experts,
            router_jitter_noise=0.0,
            sliding_window=None,
            architectures=[CLASSES["mixtral"]],
        )
    if "rope_parameters" in inspect.signature(klass.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": model.rope_theta}
    else:  # transformers 4.x
        kwargs["rope_theta"] = model.rope_theta
    return klass(**kwargs)


# ---------------------------------------------------------------------- moectl -> transformers


def to_transformers(model: ModelConfig, moe: MoEConfig, sd: Tensors) -> Tensors:
    """moectl's weights under the architecture's names, in its per-expert layout (views of `sd`)."""
    out = _outside_ffn(model, sd)
    qwen = architecture(moe) == "qwen2_moe"
    column = 2 if qwen else 1
    scale = routed_scale(moe)
    for i in range(model.n_layers):
        src = f"blocks.{i}.ffn.inner."
        dst = f"model.layers.{i}.mlp." if qwen else f"model.layers.{i}.block_sparse_moe."
        if src + "router.weight" not in sd:  # a dense block: Qwen2MoeMLP
            for names in EXPERT_NAMES:
                out[f"{dst}{names[2]}.weight"] = sd[src + names[0]].t()
            continue
        out[dst + "gate.weight"] = sd[src + "router.weight"]
        for names in EXPERT_NAMES:
            stacked = sd[f"{src}experts.{names[0]}"]  # (E, in, out) -> E of (out, in)
            if names[0] == "w_down" and scale != 1.0:  # the routed scaling folds into each expert's last matrix
                stacked = stacked * scale
            for e in range(stacked.shape[0]):
                out[f"{dst}experts.{e}.{names[column]}.weight"] = stacked[e].t()
        if qwen:
            _shared_expert(model, moe, sd, src, dst, out)
    return out


def _shared_expert(model: ModelConfig, moe: MoEConfig, sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """Qwen2-MoE's gated shared expert; a model without one gets a zero expert, which adds 0."""
    d, width, dtype = model.d_model, _shared_hidden(moe), sd[src + "router.weight"].dtype
    for ours, _, theirs in EXPERT_NAMES:
        zero = torch.zeros((1, d) if ours != "w_down" else (d, 1), dtype=dtype)
        out[f"{dst}shared_expert.{theirs}.weight"] = sd[f"{src}shared.{ours}"].t() if width else zero
    gate = sd.get(src + "shared_gate.weight")
    out[dst + "shared_expert_gate.weight"] = gate if gate is not None else torch.zeros(1, d, dtype=dtype)


def _outside_ffn(model: ModelConfig, sd: Tensors) -> Tensors:
    """Embeddings, norms and attention: the same names in Mixtral and Qwen2-MoE."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(model.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}self_attn.{proj}.weight"] = sd[f"{src}attn.{proj}.weight"]
    return out


# ------------------------------------------------------------------------ LoRA -> PEFT adapter

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own names


def to_peft(model: ModelConfig, moe: MoEConfig, lora: LoRAConfig, trained: Tensors) -> tuple[Tensors, dict[str, Any]]:
    """A LoRA run's trained tensors (models/lora.py trained_state) as a PEFT adapter of the exported
    model: (adapter_model.safetensors' tensors, adapter_config.json), for PeftModel.from_pretrained.

    A moectl adapter is x W + s (x A) B with A (in, r), B (r, out); PEFT's lora_A.weight is A^T and
    lora_B.weight B^T (nn.Linear layout), scaled by lora_alpha / r. transformers stores each MoE
    layer's experts fused, gate_up_proj (E, 2H, D) and down_proj (E, D, H), which PEFT adapts as
    parameters (target_parameters): per expert e, lora_A.weight rows e*r..e*r+r-1 and lora_B.weight
    columns j*E + e. gate and up have an adapter each, so the fused matrix gets their block-diagonal
    pair, of rank 2r (rank_pattern, with alpha_pattern keeping the scale); down's B takes the routed
    scale the export folds into down_proj. A pair shared by all experts is written once per expert.
    PEFT nests the two experts' wrappers in parameter order: gate_up_proj's keys go under
    `experts.base_layer`, down_proj's under `experts`. Trained routers are modules_to_save, whole."""
    mlp = "mlp"  # transformers 5 names both architectures' FFN block `mlp` once loaded
    scale = lora.alpha / lora.rank
    out: Tensors = {}
    target_modules, target_parameters, rank_pattern, alpha_pattern = [], [], {}, {}

    def linear(name: str, a: torch.Tensor, b: torch.Tensor) -> None:  # a (in, r), b (r, out)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.t().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.t().contiguous()
        target_modules.append(name)

    def fused(name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = name.rsplit(".", 1)[0] + (".base_layer" if name.endswith("gate_up_proj") else "")
        a_out, b_out = _fused_pair(pairs, moe.num_experts)
        out[f"{PEFT_PREFIX}{key}.lora_A.weight"], out[f"{PEFT_PREFIX}{key}.lora_B.weight"] = a_out, b_out
        target_parameters.append(name)
        rank = a_out.shape[0] // moe.num_experts
        if rank != lora.rank:
            rank_pattern[name], alpha_pattern[name] = rank, scale * rank

    modules_to_save = []
    for i in range(model.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{src}attn.{proj}.adapters.weight.A" in trained:
                linear(f"{dst}self_attn.{proj}", trained[f"{src}attn.{proj}.adapters.weight.A"],
                       trained[f"{src}attn.{proj}.adapters.weight.B"])
        ffn = f"{src}ffn.inner."
        get = lambda part, w: (trained[f"{ffn}{part}adapters.{w}.A"], trained[f"{ffn}{part}adapters.{w}.B"])  # noqa: E731
        if f"{ffn}experts.adapters.w_up.A" in trained:
            fused(f"{dst}{mlp}.experts.gate_up_proj", [get("experts.", "w_gate"), get("experts.", "w_up")])
            a, b = get("experts.", "w_down")
            fused(f"{dst}{mlp}.experts.down_proj", [(a, b * routed_scale(moe))])
        for part, where in (("shared.", f"{dst}{mlp}.shared_expert."), ("", f"{dst}{mlp}.")):  # Qwen2-MoE's Linear FFNs
            for ours, _, theirs in EXPERT_NAMES:
                if f"{ffn}{part}adapters.{ours}.A" in trained:
                    linear(f"{where}{theirs}", *get(part, ours))
        if f"{ffn}router.weight" in trained:
            out[f"{PEFT_PREFIX}{dst}{mlp}.gate.weight"] = trained[f"{ffn}router.weight"].contiguous()
            modules_to_save = [f"{mlp}.gate"]  # not Qwen2-MoE's mlp.shared_expert_gate
    if "lm_head.adapters.weight.A" in trained:
        linear("lm_head", trained["lm_head.adapters.weight.A"], trained["lm_head.adapters.weight.B"])
    return out, _adapter_config(lora, target_modules, target_parameters, rank_pattern, alpha_pattern, modules_to_save)


def _fused_pair(pairs: list[tuple[torch.Tensor, torch.Tensor]], experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A.weight, lora_B.weight) of a fused expert matrix (E, out, in) whose rows are
    those of each pair's matrix in turn: per expert, A' stacks the pairs' A^T and B' is block-diagonal
    in their B^T; A' rows go by expert (e * r' + j), B' columns with the expert fastest (j * E + e)."""
    rank = sum(a.shape[-1] for a, _ in pairs)
    a_out = torch.zeros(experts * rank, pairs[0][0].shape[-2])
    b_out = torch.zeros(sum(b.shape[-1] for _, b in pairs), rank * experts)
    for e in range(experts):
        r0 = o0 = 0
        for a, b in pairs:  # a (E|1, in, r), b (E|1, r, out): a shared pair serves every expert
            ae, be = a[e if a.shape[0] > 1 else 0], b[e if b.shape[0] > 1 else 0]
            r, o = ae.shape[1], be.shape[1]
            a_out[e * rank + r0 : e * rank + r0 + r] = ae.t()
            b_out[o0 : o0 + o, [(r0 + j) * experts + e for j in range(r)]] = be.t()
            r0, o0 = r0 + r, o0 + o
    return a_out, b_out


def _adapter_config(lora: LoRAConfig, target_modules: list, target_parameters: list, rank_pattern: dict,
                    alpha_pattern: dict, modules_to_save: list) -> dict[str, Any]:
    """adapter_config.json: what PeftModel.from_pretrained needs to rebuild the adapters for inference."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,  # inference: PEFT refuses dropout on adapted parameters
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "target_modules": target_modules, "target_parameters": target_parameters or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": modules_to_save or None,
        "base_model_name_or_path": None,
    }


# ------------------------------------------------------------------------- Mixtral -> moectl


def mixtral_mismatch(hc: dict[str, Any], model: ModelConfig, moe: MoEConfig) -> Optional[str]:
    """The first way a Mixtral config.json (as a dict) differs from the model the `model` and `moe`
    sections build, or why they do not describe a Mixtral model at all; None when they are the same model."""
    rope = (hc.get("rope_parameters") or {}).get("rope_theta", hc.get("rope_theta", 10000.0))
    pairs = [
        ("hidden_size", hc.get("hidden_size"), "model.d_model", model.d_model),
        ("num_hidden_layers", hc.get("num_hidden_layers"), "model.n_layers", model.n_layers),
        ("num_attention_heads", hc.get("num_attention_heads"), "model.n_heads", model.n_heads),
        ("num_key_value_heads", hc.get("num_key_value_heads"), "model.n_heads (moectl has no grouped-query attention)",
         model.n_heads),
        ("intermediate_size", hc.get("intermediate_size"), "moe.expert_hidden", moe.expert_hidden),
        ("num_local_experts", hc.get("num_local_experts"), "moe.num_experts", moe.num_experts),
        ("num_experts_per_tok", hc.get("num_experts_per_tok"), "moe.top_k", moe.top_k),
        ("tie_word_embeddings", hc.get("tie_word_embeddings", False), "model.tie_embeddings", model.tie_embeddings),
        ("rms_norm_eps", hc.get("rms_norm_eps"), "model.norm_eps", model.norm_eps),
        ("rope theta", rope, "model.rope_theta", model.rope_theta),
        ("routed output scale", 1.0, "moe.routed_scaling", routed_scale(moe)),
    ]
    for theirs_name, theirs, ours_name, ours in pairs:
        if theirs != ours:
            return f"its {theirs_name} is {theirs} but {ours_name} is {ours}; set the model and moe sections to match it"
    reason = refusal(model, moe) or (
        None if architecture(moe) == "mixtral" else
        "it has shared experts, dense blocks or unrenormalised top-k weights, which Mixtral has not")
    if reason:
        return f"it is a Mixtral model, but this config is not: {reason}"
    if hc.get("head_dim") not in (None, model.d_model // model.n_heads):
        return f"its head_dim {hc['head_dim']} != model.d_model / model.n_heads"
    return None


def from_mixtral(hf_sd: Tensors, model: ModelConfig, moe: MoEConfig) -> Tensors:
    """Mixtral's per-expert tensors under moectl's names, stacked per layer (fp32)."""
    get = lambda k: hf_sd[k].float()  # noqa: E731
    out = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    out["lm_head.weight"] = get("lm_head.weight") if "lm_head.weight" in hf_sd else out["embed.weight"]
    for i in range(model.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = get(src + "post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}attn.{proj}.weight"] = get(f"{src}self_attn.{proj}.weight")
        sparse = src + "block_sparse_moe."
        out[dst + "ffn.inner.router.weight"] = get(sparse + "gate.weight")
        for ours, theirs, _ in EXPERT_NAMES:
            experts = [get(f"{sparse}experts.{e}.{theirs}.weight").t() for e in range(moe.num_experts)]
            out[f"{dst}ffn.inner.experts.{ours}"] = torch.stack(experts)  # (E, in, out)
    return out
