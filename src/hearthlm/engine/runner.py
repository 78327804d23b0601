"""Model runner: one forward over a batch of rows, through either KV cache."""

from __future__ import annotations

import torch

from ..layers.attention import Batch
from ..models.base import CausalLM
from .kv_cache import ContiguousKVCache
from .paged_cache import PagedKVCache
from .sequence import Sequence


@torch.inference_mode()
def forward_tokens(
    model: CausalLM,
    cache: ContiguousKVCache,
    ids: torch.Tensor,
    start: torch.Tensor,
    rows: slice | None = None,
    outputs: int | None = None,
) -> torch.Tensor:
    """Contiguous cache: run ids [b, T] at positions start[b] + (0..T-1); returns the hidden states [b, T, H],
    or at least those of the last `outputs` positions (a model may skip the rest)."""
    positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]
    cache.begin(positions, rows)
    return model(ids, Batch(positions=positions, cache=cache, outputs=outputs))


@torch.inference_mode()
def run_paged(model: CausalLM, cache: PagedKVCache, seqs: list[Sequence], n: int, logits: bool) -> torch.Tensor | None:
    """Compute the next n tokens of every sequence (their slots allocated); returns the logits [b, V] of
    each row's last position when `logits`, else None (and the model may skip work it does not need)."""
    device = model.device
    starts = [s.num_computed for s in seqs]
    ids = torch.tensor([s.tokens[p : p + n] for s, p in zip(seqs, starts)], device=device)
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)[None, :]
    cache.begin(positions, starts, [s.tables for s in seqs])
    h = model(ids, Batch(positions=positions, cache=cache, outputs=1 if logits else 0))
    return model.logits(h[:, -1]) if logits else None
