"""Which resident expert to evict: the one with the lowest rank, (layer, expert) pairs compared across layers.

`Frequency` ranks by a usage count that decays with a half-life in steps (one step = one forward pass), so
that it follows a change of topic, ties broken by recency; a profile seeds the counts. `LRU` ranks by
recency alone: the baseline it must beat. Real routing is skewed (a few experts per layer take most tokens),
which recency alone forgets whenever a burst of rare experts passes through.
"""

from __future__ import annotations

Key = tuple[int, int]  # (layer, expert)
HALF_LIFE = 256.0  # steps: long enough to see a skew, short enough to follow a new conversation


class LRU:
    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def use(self, key: Key, clock: int) -> None:
        self.last[key] = clock

    def rank(self, key: Key, clock: int) -> tuple:
        return (self.last.get(key, -1),)


class Frequency:
    name = "frequency"

    def __init__(self, half_life: float = HALF_LIFE, prior: dict[Key, float] | None = None):
        self.decay = 0.5 ** (1 / half_life)
        self.count: dict[Key, tuple[float, int]] = {k: (v, 0) for k, v in (prior or {}).items()}
        self.last: dict[Key, int] = {}

    def value(self, key: Key, clock: int) -> float:
        count, at = self.count.get(key, (0.0, clock))
        return count * self.decay ** (clock - at)

    def use(self, key: Key, clock: int) -> None:
        self.count[key] = (self.value(key, clock) + 1.0, clock)
        self.last[key] = clock

    def rank(self, key: Key, clock: int) -> tuple:
        return (self.value(key, clock), self.last.get(key, -1))


def make_policy(name: str, prior: dict[Key, float] | None = None) -> LRU | Frequency:
    if name == "lru":
        return LRU()
    if name == "frequency":
        return Frequency(prior=prior)
    raise ValueError(f"unknown expert policy '{name}': use frequency or lru")
