"""Aggregate expert-residency counters (no per-request expert ids: safe to export as metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoEStats:
    """Totals since load (or the last reset). A use is one expert run by one layer in one step, however
    many tokens of the batch it serves: uses = hits + misses."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    fetch_seconds: float = 0.0  # time the forward pass waited on fetches
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

    def summary(self, seconds: float | None = None) -> str:
        """One line for people; `seconds`: the wall time the counters cover, for the fetch share."""
        share = f", fetch {self.fetch_seconds / seconds:.0%} of the time" if seconds else ""
        per_layer = sorted(set(self.resident.values()))
        resident = f"{per_layer[0]}-{per_layer[-1]}" if len(per_layer) > 1 else f"{per_layer[0] if per_layer else 0}"
        return (
            f"experts: hit rate {self.hit_rate:.1%} ({self.hits} hits, {self.misses} misses), "
            f"{self.bytes_per_token / 1e6:.2f} MB fetched per token{share}, "
            f"{self.slots} slots ({resident} resident per layer)"
        )
