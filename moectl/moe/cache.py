"""Expert caches: which experts of one MoE layer stay resident when at most K of its E may, and
how often a request finds its expert there.

Eviction policies (on a miss with the cache full, the victim is the resident expert with):
  lru   the oldest last use (Mixtral-offloading's per-layer LRU, Eliseev & Mazur 2023)
  lfu   the fewest uses since the start; ties to the oldest last use
  lfru  the lowest recency-weighted frequency: every past use counts 2^(-age / HALF_LIFE), age in
        the layer's passes (the CRF of Lee et al. 2001's LRFU, with lambda = 1 / HALF_LIFE); ties
        to the oldest last use. Between the two: a burst of recent uses outweighs an old habit.

A pass is one forward of the layer: `begin_pass()`, then `use(e)` for each expert it computes, in
order. `prefetch(experts)` loads up to K predicted experts before the next pass (evicting as the
policy says, never one of the predicted); a prefetched expert's first use is a hit. The counts give the hit rate (hits /
requests), loads and prefetch recall (needed experts that were predicted / needed experts).

`simulate` replays a routing trace through a cache without any weights: route-stats --cache-sim.

Notation: E experts, K resident at most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

POLICIES = ("lru", "lfu", "lfru")
HALF_LIFE = 8.0  # lfru: passes after which a use counts half


@dataclass
class CacheCounts:
    requests: int = 0  # expert uses, one per expert per pass
    hits: int = 0  # of them, found resident
    loads: int = 0  # experts read in: misses plus prefetches
    prefetched: int = 0  # experts read in ahead of a pass
    needed: int = 0  # experts the passes after a prefetch needed
    predicted_needed: int = 0  # of them, predicted by the prefetch
    by_expert: list[int] = field(default_factory=list)  # requests per expert

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.requests, 1)

    @property
    def prefetch_recall(self) -> float:
        return self.predicted_needed / max(self.needed, 1)

    def static_hit_rate(self, capacity: int) -> float:
        """The hit rate of the best fixed set of K experts in hindsight: the K most requested."""
        return sum(sorted(self.by_expert, reverse=True)[:capacity]) / max(self.requests, 1)


class ExpertCache:
    def __init__(self, num_experts: int, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r}: choose {', '.join(POLICIES)}")
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"cache of {capacity} experts: choose 1 to {num_experts}")
        self.num_experts, self.capacity, self.policy = num_experts, capacity, policy
        self.resident: set[int] = set()
        self.last_use = [-1] * num_experts  # clock of the last use (or load)
        self.uses = [0] * num_experts
        self.crf = [0.0] * num_experts  # lfru's score, as of pass `crf_at`
        self.crf_at = [0] * num_experts
        self.clock = 0  # advances on every use and load: recency order
        self.passes = 0
        self.used_this_pass: set[int] = set()
        self.predicted: set[int] | None = None
        self.predicted_for = -1  # the pass the prediction is for
        self.counts = CacheCounts(by_expert=[0] * num_experts)

    def begin_pass(self) -> None:
        self._score_prediction()
        self.passes += 1
        self.used_this_pass = set()

    def _score_prediction(self) -> None:
        """Once the pass a prediction was for is over: how many of the experts it needed were predicted."""
        if self.predicted is not None and self.predicted_for == self.passes:
            self.counts.needed += len(self.used_this_pass)
            self.counts.predicted_needed += len(self.used_this_pass & self.predicted)
            self.predicted = None

    def _score(self, e: int) -> tuple:
        """Eviction order: the smallest goes first."""
        if self.policy == "lru":
            return (self.last_use[e],)
        if self.policy == "lfu":
            return (self.uses[e], self.last_use[e])
        return (self.crf[e] * 2 ** (-(self.passes - self.crf_at[e]) / HALF_LIFE), self.last_use[e])

    def _load(self, e: int, protected: set[int]) -> bool:
        """Make `e` resident, evicting if full (never one in `protected` while others remain);
        returns False when every resident expert is protected and `e` was not loaded."""
        if len(self.resident) >= self.capacity:
            candidates = (self.resident - protected) or None
            if candidates is None:
                return False
            self.resident.remove(min(candidates, key=self._score))
        self.resident.add(e)
        self.counts.loads += 1
        self.clock += 1
        self.last_use[e] = self.clock
        return True

    def use(self, e: int) -> bool:
        """The pass computes expert `e`: True on a hit; on a miss it is loaded (evicting as the policy says)."""
        c = self.counts
        c.requests += 1
        c.by_expert[e] += 1
        hit = e in self.resident
        c.hits += hit
        if not hit:
            self._load(e, set())  # an expert already used this pass may go: its output is computed
        self.clock += 1
        self.last_use[e] = self.clock
        self.uses[e] += 1
        self.crf[e] = self.crf[e] * 2 ** (-(self.passes - self.crf_at[e]) / HALF_LIFE) + 1.0
        self.crf_at[e] = self.passes
        self.used_this_pass.add(e)
        return hit

    def prefetch(self, experts: Iterable[int]) -> list[int]:
        """Load predicted experts ahead of the next pass (at most K, keeping what this pass used
        when it can); returns those read in."""
        self._score_prediction()
        wanted = list(dict.fromkeys(experts))[: self.capacity]
        self.predicted, self.predicted_for = set(wanted), self.passes + 1
        loaded = []
        for e in wanted:
            if e not in self.resident and self._load(e, protected=set(wanted)):
                loaded.append(e)
        self.counts.prefetched += len(loaded)
        return loaded

    def finish(self) -> CacheCounts:
        """The counts, with the last pass's prediction scored."""
        self._score_prediction()
        return self.counts


def simulate(passes: Iterable[Iterable[int]], num_experts: int, capacity: int, policy: str) -> CacheCounts:
    """Replay `passes` (each the experts one token used, in order) through a cache of `capacity`."""
    cache = ExpertCache(num_experts, capacity, policy)
    for experts in passes:
        cache.begin_pass()
        for e in experts:
            cache.use(e)
    return cache.finish()
