"""The logging window: loss sums and routing counts over the steps since the last log line, kept
on the device (no host sync per micro-step), summed over ranks when logged and carried on by a
checkpoint; and what the window's routing says: the worst imbalance, and layers that collapse."""

from __future__ import annotations

import torch
from torch import nn

from moectl.common.runtime import Dist
from moectl.common.stats import LayerStats, RoutingStats, Sums, accumulator_dtype, worst_imbalance
from moectl.data import IGNORE
from moectl.models import moe_slots, routed_experts
from moectl.moe import LOSS_NAMES
from moectl.services import distributed


def loss_sums(out) -> torch.Tensor:
    """One micro-batch's (objective * scored targets, scored targets, router losses), in the
    accumulators' dtype: its objective weighs by the targets it scores (none: zero loss, zero
    count), its router losses by one."""
    dtype = accumulator_dtype(out.loss.device)
    routers = (out.aux_loss + out.z_loss).detach().to(dtype)
    scored = out.scored.to(dtype)
    return torch.stack([(out.loss.detach().to(dtype) - routers) * scored, scored, routers])


def target_shares(targets: list[torch.Tensor], dp: Dist, device: torch.device) -> list[float]:
    """Rows that score different numbers of targets (instruction tuning): the weight of each
    micro-batch's mean loss so that the step minimises the mean over every scored target of the
    global batch: its share of them, times the number of processes (DDP averages the gradients)."""
    mine = torch.tensor([float((y != IGNORE).sum()) for y in targets], dtype=torch.float64)
    total = mine.sum().reshape(1).to(device)
    distributed.all_reduce_sum_([total], dp)
    return (mine * dp.world_size / total.cpu().clamp_min(1.0)).tolist()


class LossWindow(Sums):
    """Loss sums over the logging window, kept on the device: no host sync per micro-step. The
    objective and lm_loss are means over the scored targets (a micro-batch with none, e.g. an
    instruction-tuning row whose response was cut off, adds zero loss and zero count); the
    router losses are means over micro-batches; loss = objective + aux_loss + z_loss."""

    ROUTER_TERMS = tuple(f"router_{name}" for name in LOSS_NAMES)
    FIELDS = ("objective", "lm_loss", "scored", "aux_loss", "z_loss", *ROUTER_TERMS, "grad_norm", "micro_steps", "steps")

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, self.zeros())

    def add_micro(self, out, sums: torch.Tensor) -> None:
        """`sums`: loss_sums(out)."""
        objective, scored, _ = sums.to(self.objective.dtype)
        self.objective.add_(objective)
        self.lm_loss.add_(out.lm_loss.detach() * scored)
        self.scored.add_(scored)
        for name in ("aux_loss", "z_loss"):
            getattr(self, name).add_(getattr(out, name).detach())
        for name, value in out.aux_terms.items():
            getattr(self, f"router_{name}").add_(value.detach())
        self.micro_steps += 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm += grad_norm.detach()
        self.steps += 1

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "scored" in state:  # else saved before the window weighed tokens: this window starts afresh
            super().load_state_dict(state)

    def means(self) -> dict[str, float]:
        """Window means by their names under train/ (tracking.py)."""
        m, s, n = max(float(self.micro_steps), 1.0), max(float(self.steps), 1.0), max(float(self.scored), 1.0)
        out = {k: float(getattr(self, k)) / m for k in ("aux_loss", "z_loss")}
        out["lm_loss"] = float(self.lm_loss) / n
        out["loss"] = float(self.objective) / n + out["aux_loss"] + out["z_loss"]
        out["grad_norm"] = float(self.grad_norm) / s
        if float(self.router_z) != 0.0:  # MoE models: each router loss, unweighted
            out.update({f"router/{k[len('router_'):]}": float(getattr(self, k)) / m for k in self.ROUTER_TERMS})
        return out


def routing_window(model: nn.Module, device: torch.device) -> RoutingStats:
    """Routing counts for every routing record the model returns (its MoE layers, a mixture head's gate)."""
    return RoutingStats(len(moe_slots(model)), routed_experts(model), device)


def review(stats: RoutingStats, collapsed: list[bool], threshold: float, slots: list[int], first: int,
           step: int) -> tuple[list[LayerStats], float, list[tuple[bool, str]]]:
    """The statistics of a window of steps first..step, per routing record (at `slots`); the worst
    layer's max/mean load; and (now collapsing, message) for each layer whose max/mean load crossed
    `threshold` (log.collapse_threshold) since the last window, either way. `collapsed` (each layer
    over the threshold last window) is brought up to date."""
    layers = stats.summary()
    changes = []
    for i, s in enumerate(layers):
        collapsing = s.max_over_mean > threshold
        if collapsing != collapsed[i]:
            changes.append((collapsing, collapse_message(step, first, slots[i], s, threshold, collapsing)))
        collapsed[i] = collapsing
    return layers, worst_imbalance(layers), changes


def collapse_message(step: int, first: int, slot: int, s: LayerStats, threshold: float, collapsing: bool) -> str:
    """The warning (or the all-clear) for a layer whose routing crossed log.collapse_threshold over
    the window of steps first..step."""
    window = f"over steps {first}-{step}" if first < step else f"at step {step}"
    if not collapsing:
        return f"step {step}: routing in layer {slot} recovered: max/mean expert load {s.max_over_mean:.2f} {window}"
    return (
        f"step {step}: routing in layer {slot} is collapsing: max/mean expert load {s.max_over_mean:.2f} > "
        f"log.collapse_threshold={threshold} {window}, {s.dead_experts} dead experts; "
        "if it persists, raise the balancing loss (moe.aux_loss_coef, or moe.importance_loss_coef and "
        "moe.load_loss_coef for noisy gating)"
    )
