"""Which resident expert to evict, and whether a missed one is worth a slot: a score per expert, the expected
distance to its next use; the largest goes first, and a miss whose own score is larger than every victim's runs
once from the slow tier without a slot (admission).

The pool is shared by MoE layers that run in a fixed cycle of n layer steps (one forward pass). Belady's rule
evicts the expert used farthest in the future; `NextUse` (ours) estimates that distance. An expert of the
layer d steps ahead (d = n for the layer running now) is next needed at d + n*(v - 1), v the number of visits
of its layer until one uses it. A token uses it with probability p: the tokens routed to it over its layer's
tokens, both decaying with a half-life, seeded by a profile, and shrunk towards the uniform top_k / experts
while they are few. Routing repeats from one token to the next (on the demo model 45% of a layer's experts
are used again by the next token, against 38% at any later one), so the visit right after a use has its own
probability, the repeat rate r (uses of the experts that the previous visit used, over those experts). So
E[v] = 1 + (1 - q) / p, q = r after a use, else p. Batch-1 decode: a visit is a token.

`LRU` scores by recency alone: the baseline. Both work on rows: layer positions in the forward pass.
"""

from __future__ import annotations

import numpy as np

Key = tuple[int, int]  # (layer, expert)
HALF_LIFE = 256.0  # tokens: long enough to see a skew, short enough to follow a new conversation


class LRU:
    """Recency with a clock per forward pass, ties by slot: a clock per layer step does worse (with fewer
    slots than one pass uses, every layer finds its experts evicted by the layers between)."""

    def bind(self, rows: dict[int, int], experts: int, top_k: int) -> None:
        self.last = np.full((len(rows), experts), -1.0)
        self.clock = 0

    def visit(self, row: int, active: list[int], counts: list[int], tokens: int | None = None) -> None:
        self.clock += row == 0
        self.last[row, active] = self.clock

    def scores(self, rows: np.ndarray, experts: np.ndarray, hit: float | None = None) -> np.ndarray:
        return -self.last[rows, experts]


class NextUse:
    PRIOR = 16.0  # pseudo-tokens at the uniform rate: until a layer has seen a few dozen, recency decides

    def __init__(self, half_life: float = HALF_LIFE, prior: dict[Key, float] | None = None):
        self.decay = 0.5 ** (1 / half_life)
        self.prior = prior or {}

    def bind(self, rows: dict[int, int], experts: int, top_k: int) -> None:
        """`rows`: layer -> its position in the forward pass."""
        self.top_k = top_k
        self.n = layers = len(rows)
        self.uses = np.zeros((layers, experts))  # decayed tokens routed per (row, expert)
        self.tokens = np.zeros(layers)  # decayed tokens per row
        self.latest = np.zeros((layers, experts), dtype=bool)  # used by its row's latest visit
        self.repeats = self.repeatable = 0.0  # decayed uses of the experts the previous visit used, of those
        self.row = 0  # the row visited last
        self.base = top_k / experts  # the use probability before any data
        steady = 1 / (1 - self.decay)
        for (layer, e), count in self.prior.items():
            if layer in rows:
                self.uses[rows[layer], e] = count
                self.tokens[rows[layer]] = steady

    def visit(self, row: int, active: list[int], counts: list[int], tokens: int | None = None) -> None:
        """`tokens`: the visit's tokens, by default sum(counts) / top_k (every expert of the row counted)."""
        self.repeats = self.decay * self.repeats + self.latest[row, active].sum()
        self.repeatable = self.decay * self.repeatable + self.latest[row].sum()
        tokens = sum(counts) / self.top_k if tokens is None else tokens
        d = self.decay**tokens
        self.uses[row] *= d
        self.uses[row, active] += counts
        self.tokens[row] = d * self.tokens[row] + tokens
        self.latest[row] = False
        self.latest[row, active] = True
        self.row = row

    def scores(self, rows: np.ndarray, experts: np.ndarray, hit: float | None = None) -> np.ndarray:
        """Expected layer steps from now to the next use of each (row, expert); `hit`: the probability of a use
        at the next visit where something else tells it (a prefetch's accuracy)."""
        ahead = (rows - self.row - 1) % self.n + 1  # 1 for the next row, n for the row just visited
        p = (self.uses[rows, experts] + self.PRIOR * self.base) / (self.tokens[rows] + self.PRIOR)
        r = (self.repeats + self.base) / (self.repeatable + 1.0)
        q = hit if hit is not None else np.where(self.latest[rows, experts], r, p)
        return ahead + self.n * (1.0 - q) / p
