"""Speculative decoding: a drafter proposes up to k next tokens per sequence, one target forward scores the last
token and the draft together (runner.run_verify), and the engine keeps the longest prefix the target agrees
with plus one token of the target's own, then rolls the KV cache back to what it kept.

Lossless: greedy keeps a draft token only if it is the target's argmax. Sampling keeps a draft token t with
probability p(t) under the target's processed distribution (temperature, top-k/p, min-p, penalties, grammar)
and on rejection samples from p with t removed (speculative sampling for a draft that is a point mass), so
every emitted token has exactly the target's distribution. The engine walks the positions in order, so
penalties, grammars, stop strings and max_tokens see each kept token before the next one is judged.

Adaptive: each sequence's draft length follows its acceptance, and a credit account (see Adaptive) stops drafting
for a sequence while its drafts cost more than they save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .sampler import SamplingParams, draw, filter_logits

if TYPE_CHECKING:
    from .sequence import Sequence

__all__ = ["DRAFT_CHOICES", "Adaptive", "Drafter", "SpecState", "judge", "make_drafter"]

DRAFT_CHOICES = ("auto", "lookup", "off")  # what `draft=` and `--draft` take by name (None means "off"), or a folder


class Drafter(Protocol):
    """Proposes draft tokens. `propose` gets the sequences that may draft this step and, for each, the most tokens
    it may propose (>= 1); it returns a list of at most that many token ids per sequence (empty: no draft).
    Per-sequence state goes in `seq.spec.state`, which lives as long as the sequence. Optional: `bind(cache)`
    returns the drafter an engine with this paged KV cache uses; `reads_hidden` asks the runner to keep each
    sequence's target hidden states (Sequence.hidden)."""

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]: ...


def make_drafter(draft: str | Path | Drafter | None, llm: Any = None) -> Drafter | None:
    """The drafter `draft` names: "lookup" (prompt lookup), None or "off" (no drafting), a Drafter itself, or a
    model drafter for `llm`: the folder of a Gemma 4 -assistant checkpoint, or "auto" (the -assistant drafter
    stored beside the model, else prompt lookup). Without `llm` a folder or "auto" is only checked (None)."""
    if draft is None or draft == "off":
        return None
    if draft == "lookup":
        from .lookup import PromptLookup

        return PromptLookup()
    if isinstance(draft, (str, Path)):
        if draft != "auto" and not Path(draft).expanduser().is_dir():
            choices = ", ".join(repr(c) for c in DRAFT_CHOICES)
            raise ValueError(
                f"unknown draft {draft!r}: choose one of {choices}, None (off), the folder of a drafter checkpoint "
                "(e.g. gemma-4-E2B-it-assistant), or an object with propose()"
            )
        if llm is None:
            return None
        from .mtp import mtp_drafter

        return mtp_drafter(draft, llm) or make_drafter("lookup")
    if not callable(getattr(draft, "propose", None)):
        raise ValueError(f"unknown draft {draft!r}: give a name, a drafter folder, or an object with propose()")
    return draft


@dataclass(frozen=True)
class Adaptive:
    """How the draft length and the on/off switch follow acceptance: a credit account per sequence, in tokens.

    A try (one verified draft) earns 1 per accepted token and pays what it slowed the step by, in tokens of the
    step's rows: `try_cost` of a plain step for leaving the one-row path, shared by the sequences that drafted in
    that step but paid for every decode row in it, plus `row_cost` (and the drafter's own `cost_per_token`, if it
    has one) per drafted token. While the credit is negative the sequence decodes plainly, and each plain step
    earns back `earn`. So drafting continues while it pays on balance, stops within a try or two when it does
    not, and a sequence whose every draft is rejected spends at most `start` plus about `earn` per plain step:
    the worst case's slowdown. The credit is capped at `cap`, so a good stretch cannot pay for a long bad one.

    The costs were measured on the demo model on CPU (docs/speculative.md): at batch 1 a step of two rows costs
    1.47 plain steps; at batch 4 one extra row costs 0.42 of the step (1.7 tokens) and four extra rows 0.37.
    Drafting at batch 4 pays there only on long accepted runs. `row_cost=0` with `try_cost=0` never stops
    drafting (tests, benchmarks)."""

    k_max: int = 8  # the most tokens drafted per step
    k_start: int = 3
    try_cost: float = 0.4  # a verify step's cost over a plain one, in plain steps, before its extra rows
    row_cost: float = 0.1  # each drafted token's row, in plain steps
    earn: float = 0.01  # credit a plain step earns back: the worst case's slowdown, about
    start: float = 3.0  # credit a sequence starts with: about six failed one-token tries
    cap: float = 4.0  # the most credit kept
    fit_rows: bool = True  # on CPU, trim drafts so that a step's rows fit one fused decode forward (Engine._fit_rows)

    def __post_init__(self) -> None:
        ok = 1 <= self.k_start <= self.k_max and min(self.row_cost, self.try_cost) >= 0 and self.earn > 0
        if not (ok and 0 <= self.start <= self.cap):
            raise ValueError(f"Adaptive: inconsistent settings {self}")

    def cost(self, drafted: int, rows_per_try: float, drafter_cost: float) -> float:
        """A try's cost in tokens: `rows_per_try` decode rows of its step per sequence that drafted in it."""
        return self.try_cost * rows_per_try + (self.row_cost + drafter_cost) * drafted


@dataclass
class SpecState:
    """One sequence's drafting: its drafter, current draft length, credit (see Adaptive) and totals."""

    drafter: Drafter
    policy: Adaptive
    k: int = 0
    credit: float | None = None
    tries: int = 0
    drafted: int = 0
    accepted: int = 0
    state: Any = None  # the drafter's own (prompt lookup: its n-gram index)

    def __post_init__(self) -> None:
        self.k = self.k or self.policy.k_start
        self.credit = self.policy.start if self.credit is None else self.credit

    def budget(self, seq: Sequence) -> int:
        """Tokens `seq` may draft now: 0 while its credit is negative (this plain step earns some back); never past
        max_tokens (one token of each step is the target's own) nor past the sequence's length limit (every
        drafted position needs a KV slot)."""
        if self.credit < 0:
            self.credit += self.policy.earn
            return 0
        return max(0, min(self.k, seq.params.max_tokens - len(seq.output) - 1, seq.max_len - len(seq.tokens)))

    def record(self, seq: Sequence, drafted: int, accepted: int, rows_per_try: float = 1.0) -> None:
        """One verified draft of `drafted` tokens kept `accepted` of them, in a step with `rows_per_try` decode rows
        per drafting sequence: adapt k, settle the credit."""
        p = self.policy
        self.tries, self.drafted, self.accepted = self.tries + 1, self.drafted + drafted, self.accepted + accepted
        self.k = min(p.k_max, self.k + 2) if accepted == drafted else max(1, accepted + 1)
        free = p.row_cost == p.try_cost == 0  # "never stop" (tests): the drafter's cost does not count either
        cost = 0.0 if free else p.cost(drafted, rows_per_try, getattr(self.drafter, "cost_per_token", 0.0))
        self.credit = min(p.cap, self.credit + accepted - cost)


def judge(logits: torch.Tensor, draft: int, p: SamplingParams, g: torch.Generator | None) -> int:
    """The token to emit where the drafter proposed `draft`, from the target's processed logits [V] (penalties
    and grammar applied): `draft` itself when kept, else the target's replacement. Greedy keeps it iff it is the
    argmax; sampling keeps it with probability p(draft) and otherwise samples from p without it."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, p).cpu()
    if float(torch.rand((), generator=g)) < float(probs[draft]):
        return draft
    probs[draft] = 0.0
    if not probs.sum() > 0:  # all of p's mass sat on the draft (rounding): it is the only token p can give
        return draft
    return draw(probs, g)
