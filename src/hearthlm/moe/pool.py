"""The pool: a fixed number of expert slots in fast memory shared by all MoE layers, filled from the slow tier.

Each layer step asks for the experts its batch routes to (one fetch serves every token routed there) and gets
them in ascending expert order, the order of the resident path, so the sums, and the logits, are identical.
Misses take the slots of the lowest-ranked experts (policy.py) outside the current step. With a fetch
thread (`executor`), all misses of a step are copied in the background while the step computes its earlier
experts."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .budget import Budget, BudgetError, human_bytes
from .policy import LRU, Frequency, Key, make_policy
from .stats import MoEStats
from .tier import CheckpointTier, HostTier, Weight, empty_like, nbytes

Tier = CheckpointTier | HostTier


class ExpertPool:
    def __init__(
        self,
        tiers: dict[int, Tier],
        num_experts: int,
        top_k: int,
        budget: Budget,
        policy: LRU | Frequency,
        device,
    ):
        self.tiers, self.policy = tiers, policy
        policy.bind(tiers)
        template = next(iter(tiers.values())).read(0)
        self.expert_bytes = sum(nbytes(w) for w in template)
        total = self.expert_bytes * num_experts * len(tiers)
        given = budget.resolve(total)
        count = min(given // self.expert_bytes, num_experts * len(tiers))
        if count < top_k:
            need = top_k * self.expert_bytes
            raise BudgetError(
                f"expert budget {budget}{f' ({human_bytes(given)})' if budget.fraction else ''} holds {count} "
                f"expert(s); one layer's top-{top_k} "
                f"experts need at least {need} bytes ({human_bytes(need)}, {need / total:.2%} of the "
                f"{human_bytes(total)} of experts)"
            )
        self.storage = tuple(empty_like(w, count, device) for w in template)
        self.slots: list[tuple[Weight, Weight]] = [(self.storage[0][i], self.storage[1][i]) for i in range(count)]
        self.owner: list[Key | None] = [None] * count
        self.where: dict[Key, int] = {}
        self.pending: dict[int, Future] = {}
        # A ThreadPoolExecutor here fetches a step's misses in the background while the step computes its
        # earlier experts. Off: on 2 CPU cores it measured slower (benchmarks/moe.py, "frequency+thread").
        self.executor: ThreadPoolExecutor | None = None
        self.first_layer = min(tiers)
        self.clock = 0
        self.stats = MoEStats(slots=count, expert_bytes=self.expert_bytes)

    def snapshot(self) -> MoEStats:
        s = self.stats
        resident: dict[int, int] = dict.fromkeys(self.tiers, 0)
        for layer, _ in self.where:
            resident[layer] += 1
        return MoEStats(**{**s.__dict__, "resident": resident})

    def reset_stats(self) -> None:
        self.stats = MoEStats(slots=len(self.owner), expert_bytes=self.expert_bytes)

    def experts(self, layer: int, active: list[int], rows: int) -> Iterator[tuple[Weight, Weight]]:
        """(gate_up, down) of each expert in `active` (ascending), resident while the caller uses it."""
        if layer == self.first_layer:
            self.clock += 1
            self.stats.tokens += rows
        keys = [(layer, e) for e in active]
        for k in keys:
            self.policy.use(k, self.clock)
        hits = sum(k in self.where for k in keys)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        if len(keys) <= len(self.owner):
            yield from self._step(keys)
        else:  # more experts than slots (a large batch): each is fetched just before its use
            for i, k in enumerate(keys):
                if k not in self.where:
                    later = {self.where[j] for j in keys[i + 1 :] if j in self.where}
                    self._fetch(k, self._victim(later), wait=True)
                yield self._ready(k)

    def _step(self, keys: list[Key]) -> Iterator[tuple[Weight, Weight]]:
        taken = {self.where[k] for k in keys if k in self.where}
        misses = [k for k in keys if k not in self.where]
        for k in misses:
            slot = self._victim(taken)
            taken.add(slot)
            self._fetch(k, slot, wait=self.executor is None)
        for k in keys:
            yield self._ready(k)

    def _victim(self, taken: set[int]) -> int:
        free = next((i for i, o in enumerate(self.owner) if o is None and i not in taken), None)
        if free is not None:
            return free
        rank, clock = self.policy.rank, self.clock
        return min((i for i in range(len(self.owner)) if i not in taken), key=lambda i: rank(self.owner[i], clock))

    def _fetch(self, key: Key, slot: int, wait: bool) -> None:
        self._wait(slot)  # a fetch still writing this slot
        old = self.owner[slot]
        if old is not None:
            del self.where[old]
        self.owner[slot], self.where[key] = key, slot
        self.stats.bytes_fetched += self.expert_bytes
        layer, e = key
        if wait:
            start = time.perf_counter()
            self.tiers[layer].load(e, self.slots[slot])
            self.stats.fetch_seconds += time.perf_counter() - start
        else:
            self.pending[slot] = self.executor.submit(self.tiers[layer].load, e, self.slots[slot])

    def _wait(self, slot: int) -> None:
        future = self.pending.pop(slot, None)
        if future is not None:
            start = time.perf_counter()
            future.result()
            self.stats.fetch_seconds += time.perf_counter() - start

    def _ready(self, key: Key) -> tuple[Weight, Weight]:
        slot = self.where[key]
        self._wait(slot)
        return self.slots[slot]

    def warm(self, keys: list[Key]) -> None:
        """Fill empty slots with these experts, in order (at load, from a profile); not counted as fetches."""
        for key in keys:
            free = next((i for i, o in enumerate(self.owner) if o is None), None)
            if free is None:
                return
            if key not in self.where and key[0] in self.tiers:
                self.owner[free], self.where[key] = key, free
                self.tiers[key[0]].load(key[1], self.slots[free])


class LayerExperts:
    """What an Experts module asks for its weights: one layer's view of the pool."""

    def __init__(self, pool: ExpertPool, layer: int):
        self.pool, self.layer = pool, layer

    def weights(self, active: list[int], rows: int) -> Iterator[tuple[Weight, Weight]]:
        return self.pool.experts(self.layer, active, rows)


def install(
    model,
    read: Callable[[str], tuple[object, tuple]],
    budget: Budget,
    device,
    prior: dict[Key, float] | None = None,
) -> ExpertPool:
    """Give every Experts module of `model` (not yet filled) a slot in one pool; `read(name)` -> the module's
    tier. With a profile (`prior`), the pool starts with its hottest experts."""
    from ..layers.moe import Experts

    tiers, modules = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            layer = int(re.search(r"(?:^|\.)layers\.(\d+)\.", name)[1])
            tiers[layer], modules[layer] = read(name), module
    cfg = model.config
    prior = {k: v for k, v in (prior or {}).items() if k[0] in tiers and k[1] < cfg.num_experts}
    pool = ExpertPool(tiers, cfg.num_experts, cfg.experts_per_token, budget, make_policy("frequency", prior), device)
    for layer, module in modules.items():
        del module.gate_up, module.down  # the slow tier holds them
        module.source = LayerExperts(pool, layer)
    if prior:
        pool.warm(sorted(prior, key=prior.get, reverse=True))
    return pool
