"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (schemas and translation only)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from ..chat_formats import CallDelta
from .catalog import Card
from .errors import APIError, openai_body
from .generation import Piece, Prompt, Result, ServedModel, Stream, close_all, collect, merged, unless_disconnected
from .inputs import (
    MAX_COUNT,
    MESSAGE_SCHEMA,
    PENALTY,
    SEED,
    chat_messages,
    make_params,
    one_constraint,
    stop_list,
    token_text,
)
from .registry import models, served

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields (user, store, metadata, ...) are ignored


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}

    def asked(self) -> list[tuple[str, str, Any]]:
        if self.type == "json_object":
            return [("response_format", "json_schema", True)]
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise APIError(
                    400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                    "response_format.json_schema.schema",
                )  # fmt: skip
            return [("response_format", "json_schema", schema)]
        return []


class StructuredOutputs(_Body):
    """vLLM's structured_outputs object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# Constraining fields other servers take, with the kind each asks for: vLLM's guided_* and llama-server's
# json_schema and grammar (GBNF, or llguidance's Lark).
_EXTENSION_FIELDS = {
    "guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
    "json_schema": "json_schema", "grammar": "grammar",
}  # fmt: skip


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_COUNT)  # extension (vLLM and others accept it)
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    repetition_penalty: float | None = Field(None, **PENALTY)  # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED)
    # Accepted and not applied (the engine has no per-token bias), but held to OpenAI's bounds.
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = Field(None, max_length=300)
    ignore_eos: bool = False  # extension
    return_progress: bool = False  # llama-server's: streamed prompt_progress chunks while a long prompt prefills
    speculative: bool | None = None  # extension: False turns speculative decoding off for this request, True on
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # extensions: vLLM's, then vLLM's and llama-server's
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    def asked(self) -> list[tuple[str, str, Any]]:
        """Every constraint the request sets: (field, kind, value)."""
        asked = self.response_format.asked() if self.response_format is not None else []
        asked += [(f, kind, getattr(self, f)) for f, kind in _EXTENSION_FIELDS.items() if getattr(self, f) is not None]
        so = self.structured_outputs
        if so is not None:
            fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
            kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
            asked += [(f"structured_outputs.{k}", kinds[k], v) for k, v in fields.items() if v is not None]
            if so.json_object:
                asked.append(("structured_outputs.json_object", "json_schema", True))
        return asked

    def params(
        self, model: ServedModel, prompt: Prompt, index: int, max_tokens: int | None, logprobs: int | None,
        constraint: dict[str, Any],
    ):  # fmt: skip
        return make_params(
            max_tokens=model.max_tokens(prompt, max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + index, stop=stop_list(self.stop), logprobs=logprobs,
            ignore_eos=self.ignore_eos or None, progress=(self.stream and self.return_progress) or None,
            speculative=self.speculative, **model.guided(prompt, constraint),
        )  # fmt: skip


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1, json_schema_extra={"items": MESSAGE_SCHEMA})
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None  # "none": thinking off; any other level: on (levels are not graded)
    chat_template_kwargs: dict[str, Any] | None = None  # extension: reaches the chat template
    image_tokens: int | None = None  # extension: the soft-token budget per image (70, 140, 280, 560, 1120)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_COUNT)  # OpenAI's default for this route
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=16)


def _usage(streams: list[Stream], prompts: int = 1) -> dict[str, Any]:
    firsts = streams[:: len(streams) // prompts]  # the choices of one prompt count its tokens once
    prompt, cached = sum(s.prompt_tokens for s in firsts), sum(s.cached_tokens for s in firsts)
    done = sum(s.completion_tokens for s in streams)
    return {
        "prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
        "prompt_tokens_details": {"cached_tokens": cached},
    }  # fmt: skip


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for e in events:
            yield _sse(e)
    except APIError as e:
        yield _sse(openai_body(e))
    except Exception as e:  # after the headers went out, an error can only be an event
        yield _sse(openai_body(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
    yield "data: [DONE]\n\n"


def _streaming(events: AsyncIterator[dict[str, Any]], streams: list[Stream]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    done = BackgroundTask(close_all, streams)
    return StreamingResponse(_sse_stream(events), media_type="text/event-stream", headers=headers, background=done)


# -- chat --------------------------------------------------------------------------------------
def _chat_logprobs(model: ServedModel, logprobs: list | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = token_text(model, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in logprobs]
    }


def _tool_calls(calls: list) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}} for c in calls
    ]


def _call_delta(d: CallDelta) -> dict[str, Any]:
    """A streamed tool-call delta: the first names the call, the others add to its arguments."""
    if d.name is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}}


def _thinking_kwargs(req: ChatRequest) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt"})
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
    if req.reasoning_effort is not None and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = req.reasoning_effort != "none"
    return kwargs


def _chat_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}: only that tool is offered
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise APIError(400, f"tool_choice names '{name}', which is not among the tools", "tool_choice")
    return tools


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    model = await served(request, req.model)
    messages = chat_messages(req.messages)
    tools = _chat_tools(req)
    prompt = model.chat_prompt(messages, tools, req.image_tokens, **_thinking_kwargs(req))
    constraint = _chat_constraint(model, req, tools)
    top = (req.top_logprobs or 0) if req.logprobs else None
    limit = req.max_completion_tokens or req.max_tokens
    jobs = [(prompt, req.params(model, prompt, i, limit, top, constraint)) for i in range(req.n)]
    streams = await model.start_all(jobs)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": rid, "created": created, "model": model.name, "system_fingerprint": model.fingerprint}
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return _streaming(_chat_events(model, streams, head, usage), streams)
    results = await unless_disconnected(request, collect(streams))
    choices = [_chat_choice(model, r, req.logprobs) for r in results]
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(streams)}


def _chat_constraint(model: ServedModel, req: ChatRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What the reply is held to: a tool call when tool_choice requires one (or names one), else the requested
    format; with tools on "auto" and no format asked, any call the model opens is held to the tools' schemas."""
    asked = req.asked()
    required = bool(tools) and (req.tool_choice == "required" or isinstance(req.tool_choice, dict))
    if required:
        if asked:
            raise APIError(
                400, f"tool_choice requires a tool call, and {asked[0][0]} asks for a format: give one", asked[0][0]
            )
        named = isinstance(req.tool_choice, dict)  # that function, called once
        return model.tool_constraint(tools, required=True, parallel=req.parallel_tool_calls and not named)
    if not asked and tools:
        return model.tool_constraint(tools, required=False, parallel=req.parallel_tool_calls)
    return one_constraint(asked)


def _chat_choice(model: ServedModel, r: Result, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": r.content if r.content or not r.tool_calls else None}
    if r.reasoning:
        message["reasoning_content"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = _tool_calls(r.tool_calls)
    reason = "tool_calls" if r.tool_calls and r.finish_reason != "length" else r.finish_reason
    lp = _chat_logprobs(model, r.logprobs) if logprobs else None
    return {"index": r.index, "message": message, "logprobs": lp, "finish_reason": reason}


async def _chat_events(model: ServedModel, streams: list[Stream], head: dict, usage: bool):
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if usage else {}
    called = [False] * len(streams)

    def chunk(index: int, delta: dict[str, Any], logprobs=None, reason=None) -> dict[str, Any]:
        return {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
            **extra,
        }

    for s in streams:
        yield chunk(s.index, {"role": "assistant", "content": ""})
    async for p in merged(streams):
        if p.progress:
            yield _progress_chunk(head, p, streams)
            continue
        delta: dict[str, Any] = {}
        if p.delta.reasoning:
            delta["reasoning_content"] = p.delta.reasoning
        if p.delta.content:
            delta["content"] = p.delta.content
        pieces = [d for d in p.delta.calls if d.name is not None or d.arguments]
        if pieces:
            delta["tool_calls"] = [_call_delta(d) for d in pieces]
        called[p.index] = called[p.index] or any(d.call for d in p.delta.calls)
        lp = _chat_logprobs(model, p.logprobs) if p.logprobs and p.token_ids else None
        if delta or lp:
            yield chunk(p.index, delta, lp)
        if p.finish_reason:
            call_end = called[p.index] and p.finish_reason != "length"
            yield chunk(p.index, {}, None, "tool_calls" if call_end else p.finish_reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(streams)}


def _progress_chunk(head: dict[str, Any], p: Piece, streams: list[Stream]) -> dict[str, Any]:
    """A prompt's prefill so far, in llama-server's `prompt_progress` shape, on a chunk with no choices."""
    done, total = p.progress
    s = next(s for s in streams if s.index == p.index)
    ms = int((time.perf_counter() - s.t_start) * 1000)
    progress = {"total": total, "cache": s.cached_tokens, "processed": done, "time_ms": ms}
    return {**head, "choices": [], "prompt_progress": progress}


# -- completions -------------------------------------------------------------------------------
def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    return list(prompt)


def _completion_logprobs(model: ServedModel, logprobs: list | None, offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens = [token_text(model, t.token_id) for t in logprobs]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{token_text(model, i): v for i, v in t.top} for t in logprobs],
        "text_offset": offsets,
    }


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    model = await served(request, req.model)
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (choices are not ranked)", "best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt logprobs, which are not computed", "echo")
    prompts = [model.text_prompt(p) for p in _prompts(req.prompt)]
    echoes = [
        (p if isinstance(p, str) else model.tokenizer.decode(p)) if req.echo else "" for p in _prompts(req.prompt)
    ]
    constraint = one_constraint(req.asked())
    jobs = [
        (p, req.params(model, p, j, req.max_tokens, req.logprobs, constraint)) for p in prompts for j in range(req.n)
    ]
    streams = await model.start_all(jobs)
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model.name}
    echo = [echoes[i // req.n] for i in range(len(streams))]
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return _streaming(_completion_events(model, streams, head, echo, usage, len(prompts)), streams)
    results = await unless_disconnected(request, collect(streams))
    choices = [
        {
            "index": r.index, "text": echo[r.index] + r.content, "finish_reason": r.finish_reason,
            "logprobs": _completion_logprobs(model, r.logprobs, len(echo[r.index])) if req.logprobs is not None else None,
        }
        for r in results
    ]  # fmt: skip
    return {**head, "choices": choices, "usage": _usage(streams, len(prompts))}


async def _completion_events(model, streams: list[Stream], head: dict, echo: list[str], usage: bool, prompts: int):
    extra = {"usage": None} if usage else {}
    offsets = [len(e) for e in echo]

    def chunk(p: Piece | None, index: int, text: str, reason=None) -> dict[str, Any]:
        lp = _completion_logprobs(model, p.logprobs, offsets[index]) if p is not None and p.logprobs else None
        return {**head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}], **extra}

    for i, e in enumerate(echo):
        if e:
            yield chunk(None, i, e)
    async for p in merged(streams):
        if p.progress:
            yield _progress_chunk(head, p, streams)
            continue
        text = p.delta.content
        if text or p.logprobs:
            yield chunk(p, p.index, text)
            offsets[p.index] += len(text)
        if p.finish_reason:
            yield chunk(None, p.index, "", p.finish_reason)
    if usage:
        yield {**head, "choices": [], "usage": _usage(streams, prompts)}


# -- models ------------------------------------------------------------------------------------
def _card(card: Card) -> dict[str, Any]:
    return {"id": card.name, "object": "model", "created": int(card.path.stat().st_mtime), "owned_by": "hearthlm",
            "input_modalities": card.input_modalities, "capabilities": card.capabilities}  # fmt: skip


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_card(c) for c in await asyncio.to_thread(models(request).cards)]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    return _card(await asyncio.to_thread(models(request).card, name))
