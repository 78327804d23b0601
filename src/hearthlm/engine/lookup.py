"""Prompt lookup: draft the next tokens of a sequence by finding its last few tokens earlier in its own prompt
and output, and proposing what followed them there. No model: it pays off when a reply copies its context
(quotes, edits, extraction, answers from a retrieved passage).

Each sequence keeps an index per n-gram length: n tokens -> the position right after their latest earlier
occurrence. Tokens are added to it once, as the sequence grows, so a proposal costs a few dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class _Index:
    grams: dict[int, dict[tuple[int, ...], int]]  # n -> (n tokens) -> position of the token that followed them
    upto: int = 0  # positions below this are in the index


@dataclass
class PromptLookup:
    """A Drafter: for each sequence, the longest suffix of max_ngram..min_ngram tokens that occurred before
    decides the draft, the up to k tokens that followed its most recent earlier occurrence.

    At least two tokens must match by default: a single token recurs everywhere, so its drafts are mostly
    rejected, and their failed verifies make the adaptive policy pause drafting through the stretches that do
    quote (on the demo's quoting task: 1.27x with one-token matches, 1.52x without; docs/speculative.md)."""

    max_ngram: int = 3
    min_ngram: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and 1 <= self.min_ngram):
            raise ValueError("PromptLookup: min_ngram and max_ngram must be integers >= 1")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"PromptLookup: max_ngram ({self.max_ngram}) < min_ngram ({self.min_ngram})")

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._propose(seq, k) for seq, k in zip(seqs, ks)]

    def _propose(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.tokens
        index = self._index(seq)
        end = len(tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            at = index.grams[n].get(tuple(tokens[end - n :]))
            if at is not None:
                return _continue(tokens, at, k)
        return []

    def _index(self, seq: Sequence) -> _Index:
        """The sequence's index, brought up to date: every n-gram that has a following token in `tokens`."""
        index = seq.spec.state  # kept on the sequence: it goes when the sequence does
        if not isinstance(index, _Index):
            index = seq.spec.state = _Index({n: {} for n in range(self.min_ngram, self.max_ngram + 1)})
        tokens = seq.tokens
        for at in range(max(index.upto, 1), len(tokens)):  # the n tokens before `at` were followed by tokens[at]
            for n, grams in index.grams.items():
                if at >= n:
                    grams[tuple(tokens[at - n : at])] = at
        index.upto = max(index.upto, len(tokens))
        return index


def _continue(tokens: list[int], at: int, k: int) -> list[int]:
    """k tokens copied from `at` on, as if the match went on: where the copy reaches the end of `tokens` it reads
    its own first tokens (a run that repeats with period len(tokens) - at keeps repeating)."""
    end, draft = len(tokens), tokens[at : at + k]
    while len(draft) < k:
        draft.append(draft[at + len(draft) - end])
    return draft
