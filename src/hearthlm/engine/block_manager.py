"""Paged KV bookkeeping: pools of fixed-size blocks, a block table per sequence, and the prefix cache.

There is one pool per attention window (None = full attention), because a block holds `block_size`
positions of every layer with that window and the windows keep different spans. Sliding-window tables
release blocks that left the window (their entries become None); KV-shared layers have no pool.

Prefix cache: a full block is keyed by a hash of its tokens chained with the previous block's key, so a
key names the whole prefix up to the block's end. Blocks are reference-counted; a released block that
holds a key stays findable ("evictable") until a new allocation needs it, least recently released first.
"Used" blocks are those referenced by a sequence; evictable blocks count as free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from .sequence import Sequence


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: reuse recently freed blocks first
        self.key: dict[int, bytes] = {}  # block -> its prefix key
        self.by_key: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, still keyed; least recently used first
        self.high = 0  # blocks below this id have been handed out before
        self.fresh: list[int] = []  # handed out for the first time since the last take_fresh()

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.num_blocks - self.num_free()

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key.pop(b)]
        if b >= self.high:
            self.high = b + 1
            self.fresh.append(b)
        self.ref[b] = 1
        return b

    def acquire(self, b: int) -> int:
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1
        return b

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        assert self.ref[b] >= 0
        if self.ref[b] == 0:
            if b in self.key:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def offer(self, b: int, key: bytes) -> None:
        """Make the full, computed block b findable under `key` (unless another block already is)."""
        if b not in self.key and key not in self.by_key:
            self.key[b], self.by_key[key] = key, b

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh


class BlockManager:
    def __init__(self, pool_sizes: dict[int | None, int], block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.pools = {w: BlockPool(n) for w, n in pool_sizes.items()}
        self.prefix_caching = prefix_caching

    # -- accounting ------------------------------------------------------------------------------
    def first_block(self, window: int | None, position: int) -> int:
        """The first block a query at `position` reads in a layer with this window."""
        return 0 if window is None else max(0, position - window + 1) // self.block_size

    def blocks_needed(self, seq: Sequence, upto: int) -> dict[int | None, int]:
        """New blocks each pool must hand out so that positions [num_computed, upto) have slots."""
        last = (upto - 1) // self.block_size
        need = {}
        for w in self.pools:
            table = seq.tables.get(w, [])
            start = max(len(table), self.first_block(w, seq.num_computed))
            need[w] = max(0, last + 1 - start)
        return need

    def can_allocate(self, seq: Sequence, upto: int) -> bool:
        return all(n <= self.pools[w].num_free() for w, n in self.blocks_needed(seq, upto).items())

    def allocate(self, seq: Sequence, upto: int) -> bool:
        """Give `seq` slots for positions up to `upto` (exclusive); False, changing nothing, if a pool lacks blocks."""
        last = (upto - 1) // self.block_size
        if all(len(seq.tables.get(w, ())) > last for w in self.pools):  # most decode steps: the slot exists
            return True
        if not self.can_allocate(seq, upto):
            return False
        for w, pool in self.pools.items():
            table = seq.tables.setdefault(w, [])
            first = self.first_block(w, seq.num_computed)
            while len(table) <= last:
                table.append(pool.allocate() if len(table) >= first else None)
        return True

    def trim(self, seq: Sequence) -> None:
        """Release sliding-window blocks that no future query of `seq` reads."""
        for w, pool in self.pools.items():
            if w is None:
                continue
            table = seq.tables.get(w, [])
            for i in range(min(self.first_block(w, seq.num_computed), len(table))):
                if table[i] is not None:
                    pool.release(table[i])
                    table[i] = None

    def truncate(self, seq: Sequence) -> None:
        """Release the blocks past the one that holds position num_computed (where the next token goes): after a
        speculative step, the slots of rejected draft tokens. Their stale K/V in the kept block is never read:
        a position's slot is written before any query reads it."""
        keep = seq.num_computed // self.block_size + 1
        for w, table in seq.tables.items():
            while len(table) > keep:
                b = table.pop()
                if b is not None:
                    self.pools[w].release(b)

    def free(self, seq: Sequence) -> None:
        for w, table in seq.tables.items():
            for b in table:
                if b is not None:
                    self.pools[w].release(b)
        seq.tables = {}

    # -- prefix cache ----------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        bs = self.block_size
        while len(seq.hashes) < n:
            i = len(seq.hashes)
            h = hashlib.blake2b(seq.hashes[-1] if seq.hashes else seq.cache_salt, digest_size=16)
            h.update(np.asarray(seq.tokens[i * bs : (i + 1) * bs], dtype=np.int64).tobytes())
            if seq.media is not None:  # the same placeholder ids with another image must not match
                h.update(seq.media.block_key(i * bs, (i + 1) * bs))
            seq.hashes.append(h.digest())
        return seq.hashes[:n]

    def register(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache."""
        n = seq.num_computed // self.block_size
        if not self.prefix_caching or seq.registered >= n:  # most steps: no block was completed
            return
        keys = self._hashes(seq, n)
        for i in range(seq.registered, n):
            for w, pool in self.pools.items():
                table = seq.tables.get(w, [])
                if i < len(table) and table[i] is not None:
                    pool.offer(table[i], keys[i])
        seq.registered = max(seq.registered, n)

    def _covered(self, w: int | None, keys: list[bytes], n: int) -> bool:
        pool = self.pools[w]
        return all(k in pool.by_key for k in keys[self.first_block(w, n * self.block_size) : n])

    def match_prefix(self, seq: Sequence) -> int:
        """The longest block-aligned prefix (leaving at least one token to compute) whose K/V every pool
        still holds: all of it for full attention, its last window for sliding layers. 0 if none."""
        if not self.prefix_caching or seq.num_computed or seq.tables:
            return 0
        keys = self._hashes(seq, (len(seq.tokens) - 1) // self.block_size)
        n = len(keys)
        if None in self.pools:
            by_key = self.pools[None].by_key
            n = next((i for i, k in enumerate(keys) if k not in by_key), n)
        while n > 0 and not all(self._covered(w, keys, n) for w in self.pools):
            n -= 1
        return n * self.block_size

    def take_prefix(self, seq: Sequence, length: int) -> None:
        """Reference the cached blocks of the first `length` tokens (from match_prefix) in seq's tables."""
        n = length // self.block_size
        for w, pool in self.pools.items():
            first = self.first_block(w, length)
            seq.tables[w] = [pool.acquire(pool.by_key[seq.hashes[i]]) if i >= first else None for i in range(n)]
        seq.num_computed = length
        seq.registered = n

    def touched(self) -> dict[int | None, int]:
        """Per pool, the blocks ever handed out. Blocks go out lowest id first and freed ones are reused before
        new ones, so this is the pool's high-water mark: the part of its memory that has been written."""
        return {w: p.high for w, p in self.pools.items()}

    def stats(self) -> tuple[int, int]:
        """(blocks in all pools, blocks referenced by sequences)."""
        return sum(p.num_blocks for p in self.pools.values()), sum(p.num_used() for p in self.pools.values())
