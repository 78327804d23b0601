"""llama-server's tokenizer routes, in its request and response shapes: POST /tokenize and POST /detokenize (schemas
and translation only; errors in the OpenAI shape)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from .errors import APIError
from .generation import ServedModel
from .registry import models, served

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: StrictStr
    add_special: StrictBool = False  # the tokenizer's BOS (and other added tokens), as llama-server's flag
    with_pieces: StrictBool = False  # [{"id", "piece"}] instead of bare ids; a piece that is part of a character: bytes
    model: StrictStr | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[StrictInt]
    model: StrictStr | None = None


async def _model(request: Request, name: str | None) -> ServedModel:
    """The model `name` names; none named: the one loaded model (or the pinned one)."""
    if name is None:
        loaded = models(request).loaded()
        if len(loaded) != 1:
            raise APIError(400, "name the model: 'model' is required when the server has not exactly one model "
                           "loaded", "model")  # fmt: skip
        return loaded[0].model
    return await served(request, name)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    """Special tokens written in `content` (e.g. "<bos>") are read as those tokens, as llama-server reads them."""
    tok = (await _model(request, req.model))._tok()
    ids = tok.encode(req.content, add_special_tokens=req.add_special)
    if not req.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": _piece(tok, i)} for i in ids]}


def _piece(tok, token_id: int) -> str | list[int]:
    """A token's text, or, as llama-server writes a piece that is not whole UTF-8, its bytes."""
    text = tok.decode([token_id], skip_special_tokens=False)
    raw = tok.token_bytes(token_id) if "\ufffd" in text else None
    if raw is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)
    return text


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    """The text of `tokens`, special tokens written out (as llama-server writes them)."""
    tok = (await _model(request, req.model))._tok()
    n = tok.vocab_size
    for k, i in enumerate(req.tokens):
        if not 0 <= i < n or tok.token(i) is None:
            raise APIError(400, f"tokens.{k}: {i} is not a token id of this model's vocabulary (0 to {n - 1})",
                           f"tokens.{k}", "invalid_value")  # fmt: skip
    return {"content": tok.decode(req.tokens, skip_special_tokens=False)}
