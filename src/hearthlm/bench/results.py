"""`hearth bench` results: the rows, their figures, and the quality comparison of two models."""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

QUALITY_TEXT = (
    "The hearth was the centre of the house. Bread was baked in its oven, water was warmed over its coals, "
    "and in winter the whole family sat around it in the evening, telling stories, mending clothes and "
    "planning the work of the coming days. A good fire needs dry wood, a steady draught and patience."
)
SEED = 0


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says why and what to do."""


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """The median of a figure over the counted runs, its min and max, and every sample."""

    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


@dataclass
class Quality:
    """A candidate model's next-token distributions against a reference's, over the same tokens."""

    tokens: int
    kl_mean: float  # mean over positions of KL(reference || candidate), nats
    kl_max: float
    top1_agreement: float  # fraction of positions where both pick the same argmax
    ppl_reference: float  # perplexity on the text's own next tokens
    ppl_candidate: float


@dataclass
class Row:
    """One engine on one model, dtype and quantization."""

    model: str
    path: str
    engine: str
    dtype: str
    quant: str | None
    device: str
    prompt_tokens: int
    generated_tokens: int  # per run (every counted run produced this many)
    ttft_s: Stat
    prefill_tok_s: Stat
    decode_tok_s: Stat
    load_s: float
    peak_memory: int  # bytes: peak RSS increase over the imports (CPU) or max_memory_allocated (CUDA)
    fit_memory: int | None  # `hearth fit`'s estimate of the same peak
    bytes_per_token: int | None  # fit's estimate of the bytes one decode step reads
    bandwidth_gbps: float | None
    roofline_tok_s: float | None
    roofline_fraction: float | None  # decode median / roofline
    quality: Quality | None = None
    expert_budget: str | None = None
    moe: dict | None = None  # under an expert budget: medians of hit_rate, mb_per_token, fetch_share per run
    draft: str | None = None  # speculative decoding's drafter ("auto", "lookup", a folder); None: off
    acceptance: float | None = None  # accepted / drafted tokens over the counted runs


@dataclass
class Ratio:
    """hearthlm / another engine, per figure, on the same model and dtype (> 1: hearthlm's figure is higher)."""

    model: str
    dtype: str
    versus: str
    ttft: float
    prefill: float
    decode: float
    peak_memory: float | None


@dataclass
class Result:
    rows: list[Row]
    ratios: list[Ratio]
    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- quality ------------------------------------------------------------------------------------------


def compare(reference, candidate, token_ids: list[int], step: int | None = None) -> Quality:
    """KL divergence, top-1 agreement and perplexity of `candidate`'s next-token distributions against
    `reference`'s (two LLMs, e.g. unquantized and quantized) on the same token ids (>= 2 tokens).
    `step`: feed the tokens that many at a time through the KV cache, as generation does (quantized
    weights then take the decode kernels), instead of in one prefill pass."""
    if len(token_ids) < 2:
        raise ValueError("compare() needs at least 2 tokens")
    return quality(logits_of(reference, token_ids, step), logits_of(candidate, token_ids, step), token_ids)


def quality(reference, candidate, token_ids: list[int]) -> Quality:
    """`compare` on logits already computed: two [T, vocab] tensors for the same T >= 2 token ids (from any
    engine, e.g. llama.cpp's logits for the candidate)."""
    import torch

    if reference.shape != candidate.shape or reference.shape[0] != len(token_ids) or len(token_ids) < 2:
        raise ValueError(
            f"quality() needs two [T, vocab] logits for T = {len(token_ids)} >= 2 tokens; "
            f"got {tuple(reference.shape)} and {tuple(candidate.shape)}"
        )
    ref = torch.log_softmax(reference.float().cpu(), dim=-1)  # [T, vocab]; the two may come from different devices
    cand = torch.log_softmax(candidate.float().cpu(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)  # [T]
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    nxt = torch.tensor(token_ids[1:]).unsqueeze(-1)

    def ppl(logp: torch.Tensor) -> float:
        return math.exp(-logp[:-1].gather(-1, nxt).mean().item())

    return Quality(len(token_ids), kl.mean().item(), kl.max().item(), top1.item(), ppl(ref), ppl(cand))


def logits_of(llm, token_ids: list[int], step: int | None = None):
    """`llm`'s logits [T, vocab] float32 for `token_ids`: one prefill pass, or with `step` that many tokens at a
    time through the KV cache."""
    import torch

    from ..engine.kv_cache import ContiguousKVCache
    from ..engine.runner import forward_tokens

    if step is None:
        return llm.logits(token_ids).float()
    with torch.inference_mode():
        cache = ContiguousKVCache(llm.config.layers, 1, len(token_ids), llm.model.dtype, llm.device)
        out = []
        for start in range(0, len(token_ids), step):
            ids = torch.tensor([token_ids[start : start + step]], device=llm.device)
            h = forward_tokens(llm.model, cache, ids, torch.tensor([start], device=llm.device))
            out.append(llm.model.logits(h)[0].float())
        return torch.cat(out)


def quality_ids(llm, limit: int = 256) -> list[int]:
    """The fixed text as token ids (seeded random ids when the model has no tokenizer)."""
    n = min(limit, llm.config.max_position)
    if llm.tokenizer is not None:
        return llm.tokenizer.encode(QUALITY_TEXT)[:n]
    return synthetic_prompt(llm.config.vocab_size, min(64, n), SEED + 1)


def synthetic_prompt(vocab_size: int, n: int, seed: int = SEED) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n)]
