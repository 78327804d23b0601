"""Model runner: one forward over a batch of rows, through either KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels import cpu
from ..layers.attention import Batch
from ..models.base import CausalLM
from .kv_cache import ContiguousKVCache
from .paged_cache import PagedKVCache
from .scheduler import Work
from .sequence import Sequence

if TYPE_CHECKING:
    from ..multimodal.splice import Splice


@torch.inference_mode()
def forward_tokens(
    model: CausalLM,
    cache: ContiguousKVCache,
    ids: torch.Tensor,
    start: torch.Tensor,
    rows: slice | None = None,
    outputs: int | None = None,
    splice: Splice | None = None,
) -> torch.Tensor:
    """Contiguous cache: run ids [b, T] at positions start[b] + (0..T-1); returns the hidden states [b, T, H],
    or at least those of the last `outputs` positions (a model may skip the rest). `splice`: media embeddings
    for some positions (multimodal models only)."""
    ids, start = ids.to(model.device), start.to(model.device)  # callers may pass CPU tensors to a GPU model
    positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]
    if splice is None:
        cache.begin(positions, rows)
        return model(ids, Batch(positions=positions, cache=cache, outputs=outputs))
    cache.begin(positions, rows, spans=splice.spans)
    return model(ids, Batch(positions=positions, cache=cache, outputs=outputs), splice)


@torch.inference_mode()
def run_paged(
    model: CausalLM,
    cache: PagedKVCache,
    seqs: list[Sequence],
    n: int | list[int],
    logits: bool,
    splice: Splice | None = None,
) -> torch.Tensor | None:
    """Compute the next n tokens of every sequence (their slots allocated; `n`: one count for all, or one per
    sequence); returns the logits [b, V] of each row's last position when `logits`, else None (and the model may
    skip work it does not need). `splice`: media embeddings for some of these positions (multimodal models only).

    Rows of different lengths run as one [b, longest] batch: a shorter row is padded on the left with copies of its
    first token at its first position. A pad computes exactly what that token computes, writes no K/V (the cache
    tells pads from the positions, PagedKVCache.begin) and is dropped, and every row ends at its own last token."""
    device = model.device
    starts = [s.num_computed for s in seqs]
    counts = [n] * len(seqs) if isinstance(n, int) else list(n)
    T = max(counts)
    ids = torch.tensor([s.tokens[p : p + 1] * (T - c) + s.tokens[p : p + c] for s, p, c in zip(seqs, starts, counts)],
                       device=device)  # fmt: skip
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None, :]
    if min(counts) < T:
        pads = torch.tensor([T - c for c in counts], device=device)[:, None]
        positions = torch.maximum(positions - pads, positions[:, :1])
    batch = Batch(positions=positions, cache=cache, outputs=1 if logits else 0)
    if splice is None:
        cache.begin(positions, starts, [s.tables for s in seqs])
        h = model(ids, batch)
    else:
        cache.begin(positions, starts, [s.tables for s in seqs], spans=splice.spans)
        h = model(ids, batch, splice)
    if not logits:
        return None
    keep_hidden(seqs, [p + c - 1 for p, c in zip(starts, counts)], h[:, -1:])
    return model.logits(h[:, -1])


def packs(chunks: list[Work], slack: float = 0.25) -> list[list[Work]]:
    """Prefill chunks grouped into forwards (run_paged pads each group's rows to its longest): a forward per chunk
    costs its fixed overhead per chunk and multiplies few rows at a time, so chunks share one while the padding
    adds at most `slack` of their tokens."""
    groups: list[list[Work]] = []
    for w in sorted(chunks, key=lambda w: w.n):
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * w.n <= (1 + slack) * (sum(x.n for x in group) + w.n):
            group.append(w)
        else:
            groups.append([w])
    return groups


def run_verify(
    model: CausalLM, cache: PagedKVCache, seqs: list[Sequence], drafts: list[list[int]]
) -> list[torch.Tensor]:
    """Speculative verification: compute each sequence's last token and its draft (slots allocated); returns per
    sequence logits [len(draft) + 1, V], row i scoring the token after draft[:i].

    On CPU every position runs as a decode row of its own (its sequence's block table, its own position), so
    verification takes the fused decode step, the kernels plain decoding runs: the rows of one forward all write
    their K/V before any row reads, and later positions never run in an earlier forward.
    Elsewhere each sequence's positions run as one short prefill (sequences grouped by draft length)."""
    if model.device.type == "cpu" and cpu.available():
        return _verify_rows(model, cache, seqs, drafts)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    by_len: dict[int, list[int]] = {}
    for i, d in enumerate(drafts):
        by_len.setdefault(len(d), []).append(i)
    for group in by_len.values():
        logits = _verify_wide(model, cache, [seqs[i] for i in group], [drafts[i] for i in group])
        for i, row in zip(group, logits):
            out[i] = row
    return out


@torch.inference_mode()
def _verify_rows(model: CausalLM, cache: PagedKVCache, seqs: list[Sequence], drafts: list[list[int]]):
    rows = [(s, s.num_computed + j, t) for s, d in zip(seqs, drafts) for j, t in enumerate([s.tokens[-1], *d])]
    n, device = len(rows), model.device
    k = -(-n // cpu.MAX_DECODE_ROWS)  # forwards the fused decode step takes whole
    cuts = [i * n // k for i in range(k + 1)]
    logits, hidden = [], []
    for a, b in zip(cuts, cuts[1:]):  # in order: a position's K/V is written no later than the rows reading it
        part = rows[a:b]
        ids = torch.tensor([[t] for _, _, t in part], device=device)
        positions = torch.tensor([[p] for _, p, _ in part], device=device)
        cache.begin(positions, [p for _, p, _ in part], [s.tables for s, _, _ in part])
        hidden.append(model(ids, Batch(positions=positions, cache=cache, outputs=1))[:, -1])
        logits.append(model.logits(hidden[-1]))
    sizes = [len(d) + 1 for d in drafts]
    keep_hidden(seqs, [s.num_computed for s in seqs], torch.cat(hidden).split(sizes))
    return list(torch.cat(logits).split(sizes))


@torch.inference_mode()
def _verify_wide(model: CausalLM, cache: PagedKVCache, seqs: list[Sequence], drafts: list[list[int]]):
    """Drafts of one length: each sequence's positions as one prefill chunk; logits [b, k + 1, V]."""
    device = model.device
    starts = [s.num_computed for s in seqs]
    ids = torch.tensor([[s.tokens[p], *d] for s, p, d in zip(seqs, starts, drafts)], device=device)
    T = ids.shape[1]
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None, :]
    cache.begin(positions, starts, [s.tables for s in seqs])
    h = model(ids, Batch(positions=positions, cache=cache, outputs=T))
    keep_hidden(seqs, starts, h[:, -T:])
    return model.logits(h[:, -T:])


def keep_hidden(seqs: list[Sequence], firsts: list[int], hidden) -> None:
    """Keep each sequence's hidden states [n, H] of positions firsts[i]... (Sequence.hidden) when its drafter reads
    them (engine/mtp.py)."""
    for seq, first, rows in zip(seqs, firsts, hidden):
        if seq.spec is not None and getattr(seq.spec.drafter, "reads_hidden", False):
            seq.hidden = (first, rows)
