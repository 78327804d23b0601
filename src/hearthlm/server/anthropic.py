"""Anthropic-compatible routes: /v1/messages and /v1/messages/count_tokens (schemas and translation only).

A request's system prompt, turns and content blocks become the chat messages the template reads (tool calls and
results in the shape inputs.chat_messages takes), its tools OpenAI's function shape; the reply comes back as
content blocks (thinking, text, tool_use), whole or as Anthropic's stream of events."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from ..chat_formats import CallDelta, ToolCall
from .errors import APIError, anthropic_body
from .generation import Prompt, Result, ServedModel, Stream, close_all, collect, unless_disconnected
from .inputs import MAX_COUNT, chat_messages, make_params, stop_list
from .registry import served

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # metadata, cache_control, service_tier... are ignored


class ToolDef(_Body):
    type: str | None = None  # "custom" or absent; Anthropic's server tools (web_search_..., bash_...) are refused
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)  # accepted; max_tokens bounds reasoning and answer


# A turn as /openapi.json states it (the routes check the blocks): a role and its text or content blocks.
_TURN = {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": ["user", "assistant"]},
                   "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}},
}  # fmt: skip


class CountRequest(_Body):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1, json_schema_extra={"items": _TURN})
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class OutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: OutputFormat | None = None  # held to by constrained decoding
    effort: str | None = None  # accepted; effort levels are not graded


class MessagesRequest(CountRequest):
    max_tokens: int = Field(ge=1, le=MAX_COUNT)
    output_config: OutputConfig | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_COUNT)
    stream: bool = False


# -- request -> chat messages ------------------------------------------------------------------
def _kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise APIError(400, f"{where}: a content block must be an object with a type", where)
    if kind == "document":
        raise APIError(400, f"{where}: document blocks are not supported: send the text, or images", f"{where}.type")
    return kind


def _image(block: dict, where: str) -> dict[str, Any]:
    """An image block as a data-URL image part (a URL source is not fetched)."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") != "base64" or not isinstance(source.get("data"), str):
        raise APIError(400, f"{where}.source: send the image as {{type: base64, media_type, data}} (URLs are not "
                       "fetched)", f"{where}.source")  # fmt: skip
    url = f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    return {"type": "image_url", "image_url": {"url": url}}


def _user_message(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if all(p["type"] == "text" for p in parts):
        return {"role": "user", "content": "\n".join(p["text"] for p in parts)}
    return {"role": "user", "content": parts}


def _block_text(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"{where}.text: a text block needs its text as a string", f"{where}.text")
    return text


def _text(content: Any, where: str) -> str:
    """A system prompt or a tool result: a string, or a list of text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of text blocks", where)
    out = []
    for j, b in enumerate(content):
        if _kind(b, f"{where}.{j}") != "text":
            raise APIError(400, f"{where}.{j}: only text blocks are supported here, not {b['type']!r}", f"{where}.{j}")
        out.append(_block_text(b, f"{where}.{j}"))
    return "\n".join(out)


def _call_id(tool_use_id: Any) -> str | None:
    # Our tool_use ids are "toolu_" + the format's own call id (Mistral's template accepts only its own shape).
    return tool_use_id.removeprefix("toolu_") if isinstance(tool_use_id, str) else None


def _user_turn(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn: its tool_result blocks become tool messages, its text blocks user messages, in order."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of content blocks", where)
    out, parts = [], []
    for j, b in enumerate(content):
        kind, at = _kind(b, f"{where}.{j}"), f"{where}.{j}"
        if kind == "text":
            parts.append({"type": "text", "text": _block_text(b, at)})
        elif kind == "image":
            parts.append(_image(b, at))
        elif kind == "tool_result":
            if parts:
                out.append(_user_message(parts))
                parts = []
            result = _text(b.get("content"), f"{at}.content")
            result = f"Error: {result}" if b.get("is_error") else result
            out.append({"role": "tool", "tool_call_id": _call_id(b.get("tool_use_id")), "content": result})
        else:
            raise APIError(400, f"{at}: a user turn holds text, image and tool_result blocks, not {kind!r}",
                           f"{at}.type")  # fmt: skip
    if parts or not out:
        out.append(_user_message(parts))
    return out


def _assistant_turn(content: Any, where: str) -> dict[str, Any]:
    """An assistant turn: its text, its thinking as reasoning (redacted thinking is dropped) and its tool calls."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of content blocks", where)
    text, reasoning, calls = [], [], []
    for j, b in enumerate(content):
        kind, at = _kind(b, f"{where}.{j}"), f"{where}.{j}"
        if kind == "text":
            text.append(_block_text(b, at))
        elif kind == "thinking":
            reasoning.append(str(b.get("thinking") or ""))
        elif kind == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input"), dict):
                raise APIError(400, f"{at}: a tool_use block needs a name and an input object", at)
            fn = {"name": b["name"], "arguments": b["input"]}
            calls.append({"id": _call_id(b.get("id")), "type": "function", "function": fn})
        elif kind != "redacted_thinking":
            raise APIError(400, f"{at}: an assistant turn holds text, thinking and tool_use blocks, not {kind!r}", at)
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _chat(req: CountRequest) -> list[dict[str, Any]]:
    system = _text(req.system, "system")
    out = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(req.messages):
        role, where = m.get("role") if isinstance(m, dict) else None, f"messages.{i}"
        if role == "user":
            out += _user_turn(m.get("content"), f"{where}.content")
        elif role == "assistant":
            out.append(_assistant_turn(m.get("content"), f"{where}.content"))
        else:
            raise APIError(400, f"{where}.role: must be 'user' or 'assistant'", f"{where}.role")
    if req.messages[-1].get("role") == "assistant":
        raise APIError(400, "the last message is the assistant's: continuing it (prefill) is not supported", "messages")
    return chat_messages(out)


def _tools(req: CountRequest) -> list[dict[str, Any]] | None:
    """The tools the template is shown, in OpenAI's function shape; tool_choice 'none' shows none, 'tool' only
    the one it names."""
    choice = req.tool_choice or ToolChoice(type="auto")
    if choice.type in ("any", "tool") and not req.tools:
        raise APIError(400, f"tool_choice '{choice.type}' needs tools", "tool_choice")
    if not req.tools or choice.type == "none":
        return None
    tools = []
    for i, t in enumerate(req.tools):
        if t.type not in (None, "custom") or t.input_schema is None:
            what = f"server tools ({t.type}) are not supported" if t.type not in (None, "custom") else "input_schema"
            raise APIError(400, f"tools.{i}: {what}; a tool needs name, description and input_schema", f"tools.{i}")
        described = {"description": t.description} if t.description else {}
        tools.append({"type": "function", "function": {"name": t.name, **described, "parameters": t.input_schema}})
    if choice.type == "tool":
        tools = [t for t in tools if t["function"]["name"] == choice.name]
        if not tools:
            raise APIError(400, f"tool_choice names '{choice.name}', which is not among the tools", "tool_choice.name")
    return tools


def _template_kwargs(req: CountRequest) -> dict[str, Any]:
    t = req.thinking
    if t is None:  # Anthropic's default: no thinking unless asked (Qwen 3's template would think by default)
        return {"enable_thinking": False}
    if t.type in ("adaptive", "between_tools"):  # the model decides: the template's own default
        return {}
    if t.type == "enabled" and t.budget_tokens is None:
        raise APIError(400, "thinking.budget_tokens is required when thinking is enabled", "thinking.budget_tokens")
    return {"enable_thinking": t.type == "enabled"}


def _prompt(model: ServedModel, req: CountRequest) -> tuple[Prompt, list[dict[str, Any]] | None]:
    tools = _tools(req)
    return model.chat_prompt(_chat(req), tools, **_template_kwargs(req)), tools


def _constraint(model: ServedModel, req: MessagesRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What the reply is held to: a tool call when tool_choice is 'any' or 'tool', else the output format if one
    is asked for, else (with tools) the tools' schemas for any call the model writes."""
    choice = req.tool_choice or ToolChoice(type="auto")
    required, parallel = choice.type in ("any", "tool"), not choice.disable_parallel_tool_use
    form = req.output_config.format if req.output_config else None
    if tools and required and form is not None:
        raise APIError(
            400, "tool_choice requires a tool call and output_config.format a JSON reply: give one", "tool_choice"
        )
    if form is not None:
        return {"json_schema": form.schema_}
    return model.tool_constraint(tools, required=required, parallel=parallel) if tools else {}


def _params(model: ServedModel, req: MessagesRequest, prompt: Prompt, tools: list[dict[str, Any]] | None):
    constraint = _constraint(model, req, tools)
    return make_params(
        max_tokens=model.max_tokens(prompt, req.max_tokens), temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p, top_k=req.top_k, stop=stop_list(req.stop_sequences), **model.guided(prompt, constraint),
    )  # fmt: skip


# -- reply -> content blocks -------------------------------------------------------------------
def _signature(thinking: str) -> str:
    """The thinking block's signature, which the SDK requires: a digest of its text (not checked when it comes
    back; this server trusts the history it is sent)."""
    return hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": call.arguments}


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _stop(reason: str, called: bool, stream: Stream, room_limited: bool) -> dict[str, Any]:
    if reason == "length":
        return {"stop_reason": "model_context_window_exceeded" if room_limited else "max_tokens", "stop_sequence": None}
    if called:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if stream.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stream.stop_sequence}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def _usage(s: Stream) -> dict[str, Any]:
    # Anthropic counts the prompt's cached tokens apart: input + cache_read is the whole prompt.
    return {
        "input_tokens": s.prompt_tokens - s.cached_tokens, "output_tokens": s.completion_tokens,
        "cache_read_input_tokens": s.cached_tokens, "cache_creation_input_tokens": 0,
    }  # fmt: skip


def _blocks(r: Result) -> list[dict[str, Any]]:
    blocks = (
        [{"type": "thinking", "thinking": r.reasoning, "signature": _signature(r.reasoning)}] if r.reasoning else []
    )
    if r.content.strip() or (r.content and not r.tool_calls):  # not the blank between reasoning and a call
        blocks.append({"type": "text", "text": r.content})
    return blocks + [_tool_use(c) for c in r.tool_calls]


@router.post("/v1/messages")
async def messages(req: MessagesRequest, request: Request):
    model = await served(request, req.model)
    prompt, tools = _prompt(model, req)
    params = _params(model, req, prompt, tools)
    stream = await model.start(prompt, params)
    head = {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant", "model": model.name}
    room_limited = params.max_tokens < req.max_tokens
    if req.stream:
        events = _events(stream, head, room_limited)
        done = BackgroundTask(close_all, [stream])
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_sse(events), media_type="text/event-stream", headers=headers, background=done)
    [r] = await unless_disconnected(request, collect([stream]))
    stop = _stop(r.finish_reason, bool(r.tool_calls), stream, room_limited)
    return {**head, "content": _blocks(r), **stop, "usage": _usage(stream)}


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountRequest, request: Request):
    model = await served(request, req.model)
    prompt, _ = _prompt(model, req)
    return {"input_tokens": len(prompt.ids)}


# -- streaming ---------------------------------------------------------------------------------
class _BlockEvents:
    """Pieces of a reply as content-block events: one block open at a time, each opened by the first text of
    its kind; blank text waits until it is known to be part of an answer (not the gap before a tool call)."""

    def __init__(self):
        self.index, self.open, self.thinking, self.blank, self.called = -1, None, "", "", False

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.index, self.open = self.index + 1, block["type"]
        return [*events, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":  # the signature comes last, just before the block stops
            events.append(self._delta({"type": "signature_delta", "signature": _signature(self.thinking)}))
        self.open, self.thinking = None, ""
        return [*events, {"type": "content_block_stop", "index": self.index}]

    def reasoning(self, text: str) -> list[dict[str, Any]]:
        events = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "", "signature": ""})
        self.thinking += text
        return [*events, self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open != "text":
            if not (self.blank + text).strip():
                self.blank += text
                return []
            text, self.blank = self.blank + text, ""
            events = self._start({"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def tool_use(self, d: CallDelta) -> list[dict[str, Any]]:
        """A piece of a tool call: its first opens a tool_use block, each streams its input's JSON text, its last
        closes the block."""
        events = []
        if d.name is not None:
            self.blank = ""
            events = self._start({"type": "tool_use", "id": _tool_use_id(d.id), "name": d.name, "input": {}})
        if d.arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": d.arguments}))
        if d.done:
            self.called = self.called or d.call is not None
            events += self.close()
        return events

    def finish(self) -> list[dict[str, Any]]:
        if self.blank and not self.called:  # a blank answer is still the answer
            text, self.blank = self.blank, ""
            return [
                *self._start({"type": "text", "text": ""}),
                self._delta({"type": "text_delta", "text": text}),
                *self.close(),
            ]
        return self.close()


async def _events(stream: Stream, head: dict[str, Any], room_limited: bool) -> AsyncIterator[dict[str, Any]]:
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(stream)}
    yield {"type": "message_start", "message": start}
    yield {"type": "ping"}
    blocks, reason = _BlockEvents(), "stop"
    async for p in stream.pieces():
        events = [e for d in p.delta.continued_calls() for e in blocks.tool_use(d)]
        events += blocks.reasoning(p.delta.reasoning) if p.delta.reasoning else []
        events += blocks.text(p.delta.content) if p.delta.content else []
        for d in p.delta.new_calls():
            events += blocks.tool_use(d)
        for e in events:
            yield e
        reason = p.finish_reason or reason
    for e in blocks.finish():
        yield e
    usage = _usage(stream)  # the prompt's cached tokens are known now
    del usage["cache_creation_input_tokens"]
    yield {"type": "message_delta", "delta": _stop(reason, blocks.called, stream, room_limited), "usage": usage}
    yield {"type": "message_stop"}


def _event(obj: dict[str, Any]) -> str:
    return f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for e in events:
            yield _event(e)
    except APIError as e:
        yield _event(anthropic_body(e))
    except Exception as e:  # after the headers went out, an error can only be an event
        yield _event(anthropic_body(APIError(500, f"generation failed: {type(e).__name__}: {e}")))
