"""What the tests of a model split over ranks (test_tensor_parallel.py, test_pipeline_parallel.py) record on
each rank and compare with one process: full logits, a batch, cached decode after a prefill, and the engine's
greedy and seeded tokens; and which layers each cache holds K/V for."""

from __future__ import annotations

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.engine.kv_cache import ContiguousKVCache, cache_layers
from hearthlm.engine.runner import forward_tokens

PROMPT = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]  # longer than the tiny models' sliding windows (8)
OTHER = [2, 4, 8, 16, 32, 64]


def cached_decode(llm: LLM, ids: list[int], prefill: int) -> tuple[torch.Tensor, list[int]]:
    """Logits of positions prefill-1 .. T-1 (a prefill of `prefill` tokens, then one token per step), and the
    layers the contiguous cache holds K/V for."""
    cache = ContiguousKVCache(cache_layers(llm.model, llm.config.layers), 1, len(ids), llm.dtype, llm.device)
    out = []
    for lo, hi in [(0, prefill)] + [(p, p + 1) for p in range(prefill, len(ids))]:
        h = forward_tokens(llm.model, cache, torch.tensor([ids[lo:hi]]), torch.tensor([lo]))
        out.append(llm.model.logits(h[:, -1])[0])
    return torch.stack(out), [i for i, k in cache.k.items() if k.numel()]


def record(llm: LLM) -> dict:
    """Everything the tests compare: full logits, a batch, cached decode, the engine's tokens, and the layers
    the contiguous and the paged caches hold."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True)
    decode, cached = cached_decode(llm, PROMPT, 7)
    return {
        "logits": llm.logits(PROMPT),
        "batch": llm.logits([PROMPT[:6], OTHER]),
        "decode": decode,
        # three rows, continuous batching; the 6- and 8-token prompts prefill in one forward, the shorter padded
        "greedy": [c.token_ids for c in llm.generate([PROMPT, OTHER, PROMPT[2:10]], greedy)],
        "sampled": llm.generate(PROMPT, sampled)[0].token_ids,
        "cached": cached,
        "paged": sorted(llm.engine().cache.k),
    }


def floor(llm: LLM, one: dict) -> float:
    """How far one process is from itself: a row alone vs in a batch, cached decode vs a full forward. On
    gemma3 (embeddings scaled by 8, 1 + w norms) these reach 3.1e-5 and 1.5e-5 here; elsewhere under 7e-6."""
    alone = (one["batch"][0] - llm.logits(PROMPT[:6])).abs().max().item()
    return max(alone, (one["decode"] - one["logits"][6:]).abs().max().item())


def compare(split: dict, one: dict, llm: LLM) -> None:
    """Within 1e-5 of one process, or within one process's own spread where that is wider (gemma3's batch);
    the same greedy and seeded tokens."""
    bound = max(1e-5, floor(llm, one))
    for key in ("logits", "batch", "decode"):
        assert split[key].shape == one[key].shape, key
        diff = (split[key] - one[key]).abs().max().item()
        assert diff <= bound, f"{key}: max abs diff {diff:.2e} > {bound:.1e}"
    assert split["greedy"] == one["greedy"]
    assert split["sampled"] == one["sampled"]
