"""Media embeddings into one forward pass: which positions of the chunk take a tower's output instead of a token
embedding, and which position ranges attend to each other in both directions (image spans of 26B-A4B / 31B on
sliding layers; the caches widen their masks with them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .prompt import MediaPrompt


@dataclass
class Splice:
    """For a forward over rows [B, T]: positions that take media embeddings, and the embeddings in the row-major
    order of those positions."""

    mask: torch.Tensor  # [B, T] bool
    embeds: torch.Tensor  # [N, H], N = mask.sum()
    pad_id: int
    spans: list[list[tuple[int, int]]] | None = None  # per row: [start, end) absolute positions, both ways

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids the token embeddings (and per-layer embeddings) read: media positions become pad."""
        return ids.masked_fill(self.mask, self.pad_id)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] token embeddings -> the same with the media positions replaced."""
        return x.masked_scatter(self.mask[..., None], self.embeds.to(x.dtype))


def splice_for(prompt: MediaPrompt, start: int, length: int, pad_id: int, device: torch.device) -> Splice | None:
    """The splice for positions [start, start + length) of `prompt`, whose items are encoded (prompt.embeddings);
    None when no media token falls there."""
    end = start + length
    mask = torch.zeros(1, length, dtype=torch.bool)
    parts = []
    for s in prompt.spans:
        lo, hi = max(s.start, start), min(s.end, end)
        if lo < hi:
            mask[0, lo - start : hi - start] = True
            parts.append(prompt.embeddings[s.key][lo - s.start : hi - s.start])
    if not parts:
        return None
    spans = None
    if prompt.bidirectional:
        spans = [[(s.start, s.end) for s in prompt.spans if s.kind == "image" and s.start < end and s.end > start]]
    return Splice(mask.to(device), torch.cat(parts).to(device), pad_id, spans or None)


def widen(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, window: int, spans: list[list[tuple[int, int]]]):
    """A sliding layer's mask [b, T, S] (q [b, T, 1] and k [b, 1, S] absolute positions, k < 0 for empty slots)
    plus every (query, key) pair inside one span, still within the window behind the query."""
    for row, row_spans in enumerate(spans):
        for lo, hi in row_spans:
            qi = (q[row] >= lo) & (q[row] < hi)
            ki = (k[row] >= lo) & (k[row] < hi) & (k[row] > q[row] - window)
            mask[row] |= qi & ki
    return mask
