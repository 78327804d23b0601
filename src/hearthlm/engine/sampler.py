"""Sampling parameters and the per-row sampler: penalties, greedy, temperature, top-k, top-p, min-p, seeds,
log-probabilities."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from ..kernels import cpu

MAX_LOGPROBS = 20  # the most alternatives `logprobs` may ask for (OpenAI's limit)


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; `seed` makes sampling reproducible.

    repetition_penalty (Hugging Face semantics): the logit of every token seen in the prompt or the output is
    divided by it when positive, multiplied by it when negative. presence_penalty / frequency_penalty (OpenAI
    semantics): subtracted from the logit of every generated token, once / once per occurrence.
    logprobs: None = off; 0 = the chosen token's log-probability; N = also the N most likely tokens.
    stop_token_ids: extra ids that end a completion (the token itself is not part of the output).

    Constrained decoding (at most one; engine/guided.py): json_schema (a schema as a dict or JSON text, or True
    for any JSON object), regex, choice (the reply is exactly one of these strings), grammar (llguidance's Lark
    or llama.cpp's GBNF). reasoning: the (open, close) markers of the model's reasoning block; a constrained
    reply may reason inside them first, unconstrained. in_reasoning: the prompt already opened that block."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    json_schema: dict | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    reasoning: tuple[str, str] | None = None
    in_reasoning: bool = False
    progress: bool = False  # also report each prefill chunk of a long prompt (an output with `progress` set)
    speculative: bool | None = None  # None: as the engine drafts; False: never draft; True: draft (prompt lookup
    # when the engine has no drafter). Output is the same either way (engine/speculative.py).
    detokenize: bool = True  # False: outputs carry token ids and no text, for a caller that decodes them its own way
    # (the server); stop strings still end the request (their text is decoded for that)

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        if self.reasoning is not None:
            self.reasoning = tuple(self.reasoning)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2] (0 = off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2] (0 = off)"),
            (
                self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"logprobs must be None (off) or an integer in [0, {MAX_LOGPROBS}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (self.speculative in (None, True, False), "speculative must be None (the engine's choice), True or False"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be a list of token ids (integers >= 0)",
            ),
        ]
        for ok, message in checks + self._constraint_checks():
            if not ok:
                raise ValueError(f"SamplingParams: {message}")

    def _constraint_checks(self) -> list[tuple[bool, str]]:
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) not in (None, False)]
        schema = self.json_schema
        return [
            (len(given) <= 1, f"give at most one of json_schema, regex, choice and grammar, not {' and '.join(given)}"),
            (
                schema is None or schema is True or schema is False or isinstance(schema, (dict, str)),
                "json_schema must be a JSON schema (a dict or its JSON text), or True for any JSON object",
            ),
            (
                not isinstance(schema, str) or _is_json(schema),
                "json_schema is a string but not JSON text: pass the schema as a dict or as JSON",
            ),
            (
                self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
                "regex must be a non-empty string",
            ),
            (
                self.choice is None
                or (isinstance(self.choice, list) and self.choice and all(isinstance(c, str) for c in self.choice)),
                "choice must be a non-empty list of strings",
            ),
            (
                self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip() != ""),
                "grammar must be a non-empty string",
            ),
            (
                self.reasoning is None
                or (len(self.reasoning) == 2 and all(isinstance(m, str) and m for m in self.reasoning)),
                "reasoning must be the (open, close) marker strings of the reasoning block",
            ),
        ]

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) not in (None, False) for n in ("json_schema", "regex", "choice", "grammar"))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass
class TokenLogprob:
    """One position's log-probabilities (only when params.logprobs is not None)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the params.logprobs most likely (token_id, logprob), best first


def penalize(logits: torch.Tensor, p: SamplingParams, seen: list[int], generated: list[int]) -> torch.Tensor:
    """logits [V] float32 -> logits after the repetition penalty over `seen` (prompt + output) and the
    presence / frequency penalties over `generated`."""
    logits = logits.clone()
    if p.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(seen, device=logits.device).unique()
        score = logits[ids]
        logits[ids] = torch.where(score > 0, score / p.repetition_penalty, score * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


NUCLEUS_PROBE = 1024  # top-p looks for its tokens among this many most likely first


def candidates(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """logits [V] float32 -> (ids, probs): the tokens a draw can give (None: every token, in order) and their
    probabilities after temperature, top-k, top-p and min-p. Only candidates go through the sort, the filters and the
    draw: for a 262k vocabulary, top-p's sort of every token took 30 ms here and torch.multinomial 7 ms."""
    top = float(logits.max())  # (NaN if any is)
    if not math.isfinite(top):
        raise ValueError(f"cannot sample: the largest logit is {top} (a model that overflowed, or nothing allowed)")
    logits, ids = logits / p.temperature, None
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        if kth > float("-inf"):  # the top k, ties with the k-th included
            ids = (logits >= kth).nonzero().squeeze(1)
            logits = logits[ids]
        else:  # (a grammar left fewer than k tokens)
            logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        ids, probs = _nucleus(ids, probs, p.top_p)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return ids, probs / probs.sum()


def _nucleus(ids: torch.Tensor | None, probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p: the smallest set of most likely tokens whose mass reaches top_p, as (ids, probs). Taken from the
    NUCLEUS_PROBE most likely when their mass reaches top_p (then no token past them can be in it), else from a sort
    of all; either way the same prefix of the same sorted order, so the same tokens."""
    ranked, order = None, None
    if probs.shape[-1] > NUCLEUS_PROBE:
        ranked, order = torch.topk(probs, NUCLEUS_PROBE)
        if not torch.cumsum(ranked, 0)[-1] >= top_p:
            ranked = None
    if ranked is None:
        ranked, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(ranked, 0) - ranked < top_p  # the mass of strictly better tokens is short of top_p
    order = order[keep]
    return (order if ids is None else ids[order]), ranked[keep]


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> probabilities [V] after temperature, top-k, top-p and min-p (zero off the candidates)."""
    ids, probs = candidates(logits, p)
    return probs if ids is None else torch.zeros_like(logits).index_put_((ids,), probs)


def draw(probs: torch.Tensor, g: torch.Generator | None) -> int:
    """An index i drawn with probability probs[i] / probs.sum() (probs >= 0, not all 0): the inverse of the float64
    cumulative sum at a uniform draw, on the CPU (where the requests' generators are). A zero entry is never drawn."""
    cum = torch.cumsum(probs.cpu().double(), 0)
    if not cum[-1] > 0:
        raise ValueError(f"cannot sample: the token probabilities sum to {float(cum[-1])}")
    u = torch.rand((), generator=g, dtype=torch.float64) * cum[-1]
    return min(int(torch.searchsorted(cum, u, right=True)), probs.shape[-1] - 1)


def pick(logits: torch.Tensor, p: SamplingParams, g: torch.Generator | None) -> int:
    """One token from logits [V] float32 (already penalized)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    ids, probs = candidates(logits, p)
    i = draw(probs, g)
    return i if ids is None else int(ids[i])


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-softmax of logits [V] (the raw model logits after penalties, before temperature and the
    top-k / top-p / min-p filters) at `token`, and the `top` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] float32 -> one token id per row (no penalties)."""
    return [pick(row, p, g) for row, p, g in zip(logits, params, generators)]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first on ties), in one pass on CPU: PyTorch's took ~1.8 ms for 16 rows of a 262k
    vocabulary here, the kernel ~0.2."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and cpu.available():
        return cpu.argmax_rows(logits)
    return logits.argmax(-1)


def greedy_rows(logits: torch.Tensor, params: list[SamplingParams], guides: list) -> list[int | None]:
    """The greedy token of every row of logits [B, V] that needs nothing but an argmax (temperature 0, no
    penalties, no constraint), in one batched argmax and one copy to Python; None for the other rows."""
    plain = [p.temperature == 0 and not p.penalized and g is None for p, g in zip(params, guides)]
    if not any(plain):
        return [None] * len(params)
    if all(plain):
        return argmax(logits).tolist()
    rows = [i for i, ok in enumerate(plain) if ok]
    tokens: list[int | None] = [None] * len(params)
    for i, t in zip(rows, argmax(logits[rows]).tolist()):
        tokens[i] = t
    return tokens


def logprob_rows(logits: torch.Tensor, tokens: list[int | None], tops: list[int | None]) -> list[TokenLogprob | None]:
    """logprob_of for every row of logits [B, V] whose token is known (greedy_rows picked it) and that asks for
    log-probabilities (tops[i] is not None), from one log-softmax and one top-k over those rows; None elsewhere."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [i for i, (t, k) in enumerate(zip(tokens, tops)) if t is not None and k is not None]
    if not rows:
        return out
    logp = torch.log_softmax((logits if len(rows) == len(tokens) else logits[rows]).float(), dim=-1)
    picked = torch.tensor([tokens[i] for i in rows], device=logp.device)
    chosen = logp.gather(1, picked[:, None])[:, 0].tolist()
    k = max(tops[i] for i in rows)
    best = torch.topk(logp, k) if k else None
    ids, values = (best.indices.tolist(), best.values.tolist()) if best is not None else ([], [])
    for j, i in enumerate(rows):
        n = tops[i]
        out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(ids[j][:n], values[j][:n])) if n else [])
    return out
