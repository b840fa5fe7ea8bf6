"""The `model` section (ModelConfig): the backbone's shape, its activations and output head, and
the rules that involve only these keys."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .section import Section

# The activations a user picks from, defined once: validation, `moectl config` and the builders in moe/ use it.
ACTIVATIONS = ("swiglu", "gelu", "relu")


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

    # Rules on these keys alone. Config's validator calls them, each at its place in the order of
    # all the checks (see root.py), so a config with several errors keeps reporting the same one.

    def check_depth(self) -> None:
        if self.backbone == "lstm" and self.n_layers < 2:
            raise ValueError(
                f"model.n_layers={self.n_layers} must be >= 2 for an LSTM model (FFN slots sit between layers)"
            )

    def check_attention(self) -> None:
        if self.arch.startswith("transformer"):
            if self.d_model % self.n_heads:
                raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
            if (self.d_model // self.n_heads) % 2:
                raise ValueError(
                    f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even for rotary embeddings"
                )

    def check_output_head(self) -> None:
        if self.head == "mixture" and self.tie_embeddings:
            raise ValueError(
                "model.head=mixture gives each of its experts an output matrix of its own, which cannot all be the "
                "input embedding; set model.tie_embeddings=false"
            )
