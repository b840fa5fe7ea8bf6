"""Expert parallelism: each MoE layer's experts sharded over processes, tokens exchanged with
all-to-all (GShard, Switch, DeepSpeed-MoE, Megatron-core, torchtitan).

With `train.expert_parallel: N` the W processes of a torchrun job form W/N expert-parallel
groups of N consecutive ranks. Rank r of a group holds experts [r*E/N, (r+1)*E/N) of every MoE
layer; the W/N ranks that hold the same experts (one per group) are its replicas. Everything
else (attention, LSTMs, embeddings, routers, shared experts) stays replicated over all W ranks
and DDP averages it as before.

The model code does not change. `shard` swaps each built layer's GroupedExperts for a
`ShardedExperts` that takes the same input (assignments grouped by expert, E counts) and, in
its forward, sends each expert's rows to the rank that holds it, runs its own experts on what
arrived, and sends the outputs back, in the order they came. Routing, capacity and dropping run
on each rank's own tokens before the exchange, exactly as without expert parallelism, and the
routing records, statistics and aux losses are the same.

Gradients: each rank's loss is the mean over its own tokens, and DDP averages dense gradients
over the W ranks. The exchange's backward brings an expert's owner the gradient from every
token of its group that reached the expert; summing that over the replicas gives the sum over
all W ranks, so it is divided by W (not by the W/N replicas: the classic mistake).

FasterMoE (He et al., PPoPP 2022), each part behind its own key and each leaving every number
as it was: dynamic shadowing (`train.shadow_experts`: the group's hottest experts broadcast from
their owners and computed where their tokens are, gradients reduced back) and smart scheduling
(`train.ep_overlap`: the exchange split into point-to-point messages per peer, overlapped with
the experts' compute of the rows already there). moectl/common/perf_model.py predicts what they buy.

Checkpoints stay in the full layout: `full_experts` lets rank 0 write every expert, and lets
every rank read a full checkpoint and keep its own slice, so a run resumes under any expert- or
data-parallel size, and eval, route-stats, generate and export never meet a shard.

Notation: N expert-parallel ranks, E experts, L = E/N local experts, D model dim, M assignments.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moectl.common import perf_model
from moectl.common.errors import ConfigError
from moectl.common.runtime import Dist
from moectl.moe import MoELayer
from moectl.moe.experts import GroupedExperts, ffn


def check_layout(n: int, world_size: int) -> None:
    """Refuse an expert-parallel size `n` (train.expert_parallel) this job of `world_size` processes
    cannot use, before any process group exists."""
    if n == 1:
        return
    if world_size == 1:
        raise ConfigError(
            f"train.expert_parallel={n} shards the experts over processes, but this is a single process; "
            f"start {n} or a multiple of {n} processes (moectl train --nproc-per-node {n}, or torchrun)"
        )
    if world_size % n:
        raise ConfigError(
            f"train.expert_parallel={n} must divide the {world_size} processes (each group of {n} ranks holds every "
            "expert once); change train.expert_parallel or the number of processes"
        )


@dataclass
class Timings:
    """Seconds spent in each part of the sharded experts' forward and backward (for benchmarks;
    on a GPU the caller synchronises, since these are host clocks)."""

    exchange: float = 0.0  # the all-to-alls: counts, tokens out and back, and their backward
    experts: float = 0.0  # the local experts' forward and backward
    _backward_from: float = 0.0


class _Clock(torch.autograd.Function):
    """The identity, whose backward notes the time: placed around the local experts, it times
    their backward, which autograd runs between the two marks."""

    @staticmethod
    def forward(ctx, x: Tensor, timings: Timings, at_output: bool):
        ctx.timings, ctx.at_output = timings, at_output
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        now = time.perf_counter()
        if ctx.at_output:  # the experts' backward starts
            ctx.timings._backward_from = now
        else:
            ctx.timings.experts += now - ctx.timings._backward_from
        return grad, None, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the exchange the other way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, timings: Optional[Timings]):
        ctx.splits, ctx.group, ctx.timings = (out_splits, in_splits), group, timings
        return _exchange(x, out_splits, in_splits, group, timings)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group, ctx.timings), None, None, None, None


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group, timings: Optional[Timings]) -> Tensor:
    started = time.perf_counter()
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if timings is not None:
        timings.exchange += time.perf_counter() - started
    return out


class ShardedExperts(GroupedExperts):
    """This rank's L = E/N experts of one layer, fed by an all-to-all over the expert-parallel group.

    Takes what GroupedExperts takes, (M, D) assignments grouped by expert with E counts, and
    returns their (M, D) outputs in the same order. Parameters keep GroupedExperts' names with L
    experts instead of E, so a checkpoint's names are the same with or without sharding.

    Shadowing (FasterMoE): `choose_shadows` maps the group's routing counts (N, E) to experts
    that every rank of the group computes itself this step. Their owners broadcast their weights,
    their rows stay where they were routed, and the copies' gradients are summed back to the
    owners by `reduce_shadow_gradients` before the optimizer step, so the result is the same.
    """

    def __init__(self, full: GroupedExperts, ep_rank: int, group_ranks: list[int], group,
                 choose_shadows: Optional[Callable[[Tensor], tuple[int, ...]]] = None, overlap: bool = False):
        ep_size = len(group_ranks)
        if full.num_experts % ep_size:
            raise ValueError(f"{full.num_experts} experts do not split over {ep_size} ranks")
        local = full.num_experts // ep_size
        d_model, hidden = full.w_up.shape[1:]
        with torch.random.fork_rng(devices=[]):  # the shard's own init is overwritten below: keep the RNG stream
            super().__init__(local, d_model, hidden, full.activation, dropout=full.dropout)
        self.total_experts, self.ep_rank, self.ep_size = full.num_experts, ep_rank, ep_size
        self.group_ranks, self.group = group_ranks, group
        self.first = ep_rank * local  # global id of local expert 0
        self.choose_shadows = choose_shadows
        self.overlap = overlap  # FasterMoE's smart scheduling: exchange with one peer while computing another's rows
        self.timings: Optional[Timings] = None
        self._shadowed: list[tuple[int, Tensor]] = []  # (expert, weight copy) of this step's forwards
        with torch.no_grad():
            for name in ("w_up", "w_gate", "w_down"):
                mine = getattr(self, name)
                if mine is not None:
                    src = getattr(full, name)
                    mine.copy_(src[self.first : self.first + local])
                    mine.requires_grad_(src.requires_grad)

    def forward(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """(M, D) grouped by global expert, E counts -> (M, D) outputs, in the same order."""
        # Every rank's rows per expert: (E,) -> (N, E); host sync, as the splits must be ints.
        table = self._gather_counts(torch.tensor(tokens_per_expert, dtype=torch.int64, device=x.device))
        shadows = sorted(self.choose_shadows(table)) if self.choose_shadows is not None else []
        if not shadows:
            return self._routed(x, tokens_per_expert, table)
        weights = {e: self._broadcast_expert(e) for e in shadows}
        pieces = x.split(tokens_per_expert)  # E pieces of (n_e, D)
        routed = [e for e in range(self.total_experts) if e not in weights]
        counts = [tokens_per_expert[e] if e in routed else 0 for e in range(self.total_experts)]
        table = table.clone()
        table[:, shadows] = 0  # shadowed rows stay home
        x_routed = torch.cat([pieces[e] for e in routed]) if routed else x[:0]
        y_routed = iter(self._routed(x_routed, counts, table).split([counts[e] for e in routed]))
        p = self._dropout()
        outs = [ffn(pieces[e], *weights[e], self.activation, p) if e in weights else next(y_routed)
                for e in range(self.total_experts)]
        return torch.cat(outs)

    def _gather_counts(self, counts: Tensor) -> Tensor:
        started = time.perf_counter()
        rows = [torch.empty_like(counts) for _ in range(self.ep_size)]
        dist.all_gather(rows, counts, group=self.group)
        if self.timings is not None:
            self.timings.exchange += time.perf_counter() - started
        return torch.stack(rows)

    def _routed(self, x: Tensor, tokens_per_expert: list[int], table: Tensor) -> Tensor:
        """The all-to-all path: (M, D) by global expert -> (M, D); table: the group's (N, E) counts."""
        n, local = self.ep_size, self.num_experts
        received = table[:, self.first : self.first + local]  # (N, L): rows of my experts from each rank
        got = received.tolist()  # got[r][j]: rows of local expert j that rank r sends
        send_splits = [sum(tokens_per_expert[r * local : (r + 1) * local]) for r in range(n)]
        if self.overlap:
            return _Overlapped.apply(x, self, send_splits, got, torch.is_grad_enabled(), *self._matrices())
        recv_splits = [sum(row) for row in got]
        x_recv = _AllToAll.apply(x, recv_splits, send_splits, self.group, self.timings)  # (R, D), by source rank
        # Arrived as [rank 0: experts 0..L-1][rank 1: experts 0..L-1]...; the experts want them by expert.
        order = _by_expert(received, sum(recv_splits))  # (R,)
        x_local = x_recv.index_select(0, order)  # (R, D) grouped by local expert
        timed = self.timings is not None and torch.is_grad_enabled()
        if timed:
            x_local = _Clock.apply(x_local, self.timings, False)
        started = time.perf_counter()
        y_local = super().forward(x_local, [sum(col) for col in zip(*got)])  # (R, D)
        if self.timings is not None:
            self.timings.experts += time.perf_counter() - started
        if timed:
            y_local = _Clock.apply(y_local, self.timings, True)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        y_recv = y_local.index_select(0, back)  # (R, D), by source rank again
        return _AllToAll.apply(y_recv, send_splits, recv_splits, self.group, self.timings)  # (M, D)

    def _matrices(self) -> list[Tensor]:
        return [w for w in (self.w_up, self.w_gate, self.w_down) if w is not None]

    def _owner(self, expert: int) -> int:
        """The place in the group of the rank that holds `expert`."""
        return expert // self.num_experts

    def _broadcast_expert(self, expert: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Expert `expert`'s (w_up, w_gate, w_down) from its owner, as one flat copy that records
        its gradient for reduce_shadow_gradients."""
        mats = self._matrices()
        if self._owner(expert) == self.ep_rank:
            flat = torch.cat([w[expert - self.first].detach().reshape(-1) for w in mats])
        else:
            flat = mats[0].new_empty(sum(w[0].numel() for w in mats))
        dist.broadcast(flat, src=self.group_ranks[self._owner(expert)], group=self.group)
        if torch.is_grad_enabled():
            flat.requires_grad_(True)
            self._shadowed.append((expert, flat))
        views = [v.view_as(w[0]) for v, w in zip(flat.split([w[0].numel() for w in mats]), mats)]
        return (views[0], views[1], views[2]) if self.w_gate is not None else (views[0], None, views[1])

    def reduce_shadow_gradients(self) -> None:
        """Sum the shadow copies' gradients of this step over the group into their owners' experts."""
        if not self._shadowed:
            return
        mats = self._matrices()
        sums: dict[int, Tensor] = {}
        for expert, flat in self._shadowed:
            grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)
            sums[expert] = sums[expert] + grad if expert in sums else grad.clone()
        self._shadowed.clear()
        for expert in sorted(sums):  # the same experts, in the same order, on every rank of the group
            owner = self._owner(expert)
            dist.reduce(sums[expert], dst=self.group_ranks[owner], group=self.group)
            if owner != self.ep_rank:
                continue
            for w, g in zip(mats, sums[expert].split([w[0].numel() for w in mats])):
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad[expert - self.first] += g.view_as(w[0])

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        raise NotImplementedError("the per-expert loop reference runs on unsharded layers only")


# Message tags of the overlapped exchange, one message of each kind per pair of ranks per call.
_ROWS, _OUTPUTS, _GRAD_OUTPUTS, _GRAD_ROWS = range(4)


class _Overlapped(torch.autograd.Function):
    """Dispatch, local experts and combine, each peer's rows exchanged by point-to-point
    messages while the experts compute the rows already here (FasterMoE's smart scheduling).

    Every message is posted at once; the experts then run on this rank's own rows, then on each
    peer's as they arrive (peer me-1 first, then me-2, ...), and each peer's outputs are sent
    back as soon as they are computed. Backward mirrors it: output gradients go to the ranks
    that computed those rows, each chunk's expert backward runs as its gradient arrives, and
    the input gradients go home. Each chunk's expert graph is kept from the forward; parameters
    are inputs only so that autograd calls backward, which accumulates their gradients itself.
    """

    @staticmethod
    def forward(ctx, x, layer: "ShardedExperts", send_splits: list[int], got: list[list[int]], grad: bool, *params):
        n, me = layer.ep_size, layer.ep_rank
        sources = [(me - i) % n for i in range(n)]  # own rows first, then each peer's
        mine = list(x.split(send_splits))  # (rows for rank p, D) each, by destination
        recv = {s: x.new_empty(sum(got[s]), x.shape[1]) for s in sources[1:]}
        outputs = {p: x.new_empty(send_splits[p], x.shape[1]) for p in sources[1:]}
        sends, pending = _post(layer, {p: mine[p] for p in sources[1:]}, recv, _ROWS)
        back = [dist.irecv(outputs[p], src=layer.group_ranks[p], group=layer.group, tag=_OUTPUTS) for p in sources[1:]]
        chunks = {}
        for s in sources:
            rows = mine[me] if s == me else _wait(pending, s, recv)
            with torch.set_grad_enabled(grad):
                xin = rows.detach().requires_grad_(grad)
                yout = GroupedExperts.forward(layer, xin, got[s])  # (rows from s, D)
            chunks[s] = (xin, yout)
            if s != me:
                sends.append(dist.isend(yout.detach().contiguous(), dst=layer.group_ranks[s], group=layer.group,
                                        tag=_OUTPUTS))
        for work in back + sends:
            work.wait()
        ctx.layer, ctx.send_splits, ctx.chunks, ctx.sources, ctx.num_params = layer, send_splits, chunks, sources, len(params)
        return torch.cat([chunks[me][1].detach() if p == me else outputs[p] for p in range(n)])

    @staticmethod
    def backward(ctx, grad_out):
        layer, chunks, sources = ctx.layer, ctx.chunks, ctx.sources
        me = layer.ep_rank
        mine = list(grad_out.contiguous().split(ctx.send_splits))  # gradients of my rows' outputs, by destination
        recv = {s: torch.empty_like(chunks[s][1]) for s in sources[1:]}
        grad_rows = {p: torch.empty_like(mine[p]) for p in sources[1:]}
        sends, pending = _post(layer, {p: mine[p] for p in sources[1:]}, recv, _GRAD_OUTPUTS)
        back = [dist.irecv(grad_rows[p], src=layer.group_ranks[p], group=layer.group, tag=_GRAD_ROWS)
                for p in sources[1:]]
        own = None
        for s in sources:
            xin, yout = chunks[s]
            torch.autograd.backward(yout, mine[me] if s == me else _wait(pending, s, recv))
            g = xin.grad if xin.grad is not None else torch.zeros_like(xin)
            if s == me:
                own = g
            else:
                sends.append(dist.isend(g.contiguous(), dst=layer.group_ranks[s], group=layer.group, tag=_GRAD_ROWS))
        for work in back + sends:
            work.wait()
        ctx.chunks = None  # free the saved expert graphs
        grad_x = torch.cat([own if p == me else grad_rows[p] for p in range(layer.ep_size)])
        return (grad_x, None, None, None, None) + (None,) * ctx.num_params


def _post(layer: "ShardedExperts", send: dict[int, Tensor], recv: dict[int, Tensor], tag: int) -> tuple[list, dict]:
    """Post every send and receive of one exchange at once: (the sends, the receives by peer)."""
    sends = [dist.isend(t.contiguous(), dst=layer.group_ranks[p], group=layer.group, tag=tag) for p, t in send.items()]
    return sends, {s: dist.irecv(buf, src=layer.group_ranks[s], group=layer.group, tag=tag) for s, buf in recv.items()}


def _wait(pending: dict, peer: int, recv: dict[int, Tensor]) -> Tensor:
    pending[peer].wait()
    return recv[peer]


def _by_expert(received: Tensor, total: int) -> Tensor:
    """The permutation that sorts rows arriving as (source rank, local expert) chunks by
    (local expert, source rank); stable, so each chunk keeps its order."""
    n, local = received.shape
    chunk = torch.repeat_interleave(torch.arange(n * local, device=received.device), received.reshape(-1),
                                    output_size=total)  # (R,) chunk id r*L + j of each row
    return torch.sort((chunk % local) * n + chunk // local, stable=True).indices


@dataclass
class ExpertParallel:
    """This rank's place in the expert-parallel layout, and its sharded expert modules."""

    size: int  # N ranks per expert-parallel group
    rank: int  # this rank's place in its group
    world_size: int  # W
    group: object  # the N ranks of this rank's group
    replicas: object  # the W/N ranks holding the same experts; None when W = N
    layers: list[ShardedExperts] = field(default_factory=list)

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from (p for p in layer.parameters(recurse=False))

    def is_sharded(self, p: Tensor) -> bool:
        return any(p is q for q in self.parameters())

    def reduce_gradients(self) -> None:
        """Sum shadowed experts' gradients into their owners, then each expert gradient over its
        replicas, and divide by W (see the module docstring)."""
        for layer in self.layers:
            layer.reduce_shadow_gradients()
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self.replicas is not None and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.replicas)
            torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])
        if grads:
            torch._foreach_div_(grads, float(self.world_size))

    def clip_grad_norm_(self, params: Iterable[nn.Parameter], max_norm: Optional[float]) -> Tensor:
        """clip_grad_norm_ over the whole model: the dense gradients, equal on every rank, plus
        every expert's, each held by one rank of the group. Returns the total norm."""
        params = [p for p in params if p.grad is not None]
        dense = [p.grad for p in params if not self.is_sharded(p)]
        sharded = [p.grad for p in params if self.is_sharded(p)]
        device = params[0].grad.device if params else torch.device("cpu")
        expert_sq = _sum_of_squares(sharded, device)
        dist.all_reduce(expert_sq, group=self.group)
        total = (_sum_of_squares(dense, device) + expert_sq).sqrt()
        if max_norm is not None:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(dense + sharded, coef)
        return total

    def _gather(self, shard: Tensor) -> Tensor:
        """The group's shards of one tensor, concatenated along the expert dimension, on the CPU."""
        parts = [torch.empty_like(shard) for _ in range(self.size)]
        dist.all_gather(parts, shard.contiguous(), group=self.group)
        return torch.cat([p.cpu() for p in parts])

    def _slice(self, full: Tensor, device: torch.device) -> Tensor:
        local = full.shape[0] // self.size
        return full[self.rank * local : (self.rank + 1) * local].to(device=device, copy=True)

    @contextmanager
    def full_experts(self, gather: bool) -> Iterator[None]:
        """Inside, every sharded parameter holds all E experts, on the CPU: gathered from the
        group (`gather`, to save them) or uninitialised, to be loaded into. Afterwards each rank
        keeps its own slice of what the full tensors then hold. Every rank of the group must enter."""
        swapped = []
        for p in self.parameters():
            shard = p.data
            shape = (shard.shape[0] * self.size, *shard.shape[1:])
            p.data = self._gather(shard) if gather else torch.empty(shape, dtype=shard.dtype)
            swapped.append((p, shard.device))
        try:
            yield
        finally:
            for p, device in swapped:
                p.data = self._slice(p.data, device)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with every sharded parameter's state gathered to all E experts
        (the layout one process would save). Every rank of the group must call it."""
        saved = optimizer.state_dict()
        for i, p in self._optimizer_indices(optimizer):
            if i in saved["state"]:
                saved["state"][i] = {  # a new dict: the returned one is the optimizer's own
                    k: self._gather(v) if _per_expert(v, p) else v for k, v in saved["state"][i].items()
                }
        return saved

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict) -> None:
        """Load a full-layout optimizer state (full_optimizer_state's, or one process's), keeping
        this rank's slice of each sharded parameter's state."""
        state = dict(full["state"])
        for i, p in self._optimizer_indices(optimizer):
            if i in state:
                state[i] = {k: self._slice(v, p.device) if _is_full(v, p, self.size) else v for k, v in state[i].items()}
        optimizer.load_state_dict({**full, "state": state})

    def _optimizer_indices(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, nn.Parameter]]:
        """(index in optimizer.state_dict(), parameter) of each sharded parameter the optimizer holds."""
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, p) for i, p in enumerate(ordered) if self.is_sharded(p)]


def _per_expert(v: object, p: Tensor) -> bool:
    return torch.is_tensor(v) and v.shape == p.shape


def _is_full(v: object, p: Tensor, size: int) -> bool:
    return torch.is_tensor(v) and v.ndim == p.ndim and v.shape[0] == p.shape[0] * size and v.shape[1:] == p.shape[1:]


def _sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def shard(model: nn.Module, n: int, dp: Dist, shadow: str | int = "off",
          hardware: Optional[perf_model.Hardware] = None, overlap: bool = False) -> Optional[ExpertParallel]:
    """Create the expert-parallel process groups and shard every MoE layer's experts over groups
    of `n` ranks; None when `n` is 1. Every rank must call it (new process groups are
    collective); check_layout has vetted `n` against the config. `shadow`: "off", "auto"
    (FasterMoE's greedy policy on `hardware`) or K (the K most loaded experts of each step).
    `overlap`: exchange each peer's rows while computing another's (ShardedExperts)."""
    if n == 1:
        return None
    if dp.world_size % n or dp.world_size == 1:
        raise ValueError(f"expert-parallel size {n} does not divide the {dp.world_size} processes")
    groups = [list(range(start, start + n)) for start in range(0, dp.world_size, n)]
    handles = [dist.new_group(ranks) for ranks in groups]
    replicas = [dist.new_group(list(range(r, dp.world_size, n))) for r in range(n)] if dp.world_size > n else None
    ep = ExpertParallel(size=n, rank=dp.rank % n, world_size=dp.world_size, group=handles[dp.rank // n],
                        replicas=replicas[dp.rank % n] if replicas else None)
    for module in model.modules():
        if isinstance(module, MoELayer):
            policy = shadow_policy(module.experts, n, shadow, hardware)
            module.experts = ShardedExperts(module.experts, ep.rank, groups[dp.rank // n], ep.group, policy, overlap)
            ep.layers.append(module.experts)
    return ep


def shadow_policy(experts: GroupedExperts, n: int, shadow: str | int,
                  hardware: Optional[perf_model.Hardware]) -> Optional[Callable[[Tensor], tuple[int, ...]]]:
    """The function from a group's (N, E) routing counts to the experts to shadow; None for off."""
    if shadow == "off":
        return None
    if shadow != "auto":
        return lambda table: perf_model.top_shadow(table.tolist(), int(shadow))
    if hardware is None:
        raise ValueError("shadow='auto' needs a hardware description")
    d_model, hidden = experts.w_up.shape[1:]
    shape = perf_model.ExpertShape(d_model, hidden, experts.num_experts, 3 if experts.w_gate is not None else 2)
    layout = perf_model.Layout(world=n, ep=n)
    return lambda table: perf_model.greedy_shadow(shape, hardware, layout, table.tolist())


def parameter_names(model: nn.Module, ep: ExpertParallel) -> list[str]:
    """The fully qualified names of the sharded parameters (DDP leaves these to reduce_gradients)."""
    return [name for name, p in model.named_parameters() if ep.is_sharded(p)]
