"""Constrained decoding: a grammar per sequence masks the logits before sampling, so the reply stays inside it.

The grammar engine is llguidance (MIT): a JSON schema, a regular expression, a list of choices or a grammar (its
Lark dialect, or llama.cpp's GBNF) compiles to a matcher over the model's own tokenizer, which gives the set of
allowed next tokens in tens of microseconds and accepts the token that was sampled. Why llguidance and not
xgrammar: docs/structured-outputs.md (measured on our tokenizers with benchmarks/structured.py).

A reply may reason first: when the request names its model's reasoning markers, the grammar starts with an
optional, unconstrained reasoning block and the constraint applies from where the answer starts.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .sampler import SamplingParams

__all__ = ["GuideError", "Guides", "Guide", "grammar_spec", "lark_literal"]

_CACHE_SIZE = 256  # compiled grammars kept per model, least recently used dropped first
_BITS = (torch.arange(256).unsqueeze(-1) >> torch.arange(8) & 1).bool()  # byte -> its 8 bits, lowest first


class GuideError(ValueError):
    """A schema, regex, choice list or grammar that cannot constrain decoding; the message names the problem."""


def grammar_spec(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, text) of the constraint `params` asks for, None when it asks for none. kind is llguidance's format
    name: json_schema, regex, choice or grammar (Lark or GBNF, told apart by llguidance)."""
    if params.json_schema not in (None, False):
        schema = params.json_schema
        if schema is True:  # any JSON object (OpenAI's json_object, Ollama's format: "json")
            schema = {"type": "object"}
        text = schema if isinstance(schema, str) else json.dumps(schema)  # key order is property order
        return "json_schema", text
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", json.dumps(list(params.choice))
    if params.grammar is not None:
        return "grammar", params.grammar
    return None


@dataclass
class Guide:
    """One sequence's matcher: `restrict(logits)` masks the tokens the grammar forbids now, `accept(token)`
    advances it past the sampled token."""

    matcher: Any  # llguidance.LLMatcher
    mask: torch.Tensor  # int32 [1, ceil(vocab / 32)], reused every step

    def restrict(self, logits: torch.Tensor) -> torch.Tensor | None:
        """logits [V] with the tokens the grammar forbids now set to -inf; None when it allows no token at all."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.mask, 0)
        if not bool(self.mask.any()):
            return None
        allowed = _BITS[self.mask.view(torch.uint8).long()].flatten()  # bit i of the mask: token i (little-endian)
        n = logits.shape[-1]
        if allowed.shape[0] < n:  # rows past the tokenizer's vocabulary are never allowed
            allowed = torch.nn.functional.pad(allowed, (0, n - allowed.shape[0]))
        return logits.masked_fill(~allowed[:n].to(logits.device), float("-inf"))

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar refuses it (the matcher is then in its error state)."""
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (only an end-of-turn token)."""
        return bool(self.matcher.is_stopped())


class Guides:
    """One model's grammar machinery: the llguidance tokenizer (built once, from the same `tokenizers` JSON our
    tokenizer runs, so folders and GGUF-rebuilt vocabularies both work) and compiled grammars cached by text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_ids: set[int]):
        import llguidance

        self._llg = llguidance
        self.tokenizer = tokenizer
        self.vocab = vocab_size
        try:
            self.ll_tokenizer = llguidance.LLTokenizer(
                tokenizer.backend_json(), n_vocab=vocab_size, eos_token=sorted(end_ids)
            )
        except ValueError as e:  # a decoder it cannot map tokens to bytes through (WordPiece embedding models)
            raise GuideError(f"constrained decoding is not available for this model's tokenizer: {e}") from None
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def guide(self, params: SamplingParams) -> Guide | None:
        """A fresh matcher for `params` (None when unconstrained); GuideError for a bad constraint."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        key = (*spec, params.reasoning, params.in_reasoning)
        with self._lock:
            pristine = self._compiled.get(key)
            if pristine is None:
                pristine = self._compile(spec, params)
                self._compiled[key] = pristine
                if len(self._compiled) > _CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
        mask = torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        return Guide(pristine.deep_copy(), mask)

    def _compile(self, spec: tuple[str, str], params: SamplingParams) -> Any:
        kind, text = spec
        try:
            if kind == "json_schema":  # compact JSON: no run of whitespace for a sampler to wander into
                answer = self._llg.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
            else:
                answer = self._llg.grammar_from(kind, text)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GuideError(f"{_WHAT[kind]}: {e}") from None
        problem = self._llg.LLMatcher.validate_grammar(answer, self.ll_tokenizer)
        if problem:
            raise GuideError(f"{_WHAT[kind]}: {_first_lines(problem)}")
        grammar = self._with_reasoning(answer, params) if params.reasoning else answer
        matcher = self._llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GuideError(f"{_WHAT[kind]}: {_first_lines(matcher.get_error())}")
        return matcher

    def _with_reasoning(self, answer: str, params: SamplingParams) -> str:
        """The answer grammar behind an optional reasoning block (or, when the prompt already opened one, behind
        the rest of it): reasoning is free text up to the close marker, then at most a few blank characters."""
        opening, closing = (lark_literal(self.tokenizer, m) for m in params.reasoning)
        if closing.startswith("<["):  # a token of its own: free text cannot contain it
            think, rules = f"/(?s:.*)/ {closing}", ""
        else:  # plain text: the reasoning ends at its first occurrence
            think, rules = "think", f"think[lazy]: /(?s:.*){_regex_escape(params.reasoning[1])}/\n"
        head = f"{think} /[ \\t\\n]{{0,3}}/"
        head = head if params.in_reasoning else f"({opening} {head})?"
        # llguidance gives a Lark grammar as its text, the other kinds as a JSON document of grammars
        inner = json.loads(answer)["grammars"] if answer.lstrip().startswith("{") else [{"lark_grammar": answer}]
        inner[0] = {**inner[0], "name": "answer"}
        return json.dumps({"grammars": [{"lark_grammar": f"start: {head} @answer\n{rules}"}, *inner]})


def lark_literal(tokenizer: Tokenizer, text: str) -> str:
    """`text` as a Lark atom for llguidance: a leading added token (a marker such as <|tool_call> or <think>) by
    its id, `<[id]>`, so that only that token matches it, then any plain text after it, quoted."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if ids and ids[0] in tokenizer.added_ids:
        rest = text[len(tokenizer.token(ids[0])) :]
        return f"<[{ids[0]}]>" + (f" {json.dumps(rest)}" if rest else "")
    return json.dumps(text)


def _regex_escape(text: str) -> str:
    """`text` as a literal inside a Lark /regex/ (Rust regex syntax, / as the delimiter)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)


_WHAT = {
    "json_schema": "invalid or unsupported JSON schema",
    "regex": "invalid regex",
    "choice": "invalid choice list",
    "grammar": "invalid grammar",
}


def _first_lines(message: str, n: int = 6) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])
