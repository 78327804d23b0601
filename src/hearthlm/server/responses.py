"""OpenAI's Responses API: POST /v1/responses (whole or as its SSE events), GET and DELETE /v1/responses/{id}.

A request's input items (with the conversation of its previous_response_id before them) become chat messages for
the template, and its function tools and text.format become the same constraints the chat route uses; one engine
request then runs through `_Reply`, which turns its pieces into output items and stream events, so that a
streamed response and a whole one are built by the same code. Stored responses live in a bounded store on the
app (`app.state.responses`)."""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from ..chat_formats import CallDelta
from .errors import APIError
from .generation import Piece, Prompt, ServedModel, Stream, close_all, unless_disconnected
from .inputs import chat_messages, make_params, one_constraint
from .registry import served

router = APIRouter()

STORE_LIMIT = 1000  # stored responses per server; the least recently used one goes first


# -- the store ---------------------------------------------------------------------------------------------
@dataclass
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # every input item and output item so far, oldest first


class ResponseStore:
    """Responses kept for previous_response_id and GET, least recently used first out past `limit`."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit, self._items = limit, OrderedDict()

    def get(self, rid: str, param: str | None = None) -> Stored:
        stored = self._items.get(rid)
        if stored is None:
            raise APIError(404, f"no stored response with id '{rid}'", param, "response_not_found")
        self._items.move_to_end(rid)
        return stored

    def put(self, rid: str, stored: Stored) -> None:
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._items[rid]


def _store(request: Request) -> ResponseStore:
    state = request.app.state
    if getattr(state, "responses", None) is None:  # one store per app: test servers never share one
        state.responses = ResponseStore()
    return state.responses


# -- the request -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)  # include, truncation, ...: accepted


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: Any = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def asked(self) -> list[tuple[str, str, Any]]:
        if self.type == "json_object":
            return [("text.format", "json_schema", True)]
        if self.type == "json_schema":
            if not isinstance(self.schema_, dict):
                raise APIError(400, "text.format json_schema needs schema, a JSON schema object", "text.format.schema")
            return [("text.format", "json_schema", self.schema_)]
        return []


class TextConfig(_Body):
    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: str | None = None


class ReasoningConfig(_Body):
    effort: str | None = None  # "none" and "minimal": thinking off; other levels: on (levels are not graded)
    summary: str | None = None


class ResponsesRequest(_Body):
    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None


# -- input items -> chat messages ----------------------------------------------------------------------------
_TEXT_PARTS = {"input_text", "output_text", "text", "reasoning_text", "summary_text"}


def _parts_text(content: Any, where: str) -> str:
    """A content field as text: a string, or a list of text parts (images, files and audio are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts", where)
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            out.append(str(part.get("refusal", "")))
        elif isinstance(kind, str) and kind in _TEXT_PARTS:
            out.append(str(part.get("text", "")))
        else:
            raise APIError(400, f"{where}.{k}: content parts of type {kind!r} are not supported (text only)", where)
    return "".join(out)


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A user or system message's content: its text, or its parts when it holds `input_image` parts (data URLs;
    an image URL is not fetched, a file id is not known here)."""
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return _parts_text(content, where)
    parts = []
    for k, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise APIError(400, f"{where}.{k}: an input_image needs a data URL in image_url (URLs are not "
                               "fetched, and file ids are not known here)", where)  # fmt: skip
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": _parts_text([part], f"{where}.{k}")})
    return parts


def _items(value: str | list[Any]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not value:
        raise APIError(400, "input is empty", "input")
    bad = [i for i, item in enumerate(value) if not isinstance(item, dict)]
    if bad:
        raise APIError(400, f"input.{bad[0]}: an input item must be an object", f"input.{bad[0]}")
    return value


def _call_arguments(text: Any, where: str) -> dict[str, Any]:
    try:
        args = json.loads(text) if isinstance(text, str) and text.strip() else (text or {})
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object, as a string", f"{where}.arguments")
    return args


class _Conversation:
    """Builds chat messages from Responses items, in order: function calls join the assistant turn they follow,
    reasoning goes to the next assistant turn, a call's output needs the call."""

    def __init__(self, instructions: str | None):
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
        self.reasoning, self.calls = "", set()

    def _assistant(self, fresh: bool) -> dict[str, Any]:
        last = self.messages[-1] if self.messages else None
        if fresh or last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            self.messages.append(last)
        if self.reasoning:
            last["reasoning_content"], self.reasoning = self.reasoning, ""
        return last

    def add(self, item: dict[str, Any], where: str) -> None:
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}: role must be user, system, developer or assistant", f"{where}.role")
            if role == "assistant":
                self._assistant(fresh=True)["content"] = _parts_text(item.get("content"), f"{where}.content")
            else:
                self.messages.append({"role": role, "content": _user_content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            self._function_call(item, where)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in self.calls:
                raise APIError(
                    400, f"{where}: no function_call with call_id {call_id!r} comes before this output", where
                )
            output = _parts_text(item.get("output"), f"{where}.output")
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            self.reasoning += _parts_text(parts, f"{where}.content")
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported", f"{where}.type")

    def _function_call(self, item: dict[str, Any], where: str) -> None:
        name, call_id = item.get("name"), item.get("call_id")
        if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
            raise APIError(400, f"{where}: a function_call needs name and call_id", where)
        turn = self._assistant(fresh=False)
        call = {"id": call_id, "type": "function", "function": {"name": name}}
        call["function"]["arguments"] = _call_arguments(item.get("arguments"), where)
        turn.setdefault("tool_calls", []).append(call)
        self.calls.add(call_id)


def _messages(history: list[dict], items: list[dict], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages for the template: `instructions` as the system message, then the stored conversation of
    previous_response_id (`history`) and the request's input items."""
    conv = _Conversation(instructions)
    for item in history:
        conv.add(item, "previous_response_id")
    for i, item in enumerate(items):
        conv.add(item, f"input.{i}")
    return chat_messages(conv.messages)


# -- tools, format, sampling ---------------------------------------------------------------------------------
def _tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The request's function tools in the chat shape the templates and grammars read; None when none apply."""
    tools = []
    for i, t in enumerate(req.tools or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise APIError(400, f"tools.{i}: tools of type {kind!r} are not supported (function tools only)", "tools")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise APIError(400, f"tools.{i}: a function tool needs a name", f"tools.{i}.name")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):  # {"type": "function", "name": ...}: only that tool is offered
        if choice.get("type") != "function":
            raise APIError(400, f"tool_choice of type {choice.get('type')!r} is not supported", "tool_choice")
        tools = [t for t in tools if t["function"]["name"] == choice.get("name")]
        if not tools:
            raise APIError(
                400, f"tool_choice names {choice.get('name')!r}, which is not among the tools", "tool_choice"
            )
    return tools


def _constraint(model: ServedModel, req: ResponsesRequest, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """As the chat route's: a call when tool_choice requires one (or names one), else the text format; with tools
    on "auto" and no format, a call the model opens is held to the tools' schemas."""
    asked = req.text.format.asked() if req.text is not None else []
    named = isinstance(req.tool_choice, dict)
    if tools and (req.tool_choice == "required" or named):
        if asked:
            raise APIError(400, "tool_choice requires a tool call, and text.format asks for a format: give one", "text")
        return model.tool_constraint(tools, required=True, parallel=req.parallel_tool_calls and not named)
    if tools and not asked:
        return model.tool_constraint(tools, required=False, parallel=req.parallel_tool_calls)
    return one_constraint(asked)


def _thinking(req: ResponsesRequest) -> dict[str, Any]:
    effort = req.reasoning.effort if req.reasoning is not None else None
    return {} if effort is None else {"enable_thinking": effort not in ("none", "minimal")}


def _params(model: ServedModel, req: ResponsesRequest, prompt: Prompt, constraint: dict[str, Any]):
    return make_params(
        max_tokens=model.max_tokens(prompt, req.max_output_tokens),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p,
        **model.guided(prompt, constraint),
    )


def _echo(req: ResponsesRequest, model: ServedModel) -> dict[str, Any]:
    """The request fields a response object repeats (those the SDK's Response model requires among them)."""
    text = req.text or TextConfig()
    return {
        "model": model.name, "instructions": req.instructions, "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p, "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id,
        "reasoning": (req.reasoning or ReasoningConfig()).model_dump(),
        "text": text.model_dump(by_alias=True, exclude_none=True), "metadata": req.metadata or {},
        "user": req.user, "store": req.store, "truncation": "disabled", "background": False,
    }  # fmt: skip


# -- the reply: pieces -> output items and events ---------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class _Reply:
    """One response being built from its engine pieces. `feed()` returns the stream events a piece causes;
    the output items it builds are the whole response's, streamed or not."""

    _PARTS = {"message": ("output_text", "output_text"), "reasoning": ("reasoning_text", "reasoning_text")}

    def __init__(self, model: ServedModel, stream: Stream, echo: dict[str, Any]):
        self.model, self.stream, self.echo = model, stream, echo
        self.id, self.created = _new_id("resp"), int(time.time())
        self.output: list[dict[str, Any]] = []
        self.seq, self.status, self.finished_at = 0, "in_progress", None
        self.open: dict[str, Any] | None = None  # the message or reasoning item text goes to now
        self.calls: dict[int, dict[str, Any]] = {}  # the function_call items, by the call's number in the reply
        self.error: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def _at(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item))]

    def _done(self, item: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        item["status"] = status
        return self.event("response.output_item.done", output_index=self.output.index(item), item=copy.deepcopy(item))

    def _open(self, kind: str) -> list[dict[str, Any]]:
        events = self._close()
        if kind == "message":
            item = {
                "id": _new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
        else:
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        events += self._add(item)
        part = {"type": self._PARTS[kind][0], "text": ""} | ({"annotations": []} if kind == "message" else {})
        events.append(self.event("response.content_part.added", **self._at(item), content_index=0, part=dict(part)))
        item["content"].append(part)
        self.open = item
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = self._open(kind) if self.open is None or self.open["type"] != kind else []
        self.open["content"][0]["text"] += text
        extra = {"logprobs": []} if kind == "message" else {}
        name = self._PARTS[kind][1]
        return events + [
            self.event(f"response.{name}.delta", **self._at(self.open), content_index=0, delta=text, **extra)
        ]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        part, at = item["content"][0], self._at(item)
        extra = {"logprobs": []} if item["type"] == "message" else {}
        name = self._PARTS[item["type"]][1]
        return [
            self.event(f"response.{name}.done", **at, content_index=0, text=part["text"], **extra),
            self.event("response.content_part.done", **at, content_index=0, part=dict(part)),
            self._done(item, status),
        ]

    def _call(self, d: CallDelta) -> list[dict[str, Any]]:
        """A piece of a tool call: its first adds a function_call item, each streams its arguments, its last ends
        the item (incomplete if the call's text did not parse in the end)."""
        events = []
        if d.name is not None:
            item = {
                "id": _new_id("fc"), "type": "function_call", "call_id": d.id, "name": d.name, "arguments": "",
                "status": "in_progress",
            }  # fmt: skip
            events = self._close() + self._add(item)
            self.calls[d.index] = item
        item = self.calls[d.index]
        at = self._at(item)
        if d.arguments:
            item["arguments"] += d.arguments
            events.append(self.event("response.function_call_arguments.delta", **at, delta=d.arguments))
        if d.done:
            item["arguments"] = d.call.arguments_json if d.call else item["arguments"]
            events.append(self.event("response.function_call_arguments.done", **at, arguments=item["arguments"]))
            events.append(self._done(item, "completed" if d.call else "incomplete"))
        return events

    def feed(self, piece: Piece) -> list[dict[str, Any]]:
        d = piece.delta
        events = [e for call in d.continued_calls() for e in self._call(call)]
        if d.reasoning:
            events += self._text("reasoning", d.reasoning)
        if d.content:
            events += self._text("message", d.content)
        for call in d.new_calls():
            events += self._call(call)
        if piece.finish_reason:
            events += self.finish(piece.finish_reason)
        return events

    def finish(self, reason: str | None) -> list[dict[str, Any]]:
        """Close the open item; a reply with no answer and no call still gets its (empty) message."""
        cut = reason == "length"
        events = self._close("incomplete" if cut else "completed")
        if not cut and not any(item["type"] != "reasoning" for item in self.output):
            events += self._open("message") + self._close()
        self.status, self.finished_at = ("incomplete" if cut else "completed"), int(time.time())
        return events

    def fail(self, message: str) -> dict[str, Any]:
        self.status, self.error = "failed", {"code": "server_error", "message": message}
        return self.event("response.failed", response=self.response())

    def usage(self) -> dict[str, Any]:
        s = self.stream
        thought = "".join(p["text"] for i in self.output if i["type"] == "reasoning" for p in i["content"])
        # The engine does not count reasoning tokens apart: the reasoning text re-encoded is the estimate.
        reasoning = len(self.model.tokenizer.encode(thought, add_special_tokens=False)) if thought else 0
        return {
            "input_tokens": s.prompt_tokens,
            "input_tokens_details": {"cached_tokens": s.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": s.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning, s.completion_tokens)},
            "total_tokens": s.prompt_tokens + s.completion_tokens,
        }

    def response(self, output: bool = True) -> dict[str, Any]:
        done = self.status in ("completed", "incomplete")
        cut = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status,
            "completed_at": self.finished_at, "error": self.error, "incomplete_details": cut, **self.echo,
            "output": copy.deepcopy(self.output) if output else [], "usage": self.usage() if done else None,
        }  # fmt: skip


# -- routes ------------------------------------------------------------------------------------------------
@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    model = await served(request, req.model)
    store = _store(request)
    history = (
        store.get(req.previous_response_id, "previous_response_id").conversation if req.previous_response_id else []
    )
    items, tools, echo = _items(req.input), _tools(req), _echo(req, model)
    prompt = model.chat_prompt(_messages(history, items, req.instructions), tools, **_thinking(req))
    [stream] = await model.start_all([(prompt, _params(model, req, prompt, _constraint(model, req, tools)))])
    reply, conversation, keep = _Reply(model, stream, echo), [*history, *items], store if req.store else None
    if req.stream:
        return _streaming(_events(reply, keep, conversation), stream)
    await unless_disconnected(request, _drain(_run(reply)))
    if keep is not None:
        _keep(keep, reply, conversation)
    return reply.response()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return _store(request).get(response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    _store(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _keep(store: ResponseStore, reply: _Reply, conversation: list[dict[str, Any]]) -> None:
    response = reply.response()
    store.put(reply.id, Stored(response, [*conversation, *response["output"]]))


async def _run(reply: _Reply) -> AsyncIterator[dict[str, Any]]:
    """The events of the reply's items, to its end."""
    async for piece in reply.stream.pieces():
        for e in reply.feed(piece):
            yield e
    if reply.status == "in_progress":  # the engine ended without a finish reason
        for e in reply.finish(None):
            yield e


async def _drain(events: AsyncIterator[dict[str, Any]]) -> None:
    async for _ in events:
        pass


async def _events(reply: _Reply, store: ResponseStore | None, conversation: list[dict]) -> AsyncIterator[dict]:
    """The whole event stream: created, in_progress, the items' events, then completed, incomplete or failed.
    The response is stored before its last event, so a client may follow it up at once."""
    yield reply.event("response.created", response=reply.response(output=False))
    yield reply.event("response.in_progress", response=reply.response(output=False))
    try:
        async for e in _run(reply):
            yield e
    except APIError as e:  # after the headers went out, a failure can only be an event
        yield reply.fail(e.message)
        return
    except Exception as e:
        yield reply.fail(f"generation failed: {type(e).__name__}: {e}")
        return
    if store is not None:
        _keep(store, reply, conversation)
    yield reply.event(f"response.{reply.status}", response=reply.response())


def _streaming(events: AsyncIterator[dict[str, Any]], stream: Stream) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    done = BackgroundTask(close_all, [stream])  # runs even when the client left before the body started
    return StreamingResponse(_sse(events), media_type="text/event-stream", headers=headers, background=done)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for e in events:
        yield f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"
