"""How a run trains: the `train` section (TrainConfig: the loop, its devices and processes) and the
`optim` section (OptimConfig: AdamW and the LR schedule), each with the rules that involve only its
own keys."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from moectl.common.perf_model import PRESETS as HARDWARE_PRESETS

from .lora import LoRAConfig
from .section import Section


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
    lora: LoRAConfig = Field(
        default_factory=LoRAConfig,
        description="Low-rank adapters on the frozen train.init_from model (set train.lora.rank to turn them on).",
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

    # Rules on these keys alone. Config's validator calls them, each at its place in the order of
    # all the checks (see root.py), so a config with several errors keeps reporting the same one.

    def check_needs_expert_parallel(self) -> None:
        """Options that only act on expert-parallel groups."""
        if self.shadow_experts != "off" and self.expert_parallel == 1:
            raise ValueError(
                f"train.shadow_experts={self.shadow_experts} shadows experts of expert-parallel groups; "
                "set train.expert_parallel > 1 or train.shadow_experts=off"
            )
        if self.ep_overlap and self.expert_parallel == 1:
            raise ValueError("train.ep_overlap=true overlaps the expert-parallel exchange; set train.expert_parallel > 1")

    def check_hardware(self) -> None:
        if self.hardware != "auto" and self.hardware not in HARDWARE_PRESETS:
            raise ValueError(f"train.hardware={self.hardware!r} must be auto or one of {', '.join(HARDWARE_PRESETS)}")

    def check_micro_batch(self) -> None:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )

    def check_device(self) -> None:
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ValueError(f"train.device={self.device!r} must be auto, cpu, mps, cuda or cuda:N")


class OptimConfig(Section):
    """AdamW with linear warmup, then cosine decay, or a constant LR with an optional linear cool-down."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (the cosine's end, or the cool-down's).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to the peak LR.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="After warmup: cosine decay, or constant.")
    cooldown_steps: int = Field(
        0, ge=0, description="schedule=constant: the last this many steps decay linearly to min_lr_ratio * lr "
        "(warmup-stable-decay, as Hägele et al. 2024): the loss at any step of the constant part is a fair reading of "
        "the recipe at that length, and the cool-down gives the final one. 0: no cool-down."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    router_lr_mult: float = Field(
        1.0, ge=0, description="The routers' learning rate as a multiple of the schedule's (0: they stay, like train.freeze=router)."
    )
    expert_lr_mult: float = Field(1.0, ge=0, description="The routed experts' learning rate as a multiple of the schedule's.")

    @model_validator(mode="after")
    def _cooldown_needs_constant(self) -> "OptimConfig":
        if self.cooldown_steps and self.schedule != "constant":
            raise ValueError(f"optim.cooldown_steps={self.cooldown_steps} needs optim.schedule=constant (the cosine "
                             "schedule decays all the way already); set optim.schedule: constant or drop the cool-down")
        return self

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        ok = isinstance(value, (list, tuple)) and len(value) == 2
        if not ok or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value):
            raise ValueError("must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        return value
