"""API errors and their body shapes: OpenAI's {"error": {message, type, param, code}}, Ollama's {"error": str},
Anthropic's {"type": "error", "error": {type, message}}."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses, with the HTTP status to answer it with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {401: "authentication_error", 404: "not_found_error", 499: "client_disconnected"}


def openai_body(e: APIError) -> dict[str, Any]:
    kind = _TYPES.get(e.status) or ("invalid_request_error" if e.status < 500 else "server_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def ollama_body(e: APIError) -> dict[str, Any]:
    return {"error": e.message}


# Anthropic's error types by status (its SDK's ErrorType); any other 4xx is invalid_request_error, 5xx api_error.
_ANTHROPIC_TYPES = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error",
}  # fmt: skip


def anthropic_body(e: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(e.status) or ("invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def _where(loc) -> str:
    return ".".join(str(x) for x in loc if x != "body") or "body"


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's list of errors as one 400, naming the first bad field."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    field = ".".join(loc) or None
    msg = "; ".join(f"{_where(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:3])
    return APIError(400, f"invalid request: {msg}", field, "invalid_value")
