"""The pool: a fixed number of expert slots in fast memory shared by all MoE layers, filled from the slow tier.

Each layer step asks for the experts its batch routes to (one fetch serves every token routed there) and gets
them in ascending expert order, the order of the resident path, so the sums, and the logits, are identical.
A miss takes the slot of the resident expert that the policy (policy.py) scores farthest from its next use,
outside the current step, if the miss itself is expected back sooner; otherwise it is computed from the slow
tier once without a slot (from the mapped file itself where its bytes run as stored: zero copy). Those pages
stay mapped: they are the page cache's, which the OS keeps or reclaims as memory allows (unmapping them would
free nothing and cost a page fault per 4-64 KiB at the next use: 1.5 ms instead of 0.5 for a 26B-A4B expert).

With a fetch thread (ahead.py, off by default) a step's misses are read while the layer computes: from its
router's output on, and optionally the next layer's forecast experts (prefetch) into slots reserved until that
layer's step; a wrong forecast costs only bytes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .budget import Budget, BudgetError, human_bytes
from .policy import LRU, Key, NextUse
from .stats import MoEStats
from .tier import CheckpointTier, HostTier, Weight, empty_like, layout, nbytes

Tier = CheckpointTier | HostTier


class ExpertPool:
    def __init__(
        self,
        tiers: dict[int, Tier],
        num_experts: int,
        top_k: int,
        budget: Budget,
        policy: LRU | NextUse,
        device,
    ):
        self.owned = budget.owned(num_experts)  # the experts of each layer this pool serves (all but under --ep)
        self.tiers, self.layers = tiers, sorted(tiers)
        self.row = {layer: i for i, layer in enumerate(self.layers)}  # position in the forward pass
        self.num_experts, self.top_k = num_experts, top_k
        template = tiers[self.layers[0]].read(0)
        for layer in self.layers[1:]:
            _same_format(template, tiers[layer].read(0), layer)
        self.expert_bytes = sum(nbytes(w) for w in template)
        total = self.expert_bytes * len(self.owned) * len(tiers)
        given = budget.resolve(total)
        count = min(given // self.expert_bytes, len(self.owned) * len(tiers))
        if count < min(top_k, len(self.owned)):
            need = min(top_k, len(self.owned)) * self.expert_bytes
            raise BudgetError(
                f"expert budget {budget}{f' ({human_bytes(given)})' if budget.fraction else ''} holds {count} "
                f"expert(s); one layer's top-{top_k} "
                f"experts need at least {need} bytes ({human_bytes(need)}, {need / total:.2%} of the "
                f"{human_bytes(total)} of experts)"
            )
        self.storage = tuple(empty_like(w, count, device) for w in template)
        self.slots: list[tuple[Weight, Weight]] = [(self.storage[0][i], self.storage[1][i]) for i in range(count)]
        self.slot_row = np.full(count, -1)  # row of the expert in each slot, -1: free
        self.slot_expert = np.zeros(count, dtype=np.int64)
        self.where: dict[Key, int] = {}
        self.pending: dict[int, Future] = {}  # slot -> its fetch on the fetch thread
        self.reserved: dict[Key, int] = {}  # prefetched, until its layer's step says whether it was used
        self.executor: ThreadPoolExecutor | None = None  # the fetch thread (start_thread)
        self.scratch: list[tuple[Weight, Weight]] = []
        self.planned: tuple | None = None  # (layer, active, reads) of an announced step
        self.fixed_shape = False  # moe/private.py: pad each step's reads with decoys to a routing-free count
        self.decoy: tuple[Weight, Weight] | None = None  # where decoys are read to (and thrown away)
        self.decoy_rng = np.random.default_rng()
        self.start: list[Key] = []  # what the pool holds after the load (install; moe/private.reset goes back)
        self.stats = MoEStats(slots=count, expert_bytes=self.expert_bytes)
        self.set_policy(policy)

    def set_policy(self, policy: LRU | NextUse) -> None:
        policy.bind(self.row, self.num_experts, self.top_k)
        self.policy = policy

    def snapshot(self) -> MoEStats:
        resident: dict[int, int] = dict.fromkeys(self.tiers, 0)
        for layer, _ in list(self.where):  # one C-level copy: safe beside the engine's thread
            resident[layer] += 1
        return MoEStats(**{**self.stats.__dict__, "resident": resident})

    def reset_stats(self) -> None:
        self.stats = MoEStats(slots=len(self.slots), expert_bytes=self.expert_bytes)

    def experts(
        self, layer: int, active: list[int], counts: list[int], tokens: int | None = None
    ) -> Iterator[tuple[Weight, Weight]]:
        """(gate_up, down) of each expert in `active` (ascending; `counts`: the tokens routed to each; `tokens`:
        the step's tokens, by default sum(counts) / top_k, which undercounts where the pool serves some of the
        experts), valid while the caller uses it."""
        planned, self.planned = self.planned, None
        assert planned is None or planned[:2] == (layer, active), "an announced step that did not run"
        ahead = planned[2] if planned else self._start(layer, active, counts, tokens)
        for e in active:
            slot = self.where.get((layer, e))
            if slot is not None:
                yield self._ready(slot)
            elif e in ahead:
                future, i = ahead[e]
                self._wait_for(future)
                yield self.scratch[i]
            else:  # not worth a slot: straight from the slow tier
                start = time.perf_counter()
                weights = self.tiers[layer].read(e)
                self.stats.fetch_seconds += time.perf_counter() - start
                yield weights

    def announce(self, layer: int, active: list[int], counts: list[int], tokens: int | None = None) -> None:
        """`layer`'s routing before its experts run (its router's output; ahead.py): the step starts now, so
        that the fetch thread reads its misses while the layer computes what comes between."""
        self.planned = (layer, active, self._start(layer, active, counts, tokens))

    def _start(
        self, layer: int, active: list[int], counts: list[int], tokens: int | None
    ) -> dict[int, tuple[Future, int]]:
        """Count the step, give its misses slots or not, and start their reads where a fetch thread runs;
        -> the misses read into scratch buffers (expert -> (read, buffer))."""
        s = self.stats
        tokens = sum(counts) // self.top_k if tokens is None else tokens
        if layer == self.layers[0]:
            s.tokens += tokens
        row = self.row[layer]
        self.policy.visit(row, active, counts, tokens)
        self._settle_prefetch(layer, active)
        misses = [e for e in active if (layer, e) not in self.where]
        s.hits += len(active) - len(misses)
        s.misses += len(misses)
        s.bytes_fetched += len(misses) * self.expert_bytes
        keep = {self.where[(layer, e)] for e in active if (layer, e) in self.where}
        placed = dict(self._place(row, misses, keep))
        s.transient += len(misses) - len(placed)
        if self.fixed_shape:
            self._decoys(layer, misses, tokens)
        # Misses without a slot are read ahead into scratch buffers, unless they run from the mapping in place
        # (a read into a buffer costs more than computing from the page cache).
        scratch = iter(range(0 if getattr(self.tiers[layer], "in_place", False) else len(self.scratch)))
        ahead = {}
        for e in misses:  # in the order of use
            if e in placed:
                self._fetch((layer, e), placed[e], background=self.executor is not None)
            elif (i := next(scratch, None)) is not None:
                ahead[e] = self.executor.submit(self.tiers[layer].load, e, self.scratch[i]), i
        return ahead

    def _decoys(self, layer: int, misses: list[int], tokens: int) -> None:
        """Read decoys, experts drawn uniformly from those this step does not read, until the step has read
        min(experts, top_k x tokens): what it reads no longer depends on its routing or on the pool."""
        target = min(len(self.owned), self.top_k * max(1, tokens))
        others = np.setdiff1d(np.arange(self.owned.start, self.owned.stop), misses)
        picks = self.decoy_rng.choice(others, size=max(0, target - len(misses)), replace=False)
        start = time.perf_counter()
        for e in picks.tolist():
            self._wait_all()  # the decoy buffer is one: no fetch thread may be writing it
            self.tiers[layer].load(e, self.decoy)
        self.stats.fetch_seconds += time.perf_counter() - start
        self.stats.decoys += len(picks)
        self.stats.bytes_fetched += len(picks) * self.expert_bytes

    def _wait_all(self) -> None:
        for slot in list(self.pending):
            self._wait(slot)

    def start_thread(self) -> None:
        """Fetch on a thread: a step's misses while it computes what comes before them (the misses not worth a
        slot into top_k scratch buffers, beyond the budget), and forecasts (ahead.py)."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="hearth-fetch")
            storage = tuple(empty_like(w, self.top_k) for w in self.slots[0])
            self.scratch = [(storage[0][i], storage[1][i]) for i in range(self.top_k)]

    def stop_thread(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor, self.scratch = None, []

    def forecast(self, layer: int, predicted: list[int], busy: list[Key]) -> None:
        """The experts that `layer`'s next step is predicted to use (ahead.py): with a fetch thread, those
        missing are fetched in the background, into slots that neither the running step's experts (`busy`) nor
        earlier prefetches hold."""
        if self.executor is None:
            return
        row, s = self.row[layer], self.stats
        misses = [e for e in predicted if (layer, e) not in self.where]
        keep = {self.where[k] for k in busy + [(layer, e) for e in predicted] if k in self.where}
        for e, slot in self._place(row, misses, keep, s.prefetch_accuracy):
            self._fetch((layer, e), slot, background=True)
            self.reserved[(layer, e)] = slot
            s.prefetches += 1
            s.prefetch_bytes += self.expert_bytes
            s.bytes_fetched += self.expert_bytes

    def _settle_prefetch(self, layer: int, active: list[int]) -> None:
        for key in [k for k in self.reserved if k[0] == layer]:
            del self.reserved[key]
            if key[1] in active:
                self.stats.prefetch_used += 1

    def _place(self, row: int, misses: list[int], keep: set[int], hit: float | None = None) -> list[tuple[int, int]]:
        """(expert, slot) for the misses worth a slot: each best remaining miss against the worst resident
        outside `keep` and the reserved slots, unless the miss is expected back later (a free slot always)."""
        if not misses:
            return []
        keep = keep | set(self.reserved.values())
        free = np.ones(len(self.slots), dtype=bool)
        free[list(keep)] = False
        candidates = np.flatnonzero(free)
        scores = np.full(len(candidates), np.inf)
        held = self.slot_row[candidates] >= 0
        scores[held] = self.policy.scores(self.slot_row[candidates[held]], self.slot_expert[candidates[held]])
        victims = np.argsort(-scores, kind="stable")
        wanted = self.policy.scores(np.full(len(misses), row), np.array(misses), hit)
        placed = []
        for i, j in enumerate(np.argsort(wanted, kind="stable")):
            if i == len(victims) or wanted[j] > scores[victims[i]]:
                break
            placed.append((misses[j], int(candidates[victims[i]])))
        return placed

    def _assign(self, key: Key, slot: int) -> None:
        self._wait(slot)  # a fetch still writing this slot
        old = self.owner(slot)
        if old is not None:
            del self.where[old]
        self.where[key] = slot
        self.slot_row[slot], self.slot_expert[slot] = self.row[key[0]], key[1]

    def _fetch(self, key: Key, slot: int, background: bool) -> None:
        self._assign(key, slot)
        layer, e = key
        if background:
            self.pending[slot] = self.executor.submit(self.tiers[layer].load, e, self.slots[slot])
        else:
            start = time.perf_counter()
            self.tiers[layer].load(e, self.slots[slot])
            self.stats.fetch_seconds += time.perf_counter() - start

    def owner(self, slot: int) -> Key | None:
        row = self.slot_row[slot]
        return None if row < 0 else (self.layers[row], int(self.slot_expert[slot]))

    def _wait(self, slot: int) -> None:
        future = self.pending.pop(slot, None)
        if future is not None:
            self._wait_for(future)

    def _wait_for(self, future: Future) -> None:
        start = time.perf_counter()
        future.result()
        self.stats.fetch_seconds += time.perf_counter() - start

    def _ready(self, slot: int) -> tuple[Weight, Weight]:
        self._wait(slot)
        return self.slots[slot]

    def warm(self, keys: list[Key]) -> None:
        """Fill empty slots with these experts, in order (at load, from a profile); not counted as fetches."""
        for key in keys:
            free = np.flatnonzero(self.slot_row < 0)
            if not len(free):
                return
            if key not in self.where and key[0] in self.tiers:
                self._assign(key, int(free[0]))
                self.tiers[key[0]].load(key[1], self.slots[int(free[0])])


def _same_format(a: tuple[Weight, Weight], b: tuple[Weight, Weight], layer: int) -> None:
    if [layout(w) for w in a] != [layout(w) for w in b]:
        raise BudgetError(
            f"the experts of MoE layer {layer} are stored in another format than the first layer's "
            f"({[layout(w) for w in b]} vs {[layout(w) for w in a]}): one pool of slots cannot hold both; "
            "load the model without an expert budget"
        )


class LayerExperts:
    """What an Experts module asks for its weights: one layer's view of the pool."""

    def __init__(self, pool: ExpertPool, layer: int):
        self.pool, self.layer = pool, layer

    def weights(
        self, active: list[int], counts: list[int], tokens: int | None = None
    ) -> Iterator[tuple[Weight, Weight]]:
        return self.pool.experts(self.layer, active, counts, tokens)


def install(
    model,
    read: Callable[[str], Tier],
    budget: Budget,
    device,
    prior: dict[Key, float] | None = None,
) -> ExpertPool:
    """Give every Experts module of `model` (not yet filled) a slot in one pool; `read(name)` -> the module's
    tier. With a profile (`prior`), the pool starts with its hottest experts; with room for all, with all."""
    from ..layers.moe import Experts

    tiers, modules = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            layer = int(re.search(r"(?:^|\.)layers\.(\d+)\.", name)[1])
            tiers[layer], modules[layer] = read(name), module
    cfg = model.config
    owned = budget.owned(cfg.num_experts)
    prior = {k: v for k, v in (prior or {}).items() if k[0] in tiers and k[1] in owned}
    pool = ExpertPool(tiers, cfg.num_experts, cfg.experts_per_token, budget, NextUse(prior=prior), device)
    for layer, module in modules.items():
        del module.gate_up, module.down  # the slow tier holds them
        module.source = LayerExperts(pool, layer)
    if len(pool.slots) == len(owned) * len(tiers):  # a budget that holds them all: fill it now
        pool.start = [(layer, e) for layer in pool.layers for e in owned]
    elif prior:
        pool.start = sorted(prior, key=prior.get, reverse=True)
    pool.warm(pool.start)
    return pool
