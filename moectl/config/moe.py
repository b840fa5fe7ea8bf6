"""The `moe` section (MoEConfig), the routers a user picks from and what each router's paper sets
(PAPER_LOSSES, PAPER_DROP_POLICY, ROUTER_TOP_K, router_needs), and the routing rules, which
involve only these keys."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from .model import ModelConfig
from .section import Section

# The routers a user picks from, defined once: validation, `moectl config` and the builders in moe/ use it.
ROUTERS = ("topk", "noisy_topk", "switch", "gshard_top2", "expert_choice", "soft", "hierarchical", "sigmoid")
# Each router's losses as its paper defines them: what a null moe.*_loss_coef becomes (per MoE
# layer; unlisted losses are 0). The router z-loss is ST-MoE's (Zoph et al. 2022), whose top-2
# softmax router is `topk`; the other routers' papers have none. docs/routing.md says why.
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
    router: Literal[ROUTERS] = Field("topk", description=f"Routing method, one of {', '.join(ROUTERS)}; see docs/routing.md.")
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
        "of hidden K*H at init, and K restores that scale (what the quickstarts use; see docs/quality.md). expert_choice "
        "combines with each token's softmax probabilities, about 1/E each at init, over about K experts: a factor of E "
        "puts it at the scale of top-K with `top_k` (docs/claims.md, claim 6).",
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

    # Rules on these keys alone; Config's validator calls check_router for an MoE arch (see root.py).

    def check_router(self, trained: bool) -> None:
        """`trained`: the model already exists, so what only matters for training is not refused."""
        k = self.top_k
        if k == 1 and self.renormalize and self.router in ("topk", "sigmoid") and not trained:
            raise ValueError(
                "moe.top_k=1 with moe.renormalize=true: the one weight is always 1, so the router gets no gradient "
                "from the language-model loss; set moe.renormalize=false (Switch keeps the raw probability)"
            )
        if k == 1 and self.router == "noisy_topk" and not trained:
            raise ValueError(
                "moe.top_k=1 with moe.router=noisy_topk: a softmax over one kept logit is always 1, so the gate gets no "
                "gradient from the language-model loss; use moe.top_k >= 2 (Shazeer et al. used 2 to 4) or moe.router=switch"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(
                f"moe.top_k={self.top_k} must be 1 for moe.router=switch (Switch routes each token to one expert)"
            )
        if self.router == "gshard_top2" and self.top_k != 2:
            raise ValueError(f"moe.top_k={self.top_k} must be 2 for moe.router=gshard_top2")
        if self.router == "hierarchical":
            self._check_hierarchical(trained)
        elif self.router != "soft" and self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be <= moe.num_experts={self.num_experts}")
        if (self.seq_aux_loss_coef or 0) > 0 and self.router != "sigmoid":
            raise ValueError(
                f"moe.seq_aux_loss_coef={self.seq_aux_loss_coef} is DeepSeek-V3's loss: it needs moe.router=sigmoid"
            )
        if (self.n_group, self.topk_group) != (1, 1):
            self._check_groups()
        if (self.load_loss_coef or 0) > 0 and self.router not in ("noisy_topk", "hierarchical"):
            raise ValueError(
                f"moe.load_loss_coef={self.load_loss_coef} needs moe.router=noisy_topk or hierarchical: the smooth "
                "load estimator comes from their gate noise"
            )

    def _check_hierarchical(self, trained: bool) -> None:
        g = self.num_groups
        if self.num_experts % g:
            raise ValueError(f"moe.num_experts={self.num_experts} must be a multiple of moe.num_groups={g}")
        if self.top_k > self.num_experts // g:
            raise ValueError(
                f"moe.top_k={self.top_k} must be <= experts per group = moe.num_experts / moe.num_groups = "
                f"{self.num_experts // g}"
            )
        if self.group_top_k > g:
            raise ValueError(f"moe.group_top_k={self.group_top_k} must be <= moe.num_groups={g}")
        for key, level, room, short in (("group_top_k", "the primary gate", g, "moe.num_groups >= 2"),
                                        ("top_k", "each group's gate", self.num_experts // g, "2 experts per group")):
            if getattr(self, key) == 1 and not trained:
                needs = f", which needs {short}" if room < 2 else ""
                raise ValueError(
                    f"moe.{key}=1 with moe.router=hierarchical: {level} renormalises its one kept weight to 1, so it "
                    f"gets no gradient from the language-model loss; set moe.{key}=2 (Shazeer et al. use k = 2 at "
                    f"each level, App. C.1){needs}"
                )

    def _check_groups(self) -> None:
        g, per_group = self.n_group, self.num_experts // self.n_group
        if self.router != "sigmoid":
            raise ValueError("moe.n_group and moe.topk_group are DeepSeek-V3's group-limited routing: set moe.router=sigmoid")
        if self.num_experts % g or (g > 1 and per_group < 2):
            raise ValueError(
                f"moe.num_experts={self.num_experts} must split into moe.n_group={g} groups of at least 2 experts"
            )
        if self.topk_group > g:
            raise ValueError(f"moe.topk_group={self.topk_group} must be <= moe.n_group={g}")
        if self.top_k > self.topk_group * per_group:
            raise ValueError(
                f"moe.top_k={self.top_k} must be <= the experts of moe.topk_group={self.topk_group} groups "
                f"({self.topk_group * per_group})"
            )


def router_needs(router: str, moe: dict[str, Any]) -> dict[str, Any]:
    """What a config that switches to `router` gets with it (dotted keys): its fixed or paper K
    (ROUTER_TOP_K; noisy top-k needs K >= 2), its paper's losses, weight normalisation and drop
    order (null resolves them per router, see Config._fill_defaults), and no option only another router
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

