"""Embedding routes: OpenAI's /v1/embeddings, Ollama's /api/embed and its legacy /api/embeddings (schemas and
translation only). Every input of a request is one batched forward, run by the model's engine thread between
two steps (ServedModel.embed)."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .registry import served

router = APIRouter()

_Input = str | list[str] | list[int] | list[list[int]]


def _inputs(value: _Input, field: str) -> list:
    """The inputs as a list: one string, strings, one token-id list, or token-id lists; none is a 400."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, f"{field} is empty: give a string or a list of strings", field)
    return [value] if isinstance(value[0], int) else list(value)


class OpenAIEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # user, ...
    model: str = Field(min_length=1)
    input: _Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=2**31 - 1)


def _encoded(row: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as the openai client decodes it
        return base64.b64encode(row.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()
    return row.tolist()


@router.post("/v1/embeddings")
async def openai_embeddings(req: OpenAIEmbeddingRequest, request: Request):
    model = await served(request, req.model)
    vectors, tokens = await model.embed(_inputs(req.input, "input"), req.dimensions, truncate=False)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # options
    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1, le=2**31 - 1)
    keep_alive: int | float | str | None = None


@router.post("/api/embed")
async def ollama_embed(req: OllamaEmbedRequest, request: Request):
    t0 = time.perf_counter()
    model = await served(request, req.model, req.keep_alive)
    t1 = time.perf_counter()
    inputs = [req.input] if isinstance(req.input, str) else req.input
    vectors, tokens = await model.embed(inputs, req.dimensions, req.truncate) if inputs else ([], 0)
    return {"model": req.model, "embeddings": [v.tolist() for v in vectors],
            "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": int((t1 - t0) * 1e9),
            "prompt_eval_count": tokens}  # fmt: skip


class OllamaEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # options
    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: int | float | str | None = None


@router.post("/api/embeddings")
async def ollama_embeddings(req: OllamaEmbeddingsRequest, request: Request) -> dict[str, Any]:
    """Ollama's first embedding route: one prompt, one vector (an empty prompt: an empty vector, as there)."""
    model = await served(request, req.model, req.keep_alive)
    if not req.prompt:
        return {"embedding": []}
    vectors, _ = await model.embed([req.prompt], None, truncate=True)
    return {"embedding": vectors[0].tolist()}
