"""Speculative decoding: a drafter proposes up to k next tokens per sequence, one target forward scores the last
token and the draft together (runner.run_verify), and the engine keeps the longest prefix the target agrees
with plus one token of the target's own, then rolls the KV cache back to what it kept.

Lossless: greedy keeps a draft token only if it is the target's argmax. Sampling keeps a draft token t with
probability p(t) under the target's processed distribution (temperature, top-k/p, min-p, penalties, grammar)
and on rejection samples from p with t removed (speculative sampling for a draft that is a point mass), so
every emitted token has exactly the target's distribution. The engine walks the positions in order, so
penalties, grammars, stop strings and max_tokens see each kept token before the next one is judged.

Adaptive: each sequence's draft length follows its acceptance, and drafting pauses for a sequence whose recent
drafts are mostly rejected, with a pause that doubles each time a probe fails (see Adaptive).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .sampler import SamplingParams, filter_logits

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
    """How the draft length and the on/off switch follow acceptance. Measured on the demo model on CPU
    (docs/speculative.md): a step costs about 1.1 ms plus 0.25 ms per extra row, so one accepted token in four
    drafted pays at batch 1, while four concurrent requests already fill most of a fused forward's 8 rows."""

    k_max: int = 8  # the most tokens drafted per step
    k_start: int = 3
    window: int = 4  # tries whose mean accepted length decides the switch
    min_accepted: float = 0.5  # below this mean over the window, drafting pauses
    pause: int = 16  # tokens decoded plainly after the first failed window; doubles after each failed probe
    max_pause: int = 512
    fit_rows: bool = True  # on CPU, trim drafts so that a step's rows fit one fused decode forward (Engine._fit_rows)

    def __post_init__(self) -> None:
        if not (1 <= self.k_start <= self.k_max and self.window >= 1 and 1 <= self.pause <= self.max_pause):
            raise ValueError(f"Adaptive: inconsistent settings {self}")


@dataclass
class SpecState:
    """One sequence's drafting: its drafter, current draft length, recent acceptance and pause, its totals."""

    drafter: Drafter
    policy: Adaptive
    k: int = 0
    recent: deque = field(default_factory=deque)  # accepted tokens of the last `window` tries
    paused_until: int = 0  # no drafting until the output has this many tokens
    pause: int = 0
    tries: int = 0
    drafted: int = 0
    accepted: int = 0
    state: Any = None  # the drafter's own (prompt lookup: its n-gram index)

    def __post_init__(self) -> None:
        self.k = self.k or self.policy.k_start
        self.pause = self.pause or self.policy.pause
        self.recent = deque(self.recent, maxlen=self.policy.window)

    def budget(self, seq: Sequence) -> int:
        """Tokens `seq` may draft now: 0 while paused; never past max_tokens (one token of each step is the
        target's own) nor past the sequence's length limit (every drafted position needs a KV slot)."""
        if len(seq.output) < self.paused_until:
            return 0
        return max(0, min(self.k, seq.params.max_tokens - len(seq.output) - 1, seq.max_len - len(seq.tokens)))

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """One verified draft of `drafted` tokens kept `accepted` of them: adapt k, pause if drafting does not pay."""
        p = self.policy
        self.tries, self.drafted, self.accepted = self.tries + 1, self.drafted + drafted, self.accepted + accepted
        self.k = min(p.k_max, self.k + 2) if accepted == drafted else max(1, accepted + 1)
        self.recent.append(accepted)
        if len(self.recent) < p.window:
            return
        if sum(self.recent) / len(self.recent) < p.min_accepted:
            self.paused_until = len(seq.output) + self.pause
            self.pause = min(p.max_pause, 2 * self.pause)
        else:
            self.pause = p.pause


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
    total = probs.sum()
    if not total > 0:  # all of p's mass sat on the draft (rounding): it is the only token p can give
        return draft
    return int(torch.multinomial(probs / total, 1, generator=g))
