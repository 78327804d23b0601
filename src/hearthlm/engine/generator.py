"""Static-batch generation over the contiguous KV cache: prefill each prompt (in chunks), then decode
all rows together until every row hits EOS, a stop string or max_tokens.

The serving engine (continuous batching, paged cache) replaces this loop; the model and the cache
interface stay the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..layers.attention import Batch
from ..models.base import CausalLM
from .kv_cache import ContiguousKVCache
from .sampler import SamplingParams, sample


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@torch.inference_mode()
def forward_tokens(
    model: CausalLM,
    cache: ContiguousKVCache,
    ids: torch.Tensor,
    start: torch.Tensor,
    rows: slice | None = None,
    outputs: int | None = None,
) -> torch.Tensor:
    """Run ids [b, T] at positions start[b] + (0..T-1); returns the hidden states [b, T, H], or at least
    those of the last `outputs` positions (a model may skip the rest)."""
    positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]
    cache.begin(positions, rows)
    return model(ids, Batch(positions=positions, cache=cache, outputs=outputs))


@torch.inference_mode()
def generate(
    model: CausalLM,
    seqs: list[Sequence],
    eos_ids: set[int],
    max_len: int,
    prefill_chunk: int = 512,
    on_token: Callable[[int, int], None] | None = None,
    is_stopped: Callable[[Sequence], bool] | None = None,
) -> None:
    """Fill every Sequence's output and finish_reason in place."""
    device = model.device
    cache = ContiguousKVCache(model.config.layers, len(seqs), max_len, model.dtype, device)
    gens = [s.params.generator() for s in seqs]
    last = []
    for b, s in enumerate(seqs):
        ids = torch.tensor([s.prompt], device=device)
        for start in range(0, len(s.prompt), prefill_chunk):
            chunk = ids[:, start : start + prefill_chunk]
            wanted = 1 if start + prefill_chunk >= len(s.prompt) else 0  # logits of the last token only
            h = forward_tokens(model, cache, chunk, torch.tensor([start], device=device), slice(b, b + 1), wanted)
        last.append(model.logits(h[:, -1]))
    logits = torch.cat(last)
    while True:
        tokens = sample(logits, [s.params for s in seqs], gens)
        for b, (s, t) in enumerate(zip(seqs, tokens)):
            if s.finish_reason is not None:
                continue
            if t in eos_ids and not s.params.ignore_eos:
                s.finish_reason = "stop"
                continue
            s.output.append(t)
            if on_token:
                on_token(b, t)
            if is_stopped and is_stopped(s):
                s.finish_reason = "stop"
            elif len(s.output) >= s.params.max_tokens or s.length >= max_len:
                s.finish_reason = "length"
        if all(s.finish_reason is not None for s in seqs):
            return
        # Finished rows keep re-running their last position; their results are ignored.
        ids = torch.tensor([[s.output[-1] if s.output else s.prompt[-1]] for s in seqs], device=device)
        start = torch.tensor([s.length - 1 for s in seqs], device=device)
        h = forward_tokens(model, cache, ids, start)
        logits = model.logits(h[:, -1])
