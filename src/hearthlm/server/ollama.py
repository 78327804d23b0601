"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/pull, /api/delete,
/api/copy, /api/version, / (schemas and translation only)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from .. import __version__, store
from .catalog import Card, card
from .errors import APIError, ollama_body
from .generation import Prompt, ServedModel, Stream, close_all, collect, merged, unless_disconnected
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
from .registry import FOREVER, Slot, keep_alive_seconds, models, served

router = APIRouter()


class Options(BaseModel):
    """Ollama's `options`. Used: temperature, top_p, top_k, min_p, num_predict, num_ctx, seed, stop, repeat_penalty,
    presence_penalty, frequency_penalty. Accepted and ignored: everything else (num_thread, mirostat...)."""

    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_COUNT)
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2, le=MAX_COUNT)  # -1: until the context is full, -2: the same here
    num_ctx: int | None = Field(None, ge=1, le=MAX_COUNT)  # the context a request may fill (at most the model's)
    image_tokens: int | None = None  # extension: the soft-token budget per image (70, 140, 280, 560, 1120)
    seed: int | None = Field(None, **SEED)
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, **PENALTY)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields that do not apply are ignored
    model: str = Field(min_length=1)
    keep_alive: int | float | str | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # extensions, named as llama-server and vLLM name them: a grammar (GBNF or llguidance's Lark), a regex, a choice
    grammar: str | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def constraint(self) -> dict[str, Any]:
        asked = [("format", "json_schema", True if self.format == "json" else self.format)] if self.format else []
        asked += [(f, f, getattr(self, f)) for f in ("grammar", "regex", "choice") if getattr(self, f) is not None]
        return one_constraint(asked)

    def params(self, model: ServedModel, prompt: Prompt, constraint: dict[str, Any] | None = None):
        o = self.options
        # Ollama's documented defaults: temperature 0.8, top_k 40, top_p 0.9 (no repeat penalty unless asked).
        return make_params(
            max_tokens=model.max_tokens(prompt, o.num_predict, o.num_ctx), temperature=0.8 if o.temperature is None else o.temperature,
            top_p=0.9 if o.top_p is None else o.top_p, top_k=40 if o.top_k is None else o.top_k, min_p=o.min_p,
            seed=o.seed, stop=stop_list(o.stop), repetition_penalty=o.repeat_penalty,
            presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **model.guided(prompt, self.constraint() if constraint is None else constraint),
        )  # fmt: skip

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.think is None else {"enable_thinking": bool(self.think)}


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(default_factory=list, json_schema_extra={"items": MESSAGE_SCHEMA})
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Request):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    suffix: str | None = None
    images: list[str] | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


def _timings(s: Stream) -> dict[str, Any]:
    """Ollama's counts and durations (nanoseconds): prompt evaluation runs to the first token, eval after it."""
    first, end = s.t_first or s.t_end or s.t_start, s.t_end or s.t_last or s.t_start
    return {
        "total_duration": _ns(end - s.t_start), "load_duration": 0,
        "prompt_eval_count": s.prompt_tokens, "prompt_eval_duration": _ns(first - s.t_start),
        "eval_count": s.completion_tokens, "eval_duration": _ns(end - first),
    }  # fmt: skip


def _logprobs(model: ServedModel, logprobs: list | None) -> list[dict[str, Any]] | None:
    if not logprobs:
        return None
    return [
        {
            "token": token_text(model, t.token_id), "logprob": t.logprob,
            "top_logprobs": [{"token": token_text(model, i), "logprob": v} for i, v in t.top],
        }
        for t in logprobs
    ]  # fmt: skip


def _calls(calls: list) -> list[dict[str, Any]]:
    """Tool calls as Ollama 0.9.0 writes them: `function` alone, with no call id (ids came with 0.12.10). Clients
    written against it parse a call as a one-key object: Zed's ollama crate reads {"function": ...} as an enum."""
    return [{"function": {"index": k, "name": c.name, "arguments": c.arguments}} for k, c in enumerate(calls)]


async def _lines(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for e in events:
            yield json.dumps(e, ensure_ascii=False) + "\n"
    except APIError as e:
        yield json.dumps(ollama_body(e)) + "\n"
    except Exception as e:  # after the headers went out, an error can only be a line
        yield json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n"


def _ndjson(events: AsyncIterator[dict[str, Any]], stream: Stream) -> StreamingResponse:
    done = BackgroundTask(close_all, [stream])  # runs even when the client left before the body started
    return StreamingResponse(_lines(events), media_type="application/x-ndjson", background=done)


async def _load_or_unload(request: Request, req: _Request) -> str:
    """An empty chat or generate: keep_alive 0 unloads the model (without loading it first), else it loads."""
    if keep_alive_seconds(req.keep_alive) == 0:
        models(request).unload_named(req.model)
        return "unload"
    await served(request, req.model, req.keep_alive)
    return "load"


@router.post("/api/chat")
async def chat(req: ChatRequest, request: Request):
    if not req.messages:  # Ollama loads (or with keep_alive 0 unloads) the model and answers at once
        return {"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done_reason": await _load_or_unload(request, req), "done": True}  # fmt: skip
    model = await served(request, req.model, req.keep_alive)
    prompt = model.chat_prompt(
        chat_messages(req.messages), req.tools, req.options.image_tokens, **req.template_kwargs()
    )
    model.check_length(prompt.ids, req.options.num_ctx)
    constraint = req.constraint()
    if not constraint and req.tools:  # a call the model opens is held to the tools' schemas
        constraint = model.tool_constraint(req.tools, required=False)
    [stream] = await model.start_all([(prompt, req.params(model, prompt, constraint))])
    head = {"model": req.model}
    if req.stream:
        return _ndjson(_chat_events(model, stream, head), stream)
    [r] = await unless_disconnected(request, collect([stream]))
    message = {"role": "assistant", "content": r.content}
    if r.reasoning:
        message["thinking"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = _calls(r.tool_calls)
    body = {**head, "created_at": _now(), "message": message, "done": True, "done_reason": r.finish_reason}
    if req.logprobs:
        body["logprobs"] = _logprobs(model, r.logprobs)
    return {**body, **_timings(stream)}


async def _chat_events(model: ServedModel, stream: Stream, head: dict[str, Any]):
    async for p in merged([stream]):
        message: dict[str, Any] = {"role": "assistant", "content": p.delta.content}
        if p.delta.reasoning:
            message["thinking"] = p.delta.reasoning
        if p.delta.tool_calls:
            message["tool_calls"] = _calls(p.delta.tool_calls)
        line = {**head, "created_at": _now(), "message": message, "done": False}
        if p.logprobs:
            line["logprobs"] = _logprobs(model, p.logprobs)
        if p.delta or p.logprobs:
            yield line
        if p.finish_reason:
            done = {"role": "assistant", "content": ""}
            yield {
                **head,
                "created_at": _now(),
                "message": done,
                "done": True,
                "done_reason": p.finish_reason,
                **_timings(stream),
            }


@router.post("/api/generate")
async def generate(req: GenerateRequest, request: Request):
    if req.images and (req.raw or req.context):
        raise APIError(400, "images go through the chat template: send them without raw or context", "images")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported")
    if not req.prompt and not req.context:  # Ollama loads (or with keep_alive 0 unloads) the model at once
        reason = await _load_or_unload(request, req)
        return {"model": req.model, "created_at": _now(), "response": "", "done": True, "done_reason": reason}
    model = await served(request, req.model, req.keep_alive)
    prompt = _generate_prompt(model, req)
    model.check_length(prompt.ids, req.options.num_ctx)
    [stream] = await model.start_all([(prompt, req.params(model, prompt))])
    head = {"model": req.model}
    if req.stream:
        return _ndjson(_generate_events(model, stream, head, prompt), stream)
    [r] = await unless_disconnected(request, collect([stream]))
    body = {**head, "created_at": _now(), "response": r.content, "done": True, "done_reason": r.finish_reason}
    if r.reasoning:
        body["thinking"] = r.reasoning
    if req.logprobs:
        body["logprobs"] = _logprobs(model, r.logprobs)
    return {**body, "context": prompt.ids + r.token_ids, **_timings(stream)}


def _generate_prompt(model: ServedModel, req: GenerateRequest) -> Prompt:
    """raw: the prompt as it is; otherwise one user turn (and `system`) through the chat template. `context`
    (the token ids a previous reply returned) goes first, as in Ollama."""
    tok = model.tokenizer
    if req.raw or tok is None or not tok.has_chat_template:
        prompt = model.text_prompt(
            (req.context or []) + (tok.encode(req.prompt or "", add_special_tokens=not req.context) if tok else [])
        )
        return prompt
    user = {"role": "user", "content": req.prompt or "", "images": req.images}
    messages = chat_messages(([{"role": "system", "content": req.system}] if req.system else []) + [user])
    chat = model.chat_prompt(messages, None, req.options.image_tokens, **req.template_kwargs())
    if req.context:
        rest = chat.ids[1:] if tok.bos_token and chat.ids[:1] == [tok.token_id(tok.bos_token)] else chat.ids
        chat.ids = list(req.context) + rest
        model.check_length(chat.ids)
    return chat


async def _generate_events(model: ServedModel, stream: Stream, head: dict[str, Any], prompt: Prompt):
    ids: list[int] = []
    async for p in merged([stream]):
        ids += p.token_ids
        line = {**head, "created_at": _now(), "response": p.delta.content, "done": False}
        if p.delta.reasoning:
            line["thinking"] = p.delta.reasoning
        if p.logprobs:
            line["logprobs"] = _logprobs(model, p.logprobs)
        if p.delta or p.logprobs:
            yield line
        if p.finish_reason:
            yield {**head, "created_at": _now(), "response": "", "done": True, "done_reason": p.finish_reason,
                   "context": prompt.ids + ids, **_timings(stream)}  # fmt: skip


# -- model information ---------------------------------------------------------------------------
def tagged(name: str) -> str:
    """A model name as Ollama lists it: with a tag, ':latest' when it has none (Open WebUI adds ':latest' to a
    name without a tag and then looks for that exact name in /api/tags)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _entry(card: Card, quant: str | None = None) -> dict[str, Any]:
    name = tagged(card.name)
    return {"name": name, "model": name, "modified_at": card.modified_at, "size": card.size, "digest": card.digest,
            "details": card.details(quant)}  # fmt: skip


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [_entry(c) for c in await asyncio.to_thread(models(request).cards)]}


def _expires_at(slot: Slot) -> str:
    if slot.pinned or slot.keep_alive == FOREVER:
        at = datetime.now(timezone.utc) + timedelta(days=3650)
    elif slot.busy:  # in use: its keep_alive starts when its requests end
        at = datetime.now(timezone.utc) + timedelta(seconds=slot.keep_alive)
    else:
        at = datetime.fromtimestamp(slot.expires, timezone.utc)
    return at.isoformat()


@router.get("/api/ps")
async def ps(request: Request):
    out = []
    for slot in models(request).loaded():
        model = slot.model
        c = await asyncio.to_thread(card, slot.name, slot.path)
        vram = slot.size if model.llm.device.type != "cpu" else 0
        out.append({**_entry(c, model.llm.quant), "expires_at": _expires_at(slot), "size": slot.size,
                    "size_vram": vram, "context_length": model.context})  # fmt: skip
    return {"models": out}


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


@router.post("/api/show")
async def show(req: ShowRequest, request: Request):
    """What a model is, from its files: showing a model does not load it."""
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required", "model")
    c = await asyncio.to_thread(models(request).card, name)
    return {"modelfile": f"FROM {c.path}\n", "parameters": c.parameters(), "template": c.template or "",
            "details": c.details(), "model_info": c.model_info(), "capabilities": c.capabilities,
            "modified_at": c.modified_at}  # fmt: skip


# -- the store ---------------------------------------------------------------------------------------
class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


def _repo_id(name: str) -> str:
    """The Hugging Face repo a pull names: "org/name", also written as Ollama writes Hub models
    ("hf.co/org/name", "huggingface.co/org/name:latest")."""
    repo = name.strip().removesuffix(":latest")
    for prefix in ("https://", "http://", "hf.co/", "huggingface.co/"):
        repo = repo.removeprefix(prefix)
    if not store.is_hf_id(repo):
        raise APIError(400, f"'{name}' is not a Hugging Face repo id: hearthlm pulls from the Hub, so name a repo "
                       "such as 'Qwen/Qwen2.5-0.5B-Instruct' (Ollama's own library is not reachable)", "model")  # fmt: skip
    return repo


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _progress(file: str, blob: str, completed: int, total: int | None) -> dict[str, Any]:
    """A file's progress line. `digest` only when the Hub gave the file's sha256 (a large file's); a small file's
    git blob id is not one, and a digest is always 'sha256:' and 64 hex digits."""
    line = {"status": f"pulling {file}", "total": total or completed, "completed": completed}
    return {**line, "digest": f"sha256:{blob}"} if _SHA256.match(blob) else line


async def _pull_events(repo: str) -> AsyncIterator[dict[str, Any]]:
    """The store's pull, in a thread, as Ollama's progress lines: the manifest, each file's bytes (at most ~10
    lines a second per file, and its last), then success; a failure is the last line, {"error": ...}."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    last: dict[str, float] = {}

    def report(file: str, blob: str, completed: int, total: int | None) -> None:
        now = time.monotonic()
        if completed == total or now - last.get(file, 0.0) >= 0.1:
            last[file] = now
            loop.call_soon_threadsafe(queue.put_nowait, _progress(file, blob, completed, total))

    def work() -> None:
        try:
            store.pull(repo, progress=False, report=report)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except Exception as e:
            loop.call_soon_threadsafe(queue.put_nowait, e)

    yield {"status": "pulling manifest"}
    task = asyncio.ensure_future(asyncio.to_thread(work))
    while (item := await queue.get()) is not None:
        if isinstance(item, Exception):
            raise APIError(400 if isinstance(item, store.PullError) else 500, f"pull of {repo} failed: {item}")
        yield item
    await task
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    yield {"status": "success"}


@router.post("/api/pull")
async def pull(req: PullRequest):
    """Download a model into the store (`hearth pull`), streaming progress. A client that leaves does not stop
    the download; a later pull resumes or finds it done."""
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required", "model")
    events = _pull_events(_repo_id(name))
    if not req.stream:
        async for _ in events:
            pass
        return {"status": "success"}
    return StreamingResponse(_lines(events), media_type="application/x-ndjson")


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


def _store_call(fn, *args):
    try:
        return fn(*args)
    except store.ModelNotFoundError as e:
        raise APIError(404, str(e), "model", "model_not_found") from None
    except store.StoreError as e:
        raise APIError(400, str(e), "model") from None


@router.delete("/api/delete")
async def delete(req: DeleteRequest, request: Request):
    """Remove a model from the store (unloading it first), or an alias alone."""
    name = (req.model or req.name or "").strip().removesuffix(":latest")
    if not name:
        raise APIError(400, "model is required", "model")
    registry = models(request)
    if registry.pinned is not None:
        registry.find(name)  # 404 for another name
        raise APIError(400, f"this server serves '{registry.pinned.name}' alone and cannot delete it; stop it, "
                       "then run `hearth rm`", "model")  # fmt: skip
    listed, path = registry.find(name)
    removed = await asyncio.to_thread(_store_call, store.remove, listed)
    if removed.name != store.ALIASES:
        registry.forget(path)
    return Response(status_code=200)


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


@router.post("/api/copy")
async def copy(req: CopyRequest, request: Request):
    """Another name for a model: an alias in the store, served as the model it names."""
    if models(request).pinned is not None:
        raise APIError(400, "this server serves one model; copies are made in the store: `hearth serve` with no "
                       "model serves them", "source")  # fmt: skip
    listed, _ = models(request).find(req.source)
    await asyncio.to_thread(_store_call, store.copy, listed, req.destination.strip().removesuffix(":latest"))
    return Response(status_code=200)


# The Ollama API version these routes implement, as clients compare it (VS Code Copilot refuses below 0.6.4):
# 0.9.0, the release that added `think` (with 0.8.0's streamed tool calls before it), which /api/chat and
# /api/generate serve. Later releases' additions are not all here, so no later number is claimed; nor are routes
# older than this (/api/embed, /api/pull, /api/create...): an Ollama client sees a 404 for them.
OLLAMA_API_VERSION = "0.9.0"


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_API_VERSION, "hearthlm": __version__}


@router.get("/", response_class=PlainTextResponse)
async def root(request: Request):
    if "text/html" in request.headers.get("accept", ""):  # a browser: the chat page; Ollama clients ask for no HTML
        return RedirectResponse("/ui/")
    return "Ollama is running (hearthlm)"


@router.head("/")
async def root_head():
    return Response(status_code=200)
