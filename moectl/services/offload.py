"""Experts offloaded with a cache: eval and generate with at most K experts of each MoE layer resident.

The routed experts stay in the checkpoint's model.safetensors. Each MoE layer's experts become an
`OffloadedExperts`, which reads one expert's rows of the stacked (E, ., .) tensors from the file
when a pass needs it and the layer's `ExpertCache` (moe/cache.py) does not hold it, evicting as
its policy says. The reads are plain positioned reads (os.pread), not a memory map, so what is
resident is what was read: the figure that matters on CPU is peak resident memory. On a GPU the
resident experts live on the device. Each expert is computed as the resident model computes it
(the same grouped-matmul function on its rows), so outputs are bit-identical.

With `prefetch`, a hook on each MoE layer runs the next MoE layer's router on this layer's input
(Mixtral-offloading's speculative loading, Eliseev & Mazur 2023) and reads in the K experts it
picks most often, before that layer's pass.

`report()` gives per layer: hit rate, prefetch recall, bytes read per routed token, against the
random baseline K/E and the best fixed set of K in hindsight, plus the process's peak RSS.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moectl.common import runtime
from moectl.common.errors import ConfigError
from moectl.moe import MoELayer
from moectl.moe.cache import POLICIES, CacheCounts, ExpertCache
from moectl.moe.experts import grouped_ffn

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Offload:
    """--offload-experts with --expert-cache K, --cache-policy and --prefetch."""

    capacity: int
    policy: str = "lru"
    prefetch: bool = False

    def check(self, num_experts: int, top_k: int) -> None:
        """`top_k`: the experts one token uses (a hierarchical router's groups times its K)."""
        if self.policy not in POLICIES:
            raise ConfigError(f"--cache-policy {self.policy!r}: choose {', '.join(POLICIES)}")
        if not top_k <= self.capacity <= num_experts:
            raise ConfigError(f"--expert-cache {self.capacity}: a layer needs room for a token's moe.top_k={top_k} "
                              f"experts at once and holds at most its {num_experts}; choose {top_k} to {num_experts}")


class SafetensorsFile:
    """Tensors of a safetensors file read in part: one row block of the first dimension at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length))
        self.data_start = 8 + length
        self.fd = os.open(self.path, os.O_RDONLY)

    def shape(self, name: str) -> list[int]:
        return self.header[name]["shape"]

    def read_row(self, name: str, i: int) -> Tensor:
        """tensor[i] (of a tensor stored (R, ...)), as the dtype it was saved in."""
        entry = self.header[name]
        if entry["dtype"] not in DTYPES:
            raise ConfigError(f"{self.path}: {name} is stored as {entry['dtype']}; experts offload from fp32, bf16 or fp16")
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        row = (end - begin) // shape[0]
        data = os.pread(self.fd, row, self.data_start + begin + i * row)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape[1:])

    def close(self) -> None:
        os.close(self.fd)


class OffloadedExperts(nn.Module):
    """A layer's E experts read from the file on demand, at most K resident (GroupedExperts' interface)."""

    def __init__(self, file: SafetensorsFile, prefix: str, activation: str, num_experts: int, cache: ExpertCache,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.file, self.activation, self.num_experts, self.cache = file, activation, num_experts, cache
        self.names = [f"{prefix}{w}" for w in ("w_up", "w_gate", "w_down") if f"{prefix}{w}" in file.header]
        self.device, self.dtype = device, dtype
        self.weights: dict[int, list[Tensor]] = {}  # the resident experts
        self.bytes_read = 0
        self.tokens = 0  # real tokens routed through the layer (counted by attach's hook)

    def _sync(self) -> None:
        """Free what the cache evicted."""
        for e in [e for e in self.weights if e not in self.cache.resident]:
            del self.weights[e]

    def _read(self, e: int) -> None:
        rows = [self.file.read_row(name, e) for name in self.names]
        self.bytes_read += sum(r.numel() * r.element_size() for r in rows)
        self.weights[e] = [r.to(self.device, self.dtype) for r in rows]

    def expert(self, e: int) -> list[Tensor]:
        """Expert e's (w_up, [w_gate,] w_down), read in on a miss."""
        self.cache.use(e)
        self._sync()
        if e not in self.weights:
            self._read(e)
        return self.weights[e]

    def prefetch(self, experts: list[int]) -> None:
        for e in self.cache.prefetch(experts):
            self._sync()
            self._read(e)
        self._sync()

    def forward(self, x: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """(M, D) assignments grouped by expert -> (M, D), each expert on its rows as GroupedExperts
        computes them. The resident experts go first: a pass that needs more than K experts would
        otherwise evict, in id order, experts it has yet to use (LRU's cyclic thrash)."""
        self.cache.begin_pass()
        out = x.new_empty(x.shape[0], x.shape[1])
        starts = [0] + list(itertools.accumulate(tokens_per_expert))  # (E + 1,) row offsets
        needed = [e for e, n in enumerate(tokens_per_expert) if n]
        for e in sorted(needed, key=lambda e: e not in self.cache.resident):  # stable: resident ones, then the rest
            out[starts[e] : starts[e + 1]] = self._one(e, x[starts[e] : starts[e + 1]])
        return out

    def _one(self, e: int, x: Tensor) -> Tensor:
        w = [t[None] for t in self.expert(e)]  # (1, ., .): a group of one
        return grouped_ffn(x, [x.shape[0]], self.activation, w[0], w[1] if len(w) == 3 else None, w[-1])

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        self.cache.begin_pass()
        return self._one(e, x)


def attach(model: nn.Module, weights_file: Path, offload: Offload, device: torch.device) -> list[str]:
    """Replace every MoE layer's experts (built on "meta") with offloaded ones reading `weights_file`;
    returns the state-dict prefixes they cover, which the checkpoint loader then skips."""
    file = SafetensorsFile(weights_file)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    prefixes = []
    for name, layer in layers:
        prefix = f"{name}.experts."
        if f"{prefix}w_up" not in file.header:
            raise ConfigError(f"{weights_file} has no {prefix}w_up: it cannot be offloaded (a quantised bundle? offload "
                              "the unquantised run)")
        cache = ExpertCache(layer.num_experts, offload.capacity, offload.policy)
        layer.experts = OffloadedExperts(file, prefix, layer.experts.activation, layer.num_experts, cache, device)
        layer.register_forward_pre_hook(_count_tokens)
        prefixes.append(prefix)
    if offload.prefetch:
        for (_, layer), (_, following) in zip(layers, layers[1:]):
            layer.register_forward_pre_hook(_prefetcher(following))
    return prefixes


def _count_tokens(layer: MoELayer, args) -> None:
    """Real tokens routed, for bytes per token. Host sync with padding: the offloaded layer syncs
    on every expert it reads anyway."""
    valid = args[2] if len(args) > 2 else None  # args: (x (N, D), positions, valid (N,) or None)
    layer.experts.tokens += args[0].shape[0] if valid is None else int(valid.sum())


def _prefetcher(following: MoELayer):
    """A pre-hook that runs the next MoE layer's router on this layer's input and prefetches the K
    experts it picks most often (every expert a token picks counts once per token)."""

    @torch.no_grad()
    def hook(module, args):
        x, valid = args[0], args[2] if len(args) > 2 else None
        record = following.router(x, valid)
        counts = torch.bincount(record.expert_idx[record.chosen], minlength=following.num_experts)  # (E,)
        order = torch.sort(-counts, stable=True).indices.tolist()
        following.experts.prefetch([e for e in order if counts[e] > 0])

    return hook


def offloaded_layers(model: nn.Module) -> list[OffloadedExperts]:
    return [m for m in model.modules() if isinstance(m, OffloadedExperts)]


def report(model: nn.Module, slots: list[int], offload: Offload) -> dict:
    """Per offloaded layer: requests, hit rate, prefetch recall, bytes read per routed token, and
    the baselines; plus the process's peak RSS."""
    layers = []
    for slot, experts in zip(slots, offloaded_layers(model)):
        c: CacheCounts = experts.cache.finish()
        layers.append({
            "slot": slot, "requests": c.requests, "hit_rate": c.hit_rate, "loads": c.loads,
            "prefetched": c.prefetched, "prefetch_recall": c.prefetch_recall if c.needed else None,
            "bytes_per_token": experts.bytes_read / max(experts.tokens, 1), "bytes_read": experts.bytes_read,
            "random_hit_rate": offload.capacity / experts.num_experts,
            "static_hit_rate": c.static_hit_rate(offload.capacity),
        })
    return {"expert_cache": offload.capacity, "policy": offload.policy, "prefetch": offload.prefetch,
            "peak_rss_bytes": runtime.peak_rss_bytes(), "layers": layers}


def show(rep: dict) -> None:
    """The cache report as a table: per layer, against the baselines."""
    from rich.table import Table

    from moectl.common import console

    title = (f"experts offloaded: {rep['expert_cache']} resident per layer, {rep['policy']}"
             f"{' with prefetch' if rep['prefetch'] else ''}; peak RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold underline")
    for name in ("layer", "requests", "hit rate", "random K/E", "best fixed K", "recall", "read/token"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in rep["layers"]:
        recall = "-" if s["prefetch_recall"] is None else f"{100 * s['prefetch_recall']:.1f}%"
        table.add_row(f"{s['slot']:02d}", str(s["requests"]), f"{100 * s['hit_rate']:.1f}%",
                      f"{100 * s['random_hit_rate']:.1f}%", f"{100 * s['static_hit_rate']:.1f}%", recall,
                      f"{console.human(s['bytes_per_token'])}B")
    console.out.print(table)
