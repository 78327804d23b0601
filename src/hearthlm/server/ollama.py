"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, / (schemas and
translation only)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from .. import __version__
from .errors import APIError, ollama_body
from .generation import Prompt, ServedModel, Stream, close_all, collect, merged, unless_disconnected
from .inputs import chat_messages, make_params, one_constraint, stop_list, token_text

router = APIRouter()


class Options(BaseModel):
    """Ollama's `options`. Used: temperature, top_p, top_k, min_p, num_predict, seed, stop, repeat_penalty,
    presence_penalty, frequency_penalty. Accepted and ignored: everything else (num_ctx, num_thread, mirostat...)."""

    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = None  # -1: until the context is full, -2: the same here
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # keep_alive and other fields that do not apply are ignored
    model: str = Field(min_length=1)
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
            max_tokens=model.max_tokens(prompt, o.num_predict), temperature=0.8 if o.temperature is None else o.temperature,
            top_p=0.9 if o.top_p is None else o.top_p, top_k=40 if o.top_k is None else o.top_k, min_p=o.min_p,
            seed=o.seed, stop=stop_list(o.stop), repetition_penalty=o.repeat_penalty,
            presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **model.guided(prompt, self.constraint() if constraint is None else constraint),
        )  # fmt: skip

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.think is None else {"enable_thinking": bool(self.think)}


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Request):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    suffix: str | None = None
    images: list[str] | None = None


def _model(request: Request) -> ServedModel:
    return request.app.state.model


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
    return [
        {"id": c.id, "function": {"index": k, "name": c.name, "arguments": c.arguments}} for k, c in enumerate(calls)
    ]


def _ndjson(events: AsyncIterator[dict[str, Any]], stream: Stream) -> StreamingResponse:
    async def lines():
        try:
            async for e in events:
                yield json.dumps(e, ensure_ascii=False) + "\n"
        except APIError as e:
            yield json.dumps(ollama_body(e)) + "\n"
        except Exception as e:  # after the headers went out, an error can only be a line
            yield json.dumps({"error": f"generation failed: {type(e).__name__}: {e}"}) + "\n"

    done = BackgroundTask(close_all, [stream])  # runs even when the client left before the body started
    return StreamingResponse(lines(), media_type="application/x-ndjson", background=done)


@router.post("/api/chat")
async def chat(req: ChatRequest, request: Request):
    model = _model(request)
    model.check_name(req.model)
    if not req.messages:  # Ollama loads the model and answers at once
        return {"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}  # fmt: skip
    prompt = model.chat_prompt(chat_messages(req.messages), req.tools, **req.template_kwargs())
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
    model = _model(request)
    model.check_name(req.model)
    if req.images:
        raise APIError(400, "images are not supported")
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported")
    if not req.prompt and not req.context:  # Ollama loads the model and answers at once
        return {"model": req.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    prompt = _generate_prompt(model, req)
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
    messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
        {"role": "user", "content": req.prompt or ""}
    ]
    chat = model.chat_prompt(messages, None, **req.template_kwargs())
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
_DTYPE_LEVELS = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}  # as Ollama names them


def _details(model: ServedModel) -> dict[str, Any]:
    from ..store import ModelEntry

    entry = ModelEntry(model.name, model.llm.path, "local")
    params = sum(p.numel() for p in model.llm.model.parameters())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    family = entry.family()
    return {
        "parent_model": "", "format": "gguf" if model.llm.path.suffix == ".gguf" else "safetensors",
        "family": family, "families": [family], "parameter_size": size,
        "quantization_level": (model.llm.quant or _DTYPE_LEVELS.get(str(model.llm.dtype), str(model.llm.dtype))).upper(),
    }  # fmt: skip


def _size(model: ServedModel) -> int:
    p = model.llm.path
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _entry(model: ServedModel) -> dict[str, Any]:
    modified = datetime.fromtimestamp(model.llm.path.stat().st_mtime, timezone.utc).isoformat()
    return {"name": model.name, "model": model.name, "modified_at": modified, "size": _size(model),
            "digest": model.digest, "details": _details(model)}  # fmt: skip


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [_entry(_model(request))]}


@router.get("/api/ps")
async def ps(request: Request):
    model = _model(request)
    forever = (datetime.now(timezone.utc) + timedelta(days=3650)).isoformat()
    return {"models": [{**_entry(model), "expires_at": forever, "size_vram": 0, "context_length": model.context}]}


# Architecture names as Ollama (llama.cpp's GGUF `general.architecture`) writes them; Mistral and Mixtral are
# converted as "llama". Another architecture: its class name, lowercased, without "ForCausalLM".
OLLAMA_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
    "Gemma4ForCausalLM": "gemma4", "Gemma4ForConditionalGeneration": "gemma4",
}  # fmt: skip


def ollama_architecture(architecture: str) -> str:
    return OLLAMA_ARCHITECTURES.get(architecture) or architecture.removesuffix("ForCausalLM").lower()


def _capabilities(model: ServedModel) -> list[str]:
    """What the model can do, in Ollama's words: text always; "tools" when its reply format has tool calls to
    parse, "thinking" when it has reasoning markers. No vision, audio, embedding or insert (not served)."""
    fmt = model.format
    return ["completion"] + (["tools"] if fmt.parse_calls else []) + (["thinking"] if fmt.think else [])


def _parameters(model: ServedModel) -> str:
    """The Modelfile's PARAMETER lines as Ollama lists them: here the tokens that end a reply."""
    tok = model.tokenizer
    stops = sorted(t for i in model.stop_ids if tok is not None and (t := tok.token(i)))
    return "\n".join(f"{'stop':<30} {json.dumps(t, ensure_ascii=False)}" for t in stops)


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


@router.post("/api/show")
async def show(req: ShowRequest, request: Request):
    model = _model(request)
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required", "model")
    model.check_name(name)
    arch = ollama_architecture(model.llm.config.architecture)
    info = {
        "general.architecture": arch, "general.basename": model.name.rsplit("/", 1)[-1],
        "general.parameter_count": sum(p.numel() for p in model.llm.model.parameters()),
        f"{arch}.context_length": model.context,
    }  # fmt: skip
    return {"modelfile": f"FROM {model.llm.path}\n", "parameters": _parameters(model), "template": model.template or "",
            "details": _details(model), "model_info": info, "capabilities": _capabilities(model),
            "modified_at": _entry(model)["modified_at"]}  # fmt: skip


# The Ollama API version these routes implement, as clients compare it (VS Code Copilot refuses below 0.6.4):
# 0.9.0, the release that added `think` (with 0.8.0's streamed tool calls before it), which /api/chat and
# /api/generate serve. Later releases' additions are not all here, so no later number is claimed; nor are routes
# older than this (/api/embed, /api/pull, /api/create...): an Ollama client sees a 404 for them.
OLLAMA_API_VERSION = "0.9.0"


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_API_VERSION, "hearthlm": __version__}


@router.get("/", response_class=PlainTextResponse)
async def root():
    return "Ollama is running (hearthlm)"


@router.head("/")
async def root_head():
    return Response(status_code=200)
