"""Aggregate expert-residency counters (no per-request expert ids: safe to export as metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoEStats:
    """Totals since load (or the last reset). A use is one expert run by one layer in one step, however
    many tokens of the batch it serves: uses = hits + misses."""

    hits: int = 0
    misses: int = 0
    transient: int = 0  # misses computed from the slow tier without taking a slot
    bytes_fetched: int = 0  # every byte read from the slow tier: misses', prefetches' and decoys'
    fetch_seconds: float = 0.0  # time the forward pass waited on fetches
    prefetches: int = 0  # experts fetched ahead of their layer's step
    prefetch_used: int = 0  # of them, used by that step
    prefetch_bytes: int = 0
    decoys: int = 0  # experts read only to hide which were needed (fixed-shape fetching, moe/private.py)
    tokens: int = 0  # token positions that went through the MoE layers
    slots: int = 0  # experts the pool holds
    expert_bytes: int = 0  # of one expert (gate_up + down) in its running format
    resident: dict[int, int] = field(default_factory=dict)  # layer -> experts resident now

    @property
    def uses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_fetched / self.tokens if self.tokens else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched experts that their step used (0.5 before any prefetch settled)."""
        settled = self.prefetches
        return self.prefetch_used / settled if settled else 0.5

    def summary(self, seconds: float | None = None) -> str:
        """One line for people; `seconds`: the wall time the counters cover, for the fetch share."""
        share = f", fetch {self.fetch_seconds / seconds:.0%} of the time" if seconds else ""
        if self.prefetches:
            share += f", prefetch {self.prefetch_used}/{self.prefetches} used"
        per_layer = sorted(set(self.resident.values()))
        resident = f"{per_layer[0]}-{per_layer[-1]}" if len(per_layer) > 1 else f"{per_layer[0] if per_layer else 0}"
        return (
            f"experts: hit rate {self.hit_rate:.1%} ({self.hits} hits, {self.misses} misses), "
            f"{self.bytes_per_token / 1e6:.2f} MB fetched per token{share}, "
            f"{self.slots} slots ({resident} resident per layer)"
        )
