"""Continuous batching: which sequences compute how many tokens in the next step.

Every running sequence with one pending token decodes (all of them in one batched forward), or, when it has a
draft (engine/speculative.py) and free slots for it, verifies its last token and the draft together; sequences
with more pending tokens (a prompt, or a preempted sequence's prompt + output) prefill up to
`prefill_chunk` tokens per step in total, so long prompts never stall the decodes. New requests join
between steps while there is room. When a pool runs out of blocks the youngest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.

Isolated clients (`isolate`, `hearth serve --isolate-clients`): a step computes the sequences of one client
only, and the client changes only between steps, when the current one has no work left or has had TURN steps
while another waits (the client whose last turn is oldest goes next). Then `on_switch` runs: the engine puts the
expert pool back to its state at load, so no client's hits, misses or step times depend on another's routing.
Cost: no batching across clients, and each change of client starts from a cold pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence


@dataclass
class Work:
    seq: Sequence
    n: int  # tokens to compute this step, from seq.num_computed
    draft: list[int] = field(default_factory=list)  # speculative: the n - 1 drafted tokens after the last token


TURN = 32  # steps a client keeps the engine while another waits: a switch costs a cold expert pool


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
        self.on_switch: Callable[[], None] | None = None  # set: clients isolated (see the module docstring)
        self.client: str | None = None  # whose sequences run, when isolated
        self.turn = 0  # steps of the current client's turn
        self._last_turn: dict[str | None, int] = {}  # client -> the step its latest turn began
        self._steps = 0

    def isolate(self, on_switch: Callable[[], None]) -> None:
        """Run one client's sequences per step; `on_switch()` between two clients' steps."""
        self.on_switch = on_switch

    def eligible(self, seq: Sequence) -> bool:
        """Whether `seq` may compute in the coming step."""
        return self.on_switch is None or seq.client == self.client

    def pick_client(self) -> None:
        """Before each step of an isolating scheduler: keep the client, or hand the engine to the next one."""
        if self.on_switch is None:
            return
        self._steps += 1
        clients = list(dict.fromkeys(s.client for s in [*self.running, *self.waiting]))
        if self.client in clients and (self.turn < TURN or clients == [self.client]):
            self.turn += 1
            return
        others = [c for c in clients if c != self.client]
        if not others:
            return
        nxt = min(others, key=lambda c: self._last_turn.get(c, -1))  # stable: ties go to the oldest work
        self.client, self.turn = nxt, 1
        self._last_turn[nxt] = self._steps
        self.on_switch()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Work]:
        work: list[Work] = []
        budget = self.prefill_chunk
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not self.eligible(seq):
                i += 1
                continue
            n = self._chunk(seq, budget)
            draft, seq.draft = seq.draft, []
            if draft and seq.pending == 1 and self.blocks.allocate(seq, seq.num_computed + 1 + len(draft)):
                work.append(Work(seq, 1 + len(draft), draft))  # verified only where its slots are free
            elif n and self._make_room(seq, seq.num_computed + n):
                work.append(Work(seq, n))
                budget -= n if seq.pending > 1 else 0
            if i < len(self.running) and self.running[i] is seq:
                i += 1
        for seq in [s for s in self.waiting if self.eligible(s)]:  # in order; isolated: the client's own
            if len(self.running) >= self.max_running or budget <= 0 or not self._admit(seq, budget):
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
        self.waiting.remove(seq)
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
