"""The typed, validated config tree.

One YAML file becomes a `Config`. Precedence is code defaults < YAML < `--set key=value`.
Every field has its default and its description here, in one place; `moectl config` prints
them and README's config reference is generated from them. The names a user picks from
(ROUTERS, ACTIVATIONS) are defined here too, and the builders in moe/ use these lists.

Errors name the file (or the `--set` flag), the dotted key path, the bad value and what was
expected, e.g. `configs/x.yaml: moe.top_k=9 must be <= moe.num_experts=8`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from moectl.errors import ConfigError
from moectl.fileio import atomic_write_text
from moectl.perf_model import PRESETS as HARDWARE_PRESETS


class Section(BaseModel):
    # coerce_numbers_to_str: `run.name: 2024` is a name, not a type error.
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        validate_assignment=True,
        coerce_numbers_to_str=True,
        allow_inf_nan=False,
    )


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes for configs: `1e-3` is a number (YAML 1.1 floats need a dot), and a
    key given twice in one mapping is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """YAML as moectl's config files read it (see _Loader)."""
    return yaml.load(text, Loader=_Loader)


# The names a user picks from, defined once: validation, `moectl config` and the builders use these.
ROUTERS = ("topk", "noisy_topk", "switch", "gshard_top2", "expert_choice", "soft", "hierarchical", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu", "relu")
# Each router's losses as its paper defines them: what a null moe.*_loss_coef becomes (per MoE
# layer; unlisted losses are 0). The router z-loss is ST-MoE's (Zoph et al. 2022), whose top-2
# softmax router is `topk`; the other routers' papers have none. README's router table says why.
PAPER_LOSSES = {
    "topk": {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3},  # ST-MoE's top-k recipe: Switch loss and z-loss
    "noisy_topk": {"importance_loss_coef": 0.1, "load_loss_coef": 0.1},  # Shazeer et al. 2017
    "switch": {"aux_loss_coef": 0.01},  # Fedus et al. 2021
    "gshard_top2": {"aux_loss_coef": 0.01},  # Lepikhin et al. 2020, Algorithm 1 (top-1 counts)
    "expert_choice": {},  # balanced by construction
    "soft": {},  # every expert runs on every token
    "hierarchical": {"importance_loss_coef": 0.1, "load_loss_coef": 0.1},  # Importance_H, Load_H
    "sigmoid": {"seq_aux_loss_coef": 1e-4},  # DeepSeek-V3: the bias balances; a tiny sequence-wise loss
}
LOSS_KEYS = ("aux_loss_coef", "importance_loss_coef", "load_loss_coef", "seq_aux_loss_coef", "z_loss_coef")
# Who keeps a slot when an expert is full, by router, when moe.drop_policy is null: GShard's
# Algorithm 1 fills every token's first choice before any second choice; the others serve
# earlier positions first (causal).
PAPER_DROP_POLICY = {"gshard_top2": "rank"}
# The experts per token a router is defined with (switch, gshard_top2), or its paper's
# (hierarchical: k = 2 at each level, Shazeer et al. 2017, App. C.1): what a config that switches
# to that router gets unless it sets moe.top_k itself (see router_needs).
ROUTER_TOP_K = {"switch": 1, "gshard_top2": 2, "hierarchical": 2}


class RunConfig(Section):
    """Where the run lives."""

    name: Optional[str] = Field(
        None, description="Run name; outputs go to `<run.dir>/<run.name>`. Defaults to the config file's stem."
    )
    dir: str = Field("runs", description="Parent directory of all run directories.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            raise ValueError("must be a plain directory name (no '/', not '.' or '..')")
        return name


class ModelConfig(Section):
    """The backbone."""

    arch: Literal["transformer_moe", "lstm_moe", "transformer_dense", "lstm_dense"] = Field(
        "transformer_moe",
        description="Backbone. `*_dense` is the same shape with a dense FFN in every MoE slot: the baseline.",
    )
    d_model: int = Field(256, gt=0, description="Model width D (embedding, attention, LSTM units, MoE input/output).")
    n_layers: int = Field(4, gt=0, description="Transformer blocks, or stacked LSTM layers.")
    n_heads: int = Field(4, gt=0, description="Attention heads (transformer only); d_model must divide evenly.")
    ffn_hidden: int = Field(1024, gt=0, description="Hidden size of dense FFNs (non-MoE slots and dense baselines).")
    activation: Optional[Literal[ACTIVATIONS]] = Field(
        None, description="FFN and expert activation. Null picks the paper's: swiglu (transformer), relu (LSTM)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on residual branches and embeddings.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output projection.")
    rope_theta: float = Field(10000.0, gt=0, description="Rotary embedding base (transformer only).")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon (transformer only).")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of linear and embedding weights.")
    lstm_residual: bool = Field(
        True,
        description="LSTM only: residual connections around each LSTM and FFN layer. Without them a token that "
        "capacity drops passes sigmoid(0) = 0.5 in every unit (0 with lstm_sigmoid: false) to the next LSTM.",
    )
    lstm_sigmoid: bool = Field(
        True,
        description="LSTM only: each FFN slot's output (MoE, or dense in lstm_dense) goes through a sigmoid before "
        "dropout and the residual, as in Shazeer et al. 2017, App. C.1; false: the raw output.",
    )
    head: Literal["linear", "mixture"] = Field(
        "linear",
        description="Output head. `mixture`: Jacobs & Jordan's mixture of experts, p(y | h) = sum_i g_i(h) "
        "softmax(W_i h)_y with gate g = softmax(W_g h) over head_experts experts, each with an output matrix W_i of its "
        "own (not Yang et al.'s mixture of softmaxes, which shares one); its gate is routed and reported like an MoE layer's.",
    )
    head_experts: int = Field(4, ge=2, description="mixture head: E_h, the softmax experts it mixes.")

    @property
    def is_moe(self) -> bool:
        return self.arch.endswith("_moe")

    @property
    def backbone(self) -> str:
        return self.arch.split("_")[0]

    @property
    def num_ffn_slots(self) -> int:
        """One FFN per transformer block; one between each pair of LSTM layers."""
        return self.n_layers if self.backbone == "transformer" else self.n_layers - 1


class MoEConfig(Section):
    """The MoE layers. Notation: E experts, K experts per token, H expert hidden size, N tokens per batch."""

    num_experts: int = Field(8, gt=0, description="E, experts per MoE layer.")
    top_k: int = Field(
        2,
        gt=0,
        description="K, experts per token (switch: 1, gshard_top2: 2; hierarchical: per chosen group; "
        "expert_choice: the average; soft: ignored, every expert runs). Capacity counts all of a token's assignments.",
    )
    every: int = Field(
        1, gt=0, description="Make every `every`-th FFN slot an MoE layer (1: all of them); the others are dense."
    )
    expert_hidden: Optional[int] = Field(None, gt=0, description="H, each expert's hidden size. Null: model.ffn_hidden.")
    router: Literal[ROUTERS] = Field("topk", description=f"Routing method, one of {', '.join(ROUTERS)}; see README's router table.")
    renormalize: Optional[bool] = Field(
        None,
        description="topk, sigmoid: renormalise the K chosen weights to sum to 1 (as Mixtral), or keep them raw. Null: "
        "renormalise when K > 1; with K = 1 keep the raw weight (as Switch), since a renormalised single weight is "
        "always 1 and the router would get no gradient from the language-model loss (true with K = 1 is refused).",
    )
    capacity_factor: Optional[float] = Field(
        None,
        gt=0,
        description="Training capacity per expert = max(min_capacity, ceil(factor * N * K / E)); overflow "
        "assignments skip the layer. Null: dropless. expert_choice: C = ceil(factor * N * K / E), null meaning 1.",
    )
    eval_capacity_factor: Union[Annotated[float, Field(gt=0)], Literal["dropless"], None] = Field(
        None, description="Capacity factor in eval mode: a number, `dropless`, or null for the training one."
    )
    min_capacity: int = Field(0, ge=0, description="Lower bound on the capacity of each expert.")
    drop_policy: Optional[Literal["position", "rank", "probability"]] = Field(
        None,
        description="Who keeps a slot when an expert is full. `position`: earlier positions first, then earlier "
        "sequences, then a token's first choice before its second (causal). `rank`: every token's first choice, in "
        "position order, before any token's second choice (GShard's Algorithm 1; a later token's first choice can "
        "displace an earlier token's second: sees later tokens). `probability`: Riquelme et al.'s batch-prioritised "
        "routing, rank by rank, each rank by the largest routing weight the token was given (sees later tokens). "
        "Null: the router's paper: rank for gshard_top2, position for the others.",
    )
    shared_experts: int = Field(0, ge=0, description="Always-on shared experts added to the routed output (DeepSeekMoE).")
    shared_expert_hidden: Optional[int] = Field(
        None, gt=0, description="Hidden size of each shared expert. Null: the routed experts' H."
    )
    shared_expert_gate: bool = Field(False, description="Scale the shared output by sigmoid(x w) (Qwen-MoE).")
    expert_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the experts' hidden layer in training.")
    router_init_std: Optional[float] = Field(
        None, ge=0, description="Std of the router's normal init (smaller is steadier). Null: model.init_std."
    )
    jitter_eps: float = Field(0.01, ge=0, lt=1, description="switch: router input times U(1 - eps, 1 + eps) in training.")
    num_groups: int = Field(4, gt=0, description="hierarchical: groups G; each holds E / G experts.")
    group_top_k: int = Field(
        2, gt=0, description="hierarchical: groups each token is routed to (the paper's k = 2 at each level, App. C.1). "
        "At least 2: the primary gate's softmax over one kept group is always 1, so it would get no gradient from the "
        "language-model loss."
    )
    balance_primary: bool = Field(
        False,
        description="hierarchical: also apply the importance and load losses to the primary gate over groups (not in "
        "the paper, which balances Importance_H and Load_H of the leaf experts only).",
    )
    bias_update_rate: float = Field(
        1e-3, ge=0, description="sigmoid: the expert bias moves by rate * sign(mean load - load) after each step."
    )
    routed_scaling: Union[Annotated[float, Field(gt=0)], Literal["top_k"]] = Field(
        1.0,
        description="Every router: the routed experts' summed output times this. 1: as each paper defines its router "
        "(DeepSeek-V3's released model uses 2.5 with its sigmoid router). `top_k`: K, the experts a token's weights "
        "spread over; renormalised weights make the routed output an average of K experts, about 1/K of a dense FFN "
        "of hidden K*H at init, and K restores that scale (what the quickstarts use; see docs/quality.md).",
    )
    n_group: int = Field(
        1, gt=0, description="sigmoid: DeepSeek-V3's group-limited routing splits the E experts into n_group groups "
        "(V3: 8); 1 turns it off."
    )
    topk_group: int = Field(
        1, gt=0, description="sigmoid: only the topk_group groups with the largest sum of their two best s_i + b_i "
        "are eligible for a token's top-K (V3: 4)."
    )
    aux_loss_coef: Optional[float] = Field(
        None,
        ge=0,
        description="Load-balancing loss alpha per MoE layer: Switch's E * sum_i f_i P_i (gshard_top2: GShard's, f_i "
        "from first choices only). Null: the router's paper default (0.01 for topk, switch, gshard_top2; else 0).",
    )
    aux_loss_scope: Literal["local", "global"] = Field(
        "local",
        description="Token fractions f_i of the Switch loss: `local`, from each process's micro-batch (Switch); "
        "`global`, summed over all data-parallel processes first (Megatron-core's global aux loss).",
    )
    importance_loss_coef: Optional[float] = Field(
        None, ge=0, description="Shazeer et al.'s importance loss CV(sum of gate values)^2, per MoE layer. Null: 0.1 "
        "for noisy_topk and hierarchical (the paper's), else 0."
    )
    load_loss_coef: Optional[float] = Field(
        None, ge=0, description="Shazeer et al.'s load loss CV(smooth load)^2, per MoE layer; noisy_topk, hierarchical. "
        "Null: 0.1 for those (the paper's), else 0."
    )
    seq_aux_loss_coef: Optional[float] = Field(
        None, ge=0, description="sigmoid: DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i, per sequence "
        "and MoE layer, f_i counting each token's top-K of the raw affinities s (V3 eq. 17-18), not the biased, "
        "group-limited choice the router makes. Null: 1e-4 for sigmoid (V3's), else 0."
    )
    z_loss_coef: Optional[float] = Field(
        None, ge=0, description="ST-MoE's router z-loss coefficient, per MoE layer, any router. Null: 0.001 for topk "
        "(ST-MoE's top-k router), else 0 (the other routers' papers have no z-loss)."
    )

    @property
    def routed_scale(self) -> Optional[float]:
        """routed_scaling as a number; None for `top_k`, which the built router resolves to its K."""
        return None if self.routed_scaling == "top_k" else float(self.routed_scaling)

    def slots(self, model: ModelConfig) -> list[int]:
        """The FFN slots of `model` that hold MoE layers: slot i when (i + 1) % every == 0 (every=2: dense,
        MoE, ...); none for a dense arch."""
        return [i for i in range(model.num_ffn_slots) if (i + 1) % self.every == 0] if model.is_moe else []

    @property
    def loss_coefs(self) -> dict[str, float]:
        """Coefficient of each routing loss, by the names moe/losses.py uses (resolved: never null)."""
        return {
            "load_balance": self.aux_loss_coef or 0.0,
            "importance": self.importance_loss_coef or 0.0,
            "load": self.load_loss_coef or 0.0,
            "seq_balance": self.seq_aux_loss_coef or 0.0,
            "z": self.z_loss_coef or 0.0,
        }


class DataConfig(Section):
    """Training text: a Hub dataset, local files, a `save_to_disk` directory, or the built-in corpus."""

    source: Literal["stdlib", "hub", "files", "disk"] = Field(
        "stdlib",
        description="`stdlib`: this Python's own standard-library sources (offline). `hub`: datasets.load_dataset(name). "
        "`files`: local files. `disk`: a save_to_disk directory.",
    )
    name: Optional[str] = Field(None, description="hub: dataset name, e.g. `wikitext` or `user/dataset`.")
    config_name: Optional[str] = Field(None, description="hub: dataset config, e.g. `wikitext-103-raw-v1`.")
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = Field(
        None, description="files: a path or glob, a list of them, or a mapping split -> paths."
    )
    format: Optional[Literal["text", "json", "csv", "parquet"]] = Field(
        None, description="files: the datasets builder. Null: inferred from the file extension."
    )
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line",
        description="files with format text: one example per line, paragraph or whole file. A carved validation "
        "split holds out examples, so with `line` it shares files with training; prefer `document` for many files.",
    )
    path: Optional[str] = Field(None, description="disk: the directory written by `save_to_disk`.")
    text_column: str = Field("text", description="Column that holds the text.")
    train_split: str = Field("train", description="Split to train on.")
    validation_split: Optional[str] = Field(
        None,
        description="Split to validate on. Null: the dataset's `validation` split if it has one, "
        "else data.validation_fraction of the training documents, carved off with data.split_seed.",
    )
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Fraction of training documents held out when validation_split is null."
    )
    split_seed: int = Field(0, description="Seed of the held-out carve.")
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence (block).")
    task: Literal["lm", "sft"] = Field(
        "lm",
        description="`lm`: language modelling, every token of the text is a target. `sft`: instruction tuning on "
        "conversations (data.messages_field, data.prompt_field / data.response_field, or Alpaca's "
        "instruction / input / output); only response tokens are targets, in training and evaluation. With "
        "data.source=stdlib the examples are the standard library's function signatures and docstrings.",
    )
    prompt_field: str = Field("prompt", description="sft: the field that holds the prompt (the user turn).")
    response_field: str = Field("response", description="sft: the field that holds the response (the assistant turn).")
    messages_field: str = Field(
        "messages", description="sft: the field that holds a list of {role, content} turns (system, user, assistant)."
    )
    chat_template: Optional[str] = Field(
        None,
        description="sft: the Jinja chat template (Hugging Face conventions), as text or a file path; `builtin`: "
        "`<|role|>\\n{content}<|endoftext|>` per turn. Null: the tokenizer's own template when it has one "
        "(a Hub or Mixtral tokenizer), else the built-in.",
    )
    packing: bool = Field(
        False,
        description="sft: put several whole examples in each sequence, attention (and the LSTM's state) confined "
        "to each, instead of one padded example per sequence.",
    )
    num_proc: Optional[int] = Field(None, gt=0, description="Processes for tokenisation (datasets.map). Null: one.")
    cache_dir: Optional[str] = Field(
        None, description="Cache for tokenizers and tokenised data. Null: $MOECTL_CACHE or ~/.cache/moectl."
    )


class TokenizerConfig(Section):
    """Train a byte-level BPE on the training split, or load one."""

    path: Optional[str] = Field(None, description="Load this tokenizer.json instead of training one.")
    name: Optional[str] = Field(None, description="Load this Hub tokenizer (e.g. `gpt2`) instead of training one.")
    vocab_size: Union[Annotated[int, Field(ge=260)], Literal["auto"]] = Field(
        4096,
        description="Vocabulary size of a trained BPE, or `auto`: 16384 * (training MB)^(1/4), a multiple of 256 in "
        "[1024, 65536] (1 MB: 16k, 16 MB: 32k, 256 MB: 64k). Larger vocabularies pay off as the corpus grows; small "
        "models on small corpora spend much of their compute on the softmax (docs/quality.md).",
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_chars: Optional[int] = Field(
        None, gt=0, description="Train the BPE on at most this many characters of the training split. Null: all."
    )
    eot_token: str = Field("<|endoftext|>", description="End-of-text token placed between documents.")


class TrainConfig(Section):
    """The training loop."""

    max_steps: int = Field(1000, gt=0, description="Optimizer steps; the LR schedule spans them.")
    batch_size: int = Field(32, gt=0, description="Sequences per optimizer step, global: over gradient accumulation and all processes.")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="Sequences per forward pass in each process; the rest of the batch accumulates. Null: the process's whole share of batch_size."
    )
    seed: int = Field(1337, description="Seed for init, dropout and data order.")
    device: str = Field("auto", description="`auto` (cuda, then mps, then cpu), or a torch device such as `cuda:1`.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on GPUs that support it, else fp32. Routing is always fp32."
    )
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm to this. Null: no clipping.")
    lstm_stateful: bool = Field(
        False,
        description="LSTM only: truncated backpropagation through time. The training split is cut into batch_size "
        "contiguous streams; each step continues every stream from the (detached) state its previous block ended in, "
        "and evaluation carries state the same way over consecutive validation blocks. False: every block starts "
        "from a zero state, shuffled.",
    )
    eval_every: int = Field(200, gt=0, description="Evaluate on the validation split every this many steps (and at the end).")
    eval_batches: Optional[int] = Field(
        20, gt=0, description="Validation batches (of micro_batch_size) per evaluation. Null: the whole split."
    )
    init_from: Optional[str] = Field(
        None,
        description="Start from these weights instead of a random init: a moectl run, checkpoint or export "
        "bundle (same model: fine-tuning; a dense model of the same backbone into an MoE: sparse upcycling), or a "
        "Hugging Face Mixtral directory. The run uses its tokenizer.",
    )
    objective: Literal["likelihood", "em", "hard_em"] = Field(
        "likelihood",
        description="model.head=mixture: `likelihood` descends -log p(y); `em` is generalised EM (Jordan & Jacobs "
        "1994; per batch, responsibilities r_i = g_i p_i(y) / sum_j g_j p_j(y) held fixed, one step on -sum_i r_i "
        "(log g_i + log p_i(y))); `hard_em` uses the one-hot argmax of r.",
    )
    freeze: Literal["none", "router", "experts", "all_but_experts"] = Field(
        "none",
        description="Parameters left untrained: none, the routers, the routed experts, or everything but the routed "
        "experts (fine-tuning recipes; ST-MoE section 4 compares them).",
    )
    early_stopping: Optional[int] = Field(
        None,
        gt=0,
        description="Stop after this many evaluations in a row without a lower eval loss than the best so far (the "
        "overfitting guard for fine-tuning; with checkpoint.keep_best the best weights stay). Null: never.",
    )
    upcycle_noise: float = Field(
        0.0, ge=0, description="Sparse upcycling: std of the Gaussian noise added to each copied expert (relative to the weights' std)."
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="Multi-process runs: shard each MoE layer's experts over groups of this many processes, which "
        "exchange tokens by all-to-all (each holds moe.num_experts / N experts); dense parameters stay replicated "
        "under DDP. Must divide the number of processes and moe.num_experts. 1: every process holds every expert.",
    )
    shadow_experts: Union[Literal["off", "auto"], int] = Field(
        "off",
        description="Expert parallelism: FasterMoE's dynamic shadowing. Each step, from the group's routing counts, "
        "the hottest experts are copied to every process of the group, which computes them on its own tokens instead "
        "of sending them; their gradients go back to the owners. `auto`: as many as FasterMoE's performance model "
        "says pay off on train.hardware; K: the K most loaded; `off`: none. The result is the same either way.",
    )
    ep_overlap: bool = Field(
        False,
        description="Expert parallelism: FasterMoE's smart scheduling. Exchange each peer's tokens by point-to-point "
        "messages while the experts compute the tokens already there, forward and backward, instead of one "
        "all-to-all before and after. The result is the same.",
    )
    hardware: str = Field(
        "auto",
        description="The machine the performance model assumes (train.shadow_experts=auto): a preset name "
        "(`gpu-node`, `gpu-2nodes`, `cpu`), or `auto`: `gpu-node` on CUDA, else `cpu`.",
    )
    dist_timeout: float = Field(
        600.0, gt=0, description="Multi-process runs: seconds a collective waits for the other processes before the job fails."
    )

    @field_validator("shadow_experts", mode="before")
    @classmethod
    def _off_is_not_false(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads a bare `off` as false
            if value:
                raise ValueError("must be off, auto or a number of experts, not true")
            return "off"
        return value

    @property
    def micro_batch(self) -> int:
        """Sequences per forward pass of a single-process run (train.batch_layout splits a batch over processes)."""
        return self.micro_batch_size or self.batch_size


class OptimConfig(Section):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (cosine schedule).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to the peak LR.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="After warmup: cosine decay, or constant.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        ok = isinstance(value, (list, tuple)) and len(value) == 2
        if not ok or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value):
            raise ValueError("must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        return value
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    router_lr_mult: float = Field(
        1.0, ge=0, description="The routers' learning rate as a multiple of the schedule's (0: they stay, like train.freeze=router)."
    )
    expert_lr_mult: float = Field(1.0, ge=0, description="The routed experts' learning rate as a multiple of the schedule's.")


class LogConfig(Section):
    """Console and TensorBoard logging."""

    every: int = Field(10, gt=0, description="Log scalars and routing statistics every this many steps (the window).")
    tensorboard: bool = Field(True, description="Write TensorBoard events to the run directory.")
    histograms: bool = Field(True, description="Log per-layer expert-assignment histograms.")
    collapse_threshold: float = Field(
        3.0, gt=1, description="Warn when a layer's max/mean expert load over a whole window exceeds this."
    )


class CheckpointConfig(Section):
    """Checkpoints in `<run>/checkpoints/step_NNNNNN/`."""

    every: int = Field(500, gt=0, description="Save every this many steps (and at the end, and on Ctrl-C).")
    keep_last: int = Field(3, gt=0, description="Keep only the newest this many checkpoints.")
    keep_best: bool = Field(
        False,
        description="Also save at each evaluation that lowers the best eval loss so far, keep that checkpoint whatever "
        "keep_last says, and point `checkpoints/best` at it (give it to eval, generate, export).",
    )


class Config(Section):
    """The whole config tree."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name and directory.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The backbone.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="The MoE layers.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation text.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    _trained: bool = PrivateAttr(False)  # read from a run's own config.yaml (see from_dict)
    # what load() set because an override changed moe.router (dotted key -> value; null: the paper's)
    _router_filled: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_field_checks(self, info: ValidationInfo) -> "Config":
        m, moe, d, tok, tr = self.model, self.moe, self.data, self.tokenizer, self.train
        trained = bool(info.context and info.context.get("trained"))  # a run's own saved config
        if m.backbone == "lstm" and m.n_layers < 2:
            raise ValueError(f"model.n_layers={m.n_layers} must be >= 2 for an LSTM model (FFN slots sit between layers)")
        if m.is_moe:
            self._check_router(trained)
        if m.is_moe and moe.every > m.num_ffn_slots:
            raise ValueError(
                f"moe.every={moe.every} leaves {m.arch} with no MoE layer: it has {m.num_ffn_slots} FFN slots "
                f"(model.n_layers={m.n_layers}); lower moe.every, or use a *_dense arch for a dense model"
            )
        if d.validation_split is not None and d.validation_split == d.train_split:
            raise ValueError(
                f"data.validation_split={d.validation_split!r} is the training split; validate on held-out data"
            )
        if tr.expert_parallel > 1:
            if not m.is_moe:
                raise ValueError(f"train.expert_parallel={tr.expert_parallel} shards experts, but model.arch={m.arch} has none")
            if moe.num_experts % tr.expert_parallel:
                raise ValueError(
                    f"train.expert_parallel={tr.expert_parallel} must divide moe.num_experts={moe.num_experts} "
                    "(each process holds an equal share of every layer's experts)"
                )
        if tr.shadow_experts != "off":
            if tr.expert_parallel == 1:
                raise ValueError(
                    f"train.shadow_experts={tr.shadow_experts} shadows experts of expert-parallel groups; "
                    "set train.expert_parallel > 1 or train.shadow_experts=off"
                )
            if isinstance(tr.shadow_experts, int) and not 1 <= tr.shadow_experts <= moe.num_experts:
                raise ValueError(f"train.shadow_experts={tr.shadow_experts} must be in [1, moe.num_experts={moe.num_experts}]")
        if tr.ep_overlap and tr.expert_parallel == 1:
            raise ValueError("train.ep_overlap=true overlaps the expert-parallel exchange; set train.expert_parallel > 1")
        if tr.hardware != "auto" and tr.hardware not in HARDWARE_PRESETS:
            raise ValueError(f"train.hardware={tr.hardware!r} must be auto or one of {', '.join(HARDWARE_PRESETS)}")
        if tr.lstm_stateful and m.backbone != "lstm":
            raise ValueError(f"train.lstm_stateful=true needs an LSTM (model.arch={m.arch} has no recurrent state)")
        if d.task == "sft":
            if tr.lstm_stateful:
                raise ValueError("train.lstm_stateful=true carries state from one block to the next, but data.task=sft "
                                 "examples are separate; set train.lstm_stateful=false")
            if tr.objective != "likelihood":
                raise ValueError(f"train.objective={tr.objective} (EM on a mixture head) scores every token; "
                                 "data.task=sft scores responses only: use train.objective=likelihood")
        elif d.packing or d.chat_template is not None:
            key = "packing" if d.packing else "chat_template"
            raise ValueError(f"data.{key} is for instruction tuning; set data.task=sft, or drop data.{key}")
        if m.arch.startswith("transformer"):
            if m.d_model % m.n_heads:
                raise ValueError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
            if (m.d_model // m.n_heads) % 2:
                raise ValueError(
                    f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even for rotary embeddings"
                )
        if tr.micro_batch_size is not None and tr.batch_size % tr.micro_batch_size:
            raise ValueError(
                f"train.batch_size={tr.batch_size} must be a multiple of train.micro_batch_size={tr.micro_batch_size}"
            )
        if tok.path is not None and tok.name is not None:
            raise ValueError("tokenizer.path and tokenizer.name are both set; set at most one")
        needs = {"hub": "name", "files": "data_files", "disk": "path"}
        if d.source in needs and getattr(d, needs[d.source]) in (None, [], {}, ""):
            raise ValueError(f"data.{needs[d.source]} is required when data.source={d.source}")
        for key, source in (("name", "hub"), ("config_name", "hub"), ("data_files", "files"), ("path", "disk")):
            if getattr(d, key) is not None and d.source != source:
                raise ValueError(f"data.{key} is only used with data.source={source}, but data.source={d.source}")
        if tr.device not in ("auto", "cpu", "mps") and not tr.device.startswith("cuda"):
            raise ValueError(f"train.device={tr.device!r} must be auto, cpu, mps, cuda or cuda:N")
        if m.head == "mixture" and m.tie_embeddings:
            raise ValueError(
                "model.head=mixture gives each of its experts an output matrix of its own, which cannot all be the "
                "input embedding; set model.tie_embeddings=false"
            )
        if tr.objective != "likelihood" and m.head != "mixture":
            raise ValueError(f"train.objective={tr.objective} trains a mixture head by EM; set model.head=mixture")
        return self

    def _check_router(self, trained: bool) -> None:
        """`trained`: the model already exists, so what only matters for training is not refused."""
        moe, k = self.moe, self.moe.top_k
        if k == 1 and moe.renormalize and moe.router in ("topk", "sigmoid") and not trained:
            raise ValueError(
                "moe.top_k=1 with moe.renormalize=true: the one weight is always 1, so the router gets no gradient "
                "from the language-model loss; set moe.renormalize=false (Switch keeps the raw probability)"
            )
        if k == 1 and moe.router == "noisy_topk" and not trained:
            raise ValueError(
                "moe.top_k=1 with moe.router=noisy_topk: a softmax over one kept logit is always 1, so the gate gets no "
                "gradient from the language-model loss; use moe.top_k >= 2 (Shazeer et al. used 2 to 4) or moe.router=switch"
            )
        if moe.router == "switch" and moe.top_k != 1:
            raise ValueError(f"moe.top_k={moe.top_k} must be 1 for moe.router=switch (Switch routes each token to one expert)")
        if moe.router == "gshard_top2" and moe.top_k != 2:
            raise ValueError(f"moe.top_k={moe.top_k} must be 2 for moe.router=gshard_top2")
        if moe.router == "hierarchical":
            g = moe.num_groups
            if moe.num_experts % g:
                raise ValueError(f"moe.num_experts={moe.num_experts} must be a multiple of moe.num_groups={g}")
            if moe.top_k > moe.num_experts // g:
                raise ValueError(
                    f"moe.top_k={moe.top_k} must be <= experts per group = moe.num_experts / moe.num_groups = "
                    f"{moe.num_experts // g}"
                )
            if moe.group_top_k > g:
                raise ValueError(f"moe.group_top_k={moe.group_top_k} must be <= moe.num_groups={g}")
            for key, level, room, short in (("group_top_k", "the primary gate", g, "moe.num_groups >= 2"),
                                            ("top_k", "each group's gate", moe.num_experts // g, "2 experts per group")):
                if getattr(moe, key) == 1 and not trained:
                    needs = f", which needs {short}" if room < 2 else ""
                    raise ValueError(
                        f"moe.{key}=1 with moe.router=hierarchical: {level} renormalises its one kept weight to 1, so it "
                        f"gets no gradient from the language-model loss; set moe.{key}=2 (Shazeer et al. use k = 2 at "
                        f"each level, App. C.1){needs}"
                    )
        elif moe.router != "soft" and moe.top_k > moe.num_experts:
            raise ValueError(f"moe.top_k={moe.top_k} must be <= moe.num_experts={moe.num_experts}")
        if (moe.seq_aux_loss_coef or 0) > 0 and moe.router != "sigmoid":
            raise ValueError(f"moe.seq_aux_loss_coef={moe.seq_aux_loss_coef} is DeepSeek-V3's loss: it needs moe.router=sigmoid")
        if (moe.n_group, moe.topk_group) != (1, 1):
            self._check_groups()
        if (moe.load_loss_coef or 0) > 0 and moe.router not in ("noisy_topk", "hierarchical"):
            raise ValueError(
                f"moe.load_loss_coef={moe.load_loss_coef} needs moe.router=noisy_topk or hierarchical: the smooth "
                "load estimator comes from their gate noise"
            )

    def _check_groups(self) -> None:
        moe = self.moe
        g, per_group = moe.n_group, moe.num_experts // moe.n_group
        if moe.router != "sigmoid":
            raise ValueError("moe.n_group and moe.topk_group are DeepSeek-V3's group-limited routing: set moe.router=sigmoid")
        if moe.num_experts % g or (g > 1 and per_group < 2):
            raise ValueError(f"moe.num_experts={moe.num_experts} must split into moe.n_group={g} groups of at least 2 experts")
        if moe.topk_group > g:
            raise ValueError(f"moe.topk_group={moe.topk_group} must be <= moe.n_group={g}")
        if moe.top_k > moe.topk_group * per_group:
            raise ValueError(
                f"moe.top_k={moe.top_k} must be <= the experts of moe.topk_group={moe.topk_group} groups "
                f"({moe.topk_group * per_group})"
            )

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Config":
        # Resolved here, so the config written to the run directory is explicit.
        m, moe = self.model, self.moe
        if m.activation is None:
            m.activation = "swiglu" if m.arch.startswith("transformer") else "relu"
        if moe.renormalize is None:
            moe.renormalize = moe.top_k > 1
        if moe.expert_hidden is None:
            moe.expert_hidden = m.ffn_hidden
        if moe.drop_policy is None:
            moe.drop_policy = PAPER_DROP_POLICY.get(moe.router, "position")
        paper = PAPER_LOSSES[moe.router] if m.is_moe else {}
        for key in LOSS_KEYS:
            if getattr(moe, key) is None:
                setattr(moe, key, paper.get(key, 0.0))
        return self

    @property
    def router_filled(self) -> dict[str, Any]:
        """What load() set because an override changed moe.router (dotted key -> value set; null:
        the new router's paper value); empty otherwise."""
        return self._router_filled



SECTIONS: dict[str, type[Section]] = {
    name: field.annotation for name, field in Config.model_fields.items()  # type: ignore[misc]
}


# ----------------------------------------------------------------------------------------- errors


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section_fields(path: tuple[str, ...]) -> list[str]:
    """Field names at a dotted path (root or section), for did-you-mean hints."""
    if not path:
        return list(Config.model_fields)
    section = SECTIONS.get(path[0])
    return list(section.model_fields) if section and len(path) == 1 else []


def _field_key(loc: tuple) -> str:
    """The dotted config key of an error: section.field, without list indices or union-member tags."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ".".join(parts[:2] if parts and parts[0] in SECTIONS else parts[:1])


def _describe_error(err: dict[str, Any], key: str) -> str:
    loc = tuple(key.split(".")) if key else ()
    kind = err["type"]
    if kind == "extra_forbidden":
        where = f"section '{'.'.join(loc[:-1])}'" if len(loc) > 1 else "the top level"
        return f"unknown key '{key}' in {where}{_did_you_mean(loc[-1], _section_fields(loc[:-1]))}"
    if kind == "value_error" and not loc:
        return str(err["ctx"]["error"])
    msg = err["msg"]
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
    msg = msg.replace("Input should be", "must be").replace("Value error, ", "").replace("Field required", "missing")
    if kind == "literal_error":
        expected = err["ctx"]["expected"]
        msg = f"must be one of {expected}"
        if isinstance(err.get("input"), str):
            options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",")]
            msg += _did_you_mean(err["input"], [o for o in options if o])
    if kind in ("model_type", "model_attributes_type", "dict_type") and len(loc) == 1:
        msg = f"must be a mapping of {loc[0]} settings"
    return f"{key}={err.get('input')!r}: {msg}" if key else msg


def _union_kind(tag: str, err: dict[str, Any]) -> str:
    """What one member of a Union field accepts, in words, from its tag and its error."""
    ctx = err.get("ctx") or {}
    if err["type"] == "literal_error":
        return ctx.get("expected", tag)
    bounds = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
              "less_than_equal": ("<=", "le")}
    if err["type"] in bounds:
        sign, key = bounds[err["type"]]
        bound = ctx.get(key)
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"{'an integer' if 'int' in tag else 'a number'} {sign} {bound}"
    if tag.startswith("dict"):
        return "a mapping"
    if tag.startswith("list"):
        return "a list"
    tag = tag.removeprefix("constrained-")
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(tag, tag)


def _format_errors(exc: ValidationError, source: str, overrides: dict[str, Any]) -> str:
    # A value that fits no member of a Union field gives one pydantic error per member: merge them.
    groups: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        groups.setdefault(_field_key(err["loc"]), []).append(err)
    lines = []
    for key, errs in groups.items():
        tags = [str(e["loc"][2]) for e in errs if len(e["loc"]) > 2 and not isinstance(e["loc"][2], int)]
        if len(errs) > 1 and len(tags) == len(errs):
            kinds = [_union_kind(t, e) for t, e in zip(tags, errs)]
            text = f"{key}={errs[0].get('input')!r}: must be {', '.join(kinds[:-1])} or {kinds[-1]}"
        else:
            text = "\n".join(_describe_error(e, key) for e in errs)
        blame = key or next((k for k in overrides if k in text), "")  # cross-field: the override it names
        origin = f"--set {blame}" if blame in overrides else source
        lines += [f"{origin}: {line}" for line in text.splitlines()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ overrides


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value). Values are YAML scalars: 3, 1e-3, true, null, [1, 2]."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set moe.top_k=1")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the raw string and let validation judge it
    _check_key(key)
    return key, value


def _check_key(key: str) -> None:
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--set {key}: unknown section '{parts[0]}'{_did_you_mean(parts[0], list(SECTIONS))}")
    fields = SECTIONS[parts[0]].model_fields
    if len(parts) == 1:
        return
    if len(parts) > 2 or parts[1] not in fields:
        hint = _did_you_mean(parts[1], list(fields)) if len(parts) == 2 else ""
        raise ConfigError(f"--set {key}: unknown key '{key}'{hint}")


def _apply(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' must be a mapping of {part} settings, not {child!r}")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------------- load / dump


def from_dict(
    raw: dict[str, Any], source: str = "<config>", overrides: Optional[dict[str, Any]] = None, trained: bool = False
) -> Config:
    """Validate a raw mapping (YAML already parsed, overrides already applied). `trained`: the
    config a run saved, whose model exists: rules that only guard training (a top-1 router whose
    one weight is always 1) do not refuse it."""
    try:
        cfg = Config.model_validate(raw, context={"trained": trained})
        cfg._trained = trained
        return cfg
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, overrides or {})) from None


def router_needs(router: str, moe: dict[str, Any]) -> dict[str, Any]:
    """What a config that switches to `router` gets with it (dotted keys): its fixed or paper K
    (ROUTER_TOP_K; noisy top-k needs K >= 2), its paper's losses, weight normalisation and drop
    order (null resolves them per router, see _fill_defaults), and no option only another router
    takes. `moe`: the section as it stands before the switch (raw YAML), to keep a K that fits."""
    needs: dict[str, Any] = {}
    if router in ROUTER_TOP_K:
        needs["moe.top_k"] = ROUTER_TOP_K[router]
    elif router == "noisy_topk" and moe.get("top_k", MoEConfig.model_fields["top_k"].default) == 1:
        needs["moe.top_k"] = 2
    needs.update({f"moe.{key}": None for key in ("renormalize", "drop_policy", *LOSS_KEYS)})
    if router != "sigmoid":
        needs.update({"moe.n_group": 1, "moe.topk_group": 1})
    return needs


def _switch_router(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`--set moe.router=R` on a config written for another router: set what R needs
    (router_needs) unless an override sets it too. Returns what it set, only where that changes
    the config."""
    moe = raw.get("moe") if isinstance(raw.get("moe"), dict) else {}
    router = overrides.get("moe.router")
    before = moe.get("router", MoEConfig.model_fields["router"].default)
    if not isinstance(router, str) or router == before or router not in ROUTERS:
        return {}
    return {k: v for k, v in router_needs(router, moe).items() if k not in overrides}


def load(path: Union[str, Path, None], overrides: Optional[list[str]] = None, saved: bool = False) -> Config:
    """Read a YAML config, apply `--set` overrides, validate, and fill `run.name` from the file name.
    `saved`: the config.yaml moectl wrote into a run or bundle, read as the model it trained.
    An override that changes moe.router brings what that router needs (router_needs) unless the
    overrides set it too; the config's `router_filled` says what was set."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.__class__.__name__})") from None
        try:
            loaded = yaml_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(loaded).__name__}")
        raw = loaded
        if saved:
            _read_as_trained(raw, source)
    parsed = dict(parse_override(item) for item in overrides or [])
    filled = _switch_router(raw, parsed)
    before = copy.deepcopy(raw) if filled else None
    for key, value in {**filled, **parsed}.items():
        _apply(raw, key, value, f"--set {key}")
    cfg = from_dict(raw, source, parsed, trained=saved)
    if filled:  # report what the switch changed, resolved (a null loss is the new router's paper value)
        try:
            old = from_dict(before, source, trained=saved).moe
        except ConfigError:
            old = None
        cfg._router_filled = {k: v for k, v in filled.items() if old is None or
                              getattr(old, k.split(".", 1)[1]) != getattr(cfg.moe, k.split(".", 1)[1])}
    if cfg.run.name is None:
        cfg.run.name = Path(path).stem if path is not None else "run"
    return cfg


def _read_as_trained(raw: dict[str, Any], source: str) -> None:
    """A run's config.yaml from before model.lstm_sigmoid and per-layer router losses (it has no
    moe.seq_aux_loss_coef, added with them) describes a model without the sigmoid, without V3's
    sequence-wise loss, balancing both levels of a hierarchical router, whose router losses were
    averaged over its MoE layers: read it so, with each coefficient divided by those layers, which
    gives the same objective under the per-layer sum. (GShard's first-choice counting and the
    rank-by-rank batch priority are corrections and apply to it too.)"""
    model, moe = raw.get("model"), raw.get("moe")
    if not isinstance(model, dict) or not isinstance(moe, dict) or "seq_aux_loss_coef" in moe:
        return
    model.setdefault("lstm_sigmoid", False)
    moe.update(seq_aux_loss_coef=0.0, balance_primary=True)  # no V3 sequence loss; both hierarchical levels
    read = from_dict(raw, source, trained=True)
    layers = len(read.moe.slots(read.model))
    for key in ("aux_loss_coef", "importance_loss_coef", "load_loss_coef", "z_loss_coef"):
        if layers and isinstance(moe.get(key), (int, float)):
            moe[key] = moe[key] / layers


def with_values(cfg: Config, source: str, **values: Any) -> Config:
    """A copy of `cfg` with dotted keys set (`**{"run.name": "x"}`), validated; errors blame `source`."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _check_key(key)
        _apply(raw, key, value, source)
    return from_dict(raw, source, trained=cfg._trained)


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, dump(cfg))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def changed(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs."""
    a, b = to_dict(old), to_dict(new)
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}


# ------------------------------------------------------------------------------------ reference


def reference_yaml() -> str:
    """Every section and field with its default and description, as commented YAML."""
    out = ["# moectl config reference: every key, its default, and what it does."]
    for name, section in SECTIONS.items():
        out.append("")
        out.append(f"{name}:  # {Config.model_fields[name].description}")
        defaults = section().model_dump(mode="json")
        for key, field in section.model_fields.items():
            value = yaml.safe_dump(defaults[key], default_flow_style=True).strip()
            value = value.removesuffix("...").strip()
            out.append(f"  {key}: {value}  # {field.description}")
    return "\n".join(out) + "\n"


def reference_markdown() -> str:
    """README's config reference table, generated from the same fields."""
    out = []
    for name, section in SECTIONS.items():
        out.append(f"**`{name}`**: {Config.model_fields[name].description}\n")
        out.append("| key | default | description |")
        out.append("|---|---|---|")
        defaults = section().model_dump(mode="json")
        for key, field in section.model_fields.items():
            value = json.dumps(defaults[key])
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{name}.{key}` | `{value}` | {desc} |")
        out.append("")
    return "\n".join(out)

