"""Continuous batching: which sequences compute how many tokens in the next step.

Every running sequence with one pending token decodes (all of them in one batched forward), or, when it has a
draft (engine/speculative.py) and free slots for it, verifies its last token and the draft together; sequences
with more pending tokens (a prompt, or a preempted sequence's prompt + output) prefill up to
`prefill_chunk` tokens per step in total, so long prompts never stall the decodes. New requests join
between steps while there is room. When a pool runs out of blocks the youngest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence


@dataclass
class Work:
    seq: Sequence
    n: int  # tokens to compute this step, from seq.num_computed
    draft: list[int] = field(default_factory=list)  # speculative: the n - 1 drafted tokens after the last token


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, prefill_chunk: int):
        self.blocks = blocks
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the youngest
        self.preemptions = 0
        self.prefix_hit_tokens = 0
        self._admitted = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Work]:
        work: list[Work] = []
        budget = self.prefill_chunk
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = self._chunk(seq, budget)
            draft, seq.draft = seq.draft, []
            if draft and seq.pending == 1 and self.blocks.allocate(seq, seq.num_computed + 1 + len(draft)):
                work.append(Work(seq, 1 + len(draft), draft))  # verified only where its slots are free
            elif n and self._make_room(seq, seq.num_computed + n):
                work.append(Work(seq, n))
                budget -= n if seq.pending > 1 else 0
            if i < len(self.running) and self.running[i] is seq:
                i += 1
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            n = self._chunk(seq, budget)
            work.append(Work(seq, n))
            budget -= n if seq.pending > 1 else 0
        return work

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens `seq` computes this step: one to decode, else up to `budget` of its pending tokens, moved so that
        no image's or audio clip's soft tokens are split across chunks (they may attend to each other)."""
        n = 1 if seq.pending == 1 else min(seq.pending, budget)
        if seq.media is None or n == 0:
            return n
        return seq.media.chunk_end(seq.num_computed, seq.num_computed + n) - seq.num_computed

    def _make_room(self, seq: Sequence, upto: int) -> bool:
        """Allocate slots up to `upto`, preempting the youngest sequences if needed (possibly seq itself)."""
        while not self.blocks.allocate(seq, upto):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> bool:
        hit = self.blocks.match_prefix(seq)
        if hit:
            self.blocks.take_prefix(seq, hit)
        n = self._chunk(seq, budget)
        if not self.blocks.allocate(seq, seq.num_computed + n):
            self.blocks.free(seq)
            seq.num_computed = seq.registered = 0
            return False
        self.waiting.popleft()
        self.running.append(seq)
        self._admitted += 1
        seq.order = self._admitted
        self.prefix_hit_tokens += hit
        if not seq.admitted:
            seq.admitted, seq.cached_tokens = True, min(hit, len(seq.prompt))
        return True

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = seq.registered = 0
        seq.draft = []
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) wherever it is, freeing its blocks."""
        if seq in self.running:
            self.blocks.register(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def after_step(self, work: list[Work]) -> None:
        for w in work:
            if w.seq.finish_reason is None:
                self.blocks.register(w.seq)
                self.blocks.trim(w.seq)
