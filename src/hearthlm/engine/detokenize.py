"""Incremental text of one request, with stop strings: text that might be the start of a stop string is held
back; a stop string and everything after it is never emitted."""

from __future__ import annotations

from ..tokenizer import Tokenizer


class TextStream:
    """push(token) -> the new text it makes safe to emit; `stopped` turns True when a stop string appeared."""

    def __init__(self, tokenizer: Tokenizer | None, stops: list[str]):
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.stops = [s for s in stops if s]
        self.pending = ""  # decoded text not emitted yet (it may begin a stop string)
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.detok is None or self.stopped:
            return ""
        self.pending += self.detok.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the stream (cut before a stop string if one completes)."""
        if self.detok is None or self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        hold = 0 if final else max((_overlap(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
