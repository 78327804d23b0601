"""What both APIs share: the served model, prompts, and one engine request turned into parsed pieces of text.

Routes build a Prompt and SamplingParams, `start()` one Stream per choice (errors raise here, before any byte
is sent), then iterate Stream.pieces(); closing a Stream early aborts its engine request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..api import ContextLengthError
from ..chat_formats import Delta, ReplyParser, detect
from ..chat_formats.grammar import tool_grammar
from ..chat_formats.parser import held_back
from ..engine.guided import lark_literal
from . import clients
from .errors import APIError
from .media import has_media


@dataclass
class Prompt:
    """Token ids for the engine; `chat`: the reply is parsed for reasoning (and tool calls when `tools`)."""

    ids: list[int]
    chat: bool = False
    tools: bool = False
    in_reasoning: bool = False
    may_reason: bool = True  # thinking was not turned off for this chat
    media: Any = None  # the prompt's images / audio (LLM.media_prompt), when it has any


@dataclass
class Piece:
    """What one engine step adds to choice `index`."""

    index: int
    delta: Delta
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None  # set on the last piece
    progress: tuple[int, int] | None = None  # (prompt tokens computed, prompt tokens): a prefill report, no text


@dataclass
class Result:
    """A whole choice, for non-streamed replies."""

    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str = "length"


class _StopCut:
    """Cuts text at the first stop string, holding back an end that may start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = [s for s in stops if s], "", False
        self.matched: str | None = None  # the stop string that was cut at

    def feed(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        self.buf += text
        hits = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda h: h[0])
            out, self.buf, self.hit = self.buf[:at], "", True
            return out
        n = len(self.buf) - held_back(self.buf, self.stops)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Stream:
    """One engine request: decodes its tokens (keeping the reply format's marker tokens), cuts stop strings,
    parses reasoning and tool calls, and records the timings and counts of the request."""

    def __init__(self, model: ServedModel, gen, first, prompt: Prompt, stops: list[str], index: int, t0: float):
        self.model, self._gen, self._first, self.index = model, gen, first, index
        tok = model.tokenizer
        self._detok = tok.detokenizer(skip_special_tokens=False)
        self._keep = model.marker_ids if prompt.chat else frozenset()
        self._skip = model.stop_ids
        self._stop = _StopCut(stops)
        self._parser = ReplyParser(model.format if prompt.chat else detect(None), prompt.tools, prompt.in_reasoning)
        self.t_start, self.t_first, self.t_last, self.t_end = t0, None, None, None
        self.prompt_tokens = len(prompt.ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._closed = False

    def _text(self, ids: list[int]) -> str:
        tok, out = self.model.tokenizer, []
        for t in ids:
            if t in self._skip or (t in tok.special_ids and t not in self._keep):
                continue
            out.append(self._detok.push(t))
        return "".join(out)

    async def pieces(self) -> AsyncIterator[Piece]:
        out = self._first
        try:
            while out is not None:
                piece = self._piece(out)
                yield piece
                if piece.finish_reason:
                    break
                out = await anext(self._gen, None)
        finally:
            await self.aclose()

    def _piece(self, out) -> Piece:
        if getattr(out, "progress", None) is not None:
            self.cached_tokens = out.cached_tokens or 0
            return Piece(self.index, Delta(), [], progress=out.progress)
        now = time.perf_counter()
        ids = list(out.token_ids)
        if ids:
            self.model.metrics.observe_tokens(self, now, len(ids))
        self.completion_tokens = out.completion_tokens or self.completion_tokens + len(ids)
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.cached_tokens = out.cached_tokens or 0
        delta = self._parser.feed(self._stop.feed(self._text(ids)))
        reason = None
        if out.finished or self._stop.hit:
            self.t_end = now
            delta.add(self._parser.feed(self._stop.feed(self._detok.flush()) + self._stop.finish()))
            delta.add(self._parser.finish())
            reason = "stop" if self._stop.hit else out.finish_reason or "stop"
        return Piece(self.index, delta, ids, out.logprobs, reason)

    @property
    def stop_sequence(self) -> str | None:
        """The stop string the reply ended at, if it ended at one."""
        return self._stop.matched

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.model.metrics.finished(self)
            await self._gen.aclose()


class ServedModel:
    """The one model a server serves: its names, tokenizer, reply format and engine."""

    def __init__(self, llm, engine, name: str, metrics):
        self.llm, self.engine, self.name, self.metrics = llm, engine, name, metrics
        self.tokenizer = llm.tokenizer
        self.created = int(time.time())
        self.template = self.tokenizer.chat_template() if self.tokenizer is not None else None
        self.format = detect(self.tokenizer.chat_template(with_tools=True) if self.tokenizer else None)
        tok = self.tokenizer
        # Marker tokens stay in the decoded text for the parser, though special (e.g. <|channel>, <|"|>).
        ids = {i for m in self.format.markers for i in tok.encode(m, add_special_tokens=False)} if tok else set()
        self.marker_ids = frozenset(ids & tok.special_ids) if tok else frozenset()
        self.stop_ids = frozenset(llm.stop_token_ids)
        self.context = llm.config.max_position
        self.aliases = {name.lower(), llm.path.name.lower(), llm.path.stem.lower()}
        self.fingerprint = f"hearthlm-{__version__}"
        self.digest = hashlib.sha256(f"{llm.path.resolve()}:{llm.path.stat().st_mtime_ns}".encode()).hexdigest()
        self.image_tokens: int | None = None  # the server's default soft-token budget per image (None: the model's)
        self.leader = None  # under --tp: distributed/follow.py's Leader, which stops the other ranks at the end

    def check_name(self, name: str | None) -> None:
        """404 unless `name` names this model (an Ollama-style ':latest' tag is accepted)."""
        key = (name or "").lower().removesuffix(":latest")
        if key not in self.aliases:
            raise APIError(
                404, f"model '{name}' not found: this server serves '{self.name}'", "model", "model_not_found"
            )

    # -- prompts -------------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise APIError(400, f"the model {self.name} has no tokenizer: text requests are not possible")
        return self.tokenizer

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None, image_tokens: int | None = None, **template_kwargs: Any
    ) -> Prompt:
        """The chat template applied to `messages`; with images or audio in them, their soft tokens too
        (`image_tokens`: the budget per image, else the server's default)."""
        tok = self._tok()
        if not tok.has_chat_template:
            raise APIError(400, f"the model {self.name} has no chat template: use the completions route", "messages")
        media = None
        if has_media(messages):
            media = self._media_prompt(messages, tools, image_tokens or self.image_tokens, template_kwargs)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None, **template_kwargs)
        ids = media.ids if media is not None else tok.encode_chat(text)
        self.check_length(ids)
        reasoning = self.format.opens_reasoning(text)
        thinking = template_kwargs.get("enable_thinking") is not False
        return Prompt(ids, chat=True, tools=bool(tools), in_reasoning=reasoning, may_reason=thinking or reasoning,
                      media=media)  # fmt: skip

    def _media_prompt(self, messages, tools, image_tokens, template_kwargs):
        try:
            return self.llm.media_prompt(messages, tools=tools or None, image_tokens=image_tokens, **template_kwargs)
        except ValueError as e:  # undecodable or oversized media, a modality the model lacks, a bad budget
            raise APIError(400, str(e), "messages") from None

    def text_prompt(self, prompt: str | list[int], special: bool = True) -> Prompt:
        ids = self._tok().encode(prompt, add_special_tokens=special) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        vocab = self.llm.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id(s) {bad[:3]} outside the vocabulary [0, {vocab})", "prompt")
        self.check_length(ids)
        return Prompt(ids)

    def guided(self, prompt: Prompt, constraint: dict[str, Any]) -> dict[str, Any]:
        """SamplingParams fields for a constrained reply to `prompt`: the constraint and, for a chat whose model
        reasons, its reasoning markers (it reasons freely first; the constraint starts with the answer)."""
        if constraint and prompt.chat and self.format.think and prompt.may_reason:
            return {**constraint, "reasoning": self.format.think, "in_reasoning": prompt.in_reasoning}
        return constraint

    def tool_constraint(self, tools: list[dict[str, Any]], *, required: bool, parallel: bool = True) -> dict[str, Any]:
        """A grammar holding the reply's tool calls to `tools` and their schemas (see chat_formats/grammar.py);
        `parallel` False: at most one call."""
        bad = [i for i, t in enumerate(tools) if not isinstance((t or {}).get("function", {}).get("name"), str)]
        if bad:
            raise APIError(400, f"tools.{bad[0]}: a tool needs function.name", f"tools.{bad[0]}")
        literal = functools.partial(lark_literal, self.tokenizer)
        grammar = tool_grammar(self.format, tools, literal, required=required, parallel=parallel)
        if grammar is None and required:
            raise APIError(400, f"the model {self.name} has no tool-call format to require a call in", "tool_choice")
        return {"grammar": grammar} if grammar else {}

    def check_length(self, ids: list[int], context: int | None = None) -> None:
        """APIError 400 unless `ids` leave room for a reply in the context (`context`: a smaller one a request
        asked for, as Ollama's num_ctx)."""
        limit = min(context or self.context, self.context)
        if len(ids) >= limit:
            whose = f"the context of {limit} tokens that num_ctx asks for" if limit < self.context else (
                f"this model's context of {limit} tokens")  # fmt: skip
            raise APIError(
                400, f"the prompt has {len(ids)} tokens, more than {whose} allows (it needs room for at least one "
                "generated token); shorten the prompt" + (" or raise num_ctx" if limit < self.context else ""),
                "messages", "context_length_exceeded",
            )  # fmt: skip

    def max_tokens(self, prompt: Prompt, requested: int | None, context: int | None = None) -> int:
        """Tokens left in the context when none (or too many) are requested."""
        room = min(context or self.context, self.context) - len(prompt.ids)
        return room if requested is None or requested <= 0 else min(requested, room)

    # -- embeddings ----------------------------------------------------------------------------
    async def embed(self, inputs: list, dimensions: int | None, truncate: bool) -> tuple[torch.Tensor, int]:
        """Unit vectors [n, d] for `inputs` (strings or token-id lists) and the tokens they took, as one batched
        forward on the engine's step thread (between two steps, never alongside one). Bad input: APIError 400
        (an input past the model's limit with `truncate` False, `dimensions` the model does not offer...)."""
        llm = self.llm
        try:
            rows = await asyncio.to_thread(llm.embed_inputs, inputs, truncate)
            vectors = await self.engine.call(lambda: llm.embed_ids(rows, dimensions))
        except ValueError as e:
            raise APIError(400, str(e), "dimensions" if "dimensions" in str(e) else "input") from None
        return vectors.cpu(), sum(len(r) for r in rows)

    # -- generation ----------------------------------------------------------------------------
    async def start(self, prompt: Prompt, params, index: int = 0, t0: float | None = None) -> Stream:
        """Submit one request and wait for its first output, so that a refused request raises here."""
        if not self.llm.can_generate:
            raise APIError(400, f"the model {self.name} is an embedding model: it cannot generate text; send its "
                           "inputs to /v1/embeddings or /api/embed", "model")  # fmt: skip
        t0 = time.perf_counter() if t0 is None else t0
        media = {"media": prompt.media} if prompt.media is not None else {}
        params = dataclasses.replace(params, detokenize=False)  # Stream decodes the ids itself, markers kept
        gen = self.engine.generate(prompt.ids, params, client=clients.current(), **media)
        try:
            first = await anext(gen, None)
        except ContextLengthError as e:
            await gen.aclose()
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        except ValueError as e:
            await gen.aclose()
            raise APIError(400, str(e)) from None
        except BaseException:
            await gen.aclose()
            raise
        self.metrics.started(self.name)
        return Stream(self, gen, first, prompt, params.stop, index, t0)

    async def start_all(self, jobs: list[tuple[Prompt, Any]]) -> list[Stream]:
        """start() each (prompt, params), concurrently; all are closed if any fails."""
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(self.start(p, sp, i, t0)) for i, (p, sp) in enumerate(jobs)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await (await t).aclose()
            raise


async def close_all(streams: list[Stream]) -> None:
    """Close every stream (idempotent): the background task of a streamed response, which runs even when the
    client left before the body started, so no engine request outlives its client."""
    for s in streams:
        await s.aclose()


async def merged(streams: list[Stream]) -> AsyncIterator[Piece]:
    """The pieces of several streams as they come; closing this closes them all."""
    if len(streams) == 1:
        async for p in streams[0].pieces():
            yield p
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(s: Stream) -> None:
        try:
            async for p in s.pieces():
                await queue.put(p)
        except Exception as e:
            await queue.put(e)
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each pump's stream closes as it ends
        await close_all(streams)


async def collect(streams: list[Stream]) -> list[Result]:
    """Run the streams to the end; one Result per stream, in order."""
    results = [Result(s.index) for s in streams]
    async for p in merged(streams):
        r = results[p.index]
        r.content += p.delta.content
        r.reasoning += p.delta.reasoning
        r.tool_calls += p.delta.tool_calls
        r.token_ids += p.token_ids
        r.logprobs += p.logprobs or []
        if p.finish_reason:
            r.finish_reason = p.finish_reason
    return results


async def unless_disconnected(request, work: Awaitable):
    """Await `work`, cancelling it (and so its engine requests) if the client goes away meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
