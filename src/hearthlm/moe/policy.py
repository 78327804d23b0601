"""Which resident expert to evict: the one with the lowest rank, (layer, expert) pairs compared across layers.

`Frequency` (ours) keeps first the experts that each layer used at its latest step: routing repeats from one
token to the next, and those are what the next visit of that layer most likely needs. After them it ranks by a
usage count that decays with a half-life in steps (one step = one forward pass), so that it follows a change of
topic, ties broken by recency; a profile seeds the counts. `LRU` ranks by recency alone: the baseline. In a
pool shared by layers that run in a cycle, recency alone also keeps experts used once in a burst over the few
experts that most tokens of a layer go to (real routing is skewed), which the counts remember.
"""

from __future__ import annotations

from collections.abc import Iterable

Key = tuple[int, int]  # (layer, expert)
HALF_LIFE = 256.0  # steps: long enough to see a skew, short enough to follow a new conversation


class LRU:
    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def bind(self, layers: Iterable[int]) -> None:
        pass

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
        self.order: dict[int, int] = {}  # layer -> its place in the forward pass
        self.layer: int | None = None  # the layer running now

    def bind(self, layers: Iterable[int]) -> None:
        self.order = {layer: i for i, layer in enumerate(sorted(layers))}

    def value(self, key: Key, clock: int) -> float:
        count, at = self.count.get(key, (0.0, clock))
        return count * self.decay ** (clock - at)

    def use(self, key: Key, clock: int) -> None:
        self.count[key] = (self.value(key, clock) + 1.0, clock)
        self.last[key] = clock
        self.layer = key[0]

    def rank(self, key: Key, clock: int) -> tuple:
        last = self.last.get(key, -1)
        layer = key[0]
        # The latest step of this layer: this one if it already ran in this forward pass, else the previous one.
        latest = clock if self.layer is None or self.order.get(layer, 0) <= self.order.get(self.layer, 0) else clock - 1
        return (last == latest, self.value(key, clock), last)


def make_policy(name: str, prior: dict[Key, float] | None = None) -> LRU | Frequency:
    if name == "lru":
        return LRU()
    if name == "frequency":
        return Frequency(prior=prior)
    raise ValueError(f"unknown expert policy '{name}': use frequency or lru")
