"""What the server checks before a request reaches a route: the Host it was sent to (DNS rebinding), the Origin of a
browser's request (cross-site requests), and the body (size, JSON depth, numbers, strings).

Each check gives the reason as an APIError, which the app writes in the shape of the API the path belongs to."""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable
from urllib.parse import urlsplit

from .errors import APIError

MAX_BODY = 32 << 20  # bytes: a request body past this is a 413 (long prompts and embedding batches fit)
MAX_DEPTH = 128  # JSON nesting: tool and response schemas nest, but never this deep
MAX_DIGITS = 40  # an integer literal longer than this is refused before Python converts it
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


# -- where the request was sent, and from which page -------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without port) names this machine's loopback interface."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(value: str) -> str:
    """The host part of a Host header value or of an origin's netloc: no port, IPv6 brackets removed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostPolicy:
    """Which Host names a server answers (None: any) and which browser origins may call it.

    `hosts`: allowed Host names; loopback names are always allowed when `hosts` is given. `origins`: origins
    ("https://app.example:8080") that may send cross-origin requests ("*": any). A browser request whose Origin
    is neither allowed nor the server itself (same host and port) is refused: a page elsewhere cannot make a
    local server pull, copy, delete or generate through a form or a 'simple' request."""

    def __init__(self, hosts: Iterable[str] | None = LOOPBACK_NAMES, origins: Iterable[str] = ()):
        self.hosts = None if hosts is None else frozenset(_hostname(h) for h in [*hosts, *LOOPBACK_NAMES])
        self.any_host = self.hosts is not None and "*" in self.hosts
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)

    def check(self, headers: dict[bytes, bytes]) -> None:
        host = headers.get(b"host", b"").decode("latin-1")
        if host and self.hosts is not None and not self.any_host:
            name = _hostname(host)
            if name not in self.hosts and not is_loopback(name):
                allowed = ", ".join(sorted(self.hosts))
                raise APIError(403, f"Host '{host}' is not allowed: this server answers requests addressed to "
                               f"{allowed} (a page on another site may not reach it through DNS rebinding); "
                               "`hearth serve --allowed-hosts NAME` adds a name, e.g. for a reverse proxy",
                               None, "host_not_allowed")  # fmt: skip
        origin = headers.get(b"origin")
        if origin is not None:
            self._check_origin(origin.decode("latin-1").strip(), host)

    def _check_origin(self, origin: str, host: str) -> None:
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc:
            if parts.netloc.lower() == host.lower() or is_loopback(parts.hostname or ""):
                return  # the server's own pages (the web UI), or a page served from this machine
        raise APIError(403, f"requests from the web page at origin '{origin}' are refused; "
                       "`hearth serve --cors-origins ORIGIN` allows a site you trust", None, "origin_not_allowed")  # fmt: skip


# -- the body -------------------------------------------------------------------------------------
async def read_body(receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body (a 413 past `limit` bytes, before reading it when Content-Length says so)."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "Content-Length is not a number") from None
        if size > limit:
            raise _too_large(limit)
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit >> 20} MiB, the most this server reads")


def replay(body: bytes, receive):
    """An ASGI receive that hands out `body` once, then waits on the client (for its disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise APIError(400, f"a number in the body has {len(text)} digits: integers must fit in 64 bits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise APIError(400, f"the number {text[:40]} is too large: numbers must be finite")
    return value


def _constant(text: str):
    raise APIError(400, f"{text} is not JSON: numbers must be finite")


def check_json(body: bytes) -> None:
    """Refuse a body that is not JSON, nests deeper than MAX_DEPTH, holds integers past 64 bits or non-finite
    numbers, or strings with NUL characters or lone UTF-16 surrogates (which no tokenizer can read)."""
    if not body.strip():
        return  # the route says what it needs
    try:
        value = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise APIError(400, "the body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    _walk(value)


def _walk(value) -> None:
    stack = [(value, 1, "body")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, int) and not isinstance(item, bool) and not -(2**63) <= item < 2**64:
            raise APIError(400, f"{where}: {item} does not fit in 64 bits", where)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_string(k, where)
                stack.append((v, depth + 1, k if where == "body" else f"{where}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, depth + 1, f"{where}.{i}") for i, v in enumerate(item))


def _check_string(text: str, where: str) -> None:
    where = where if len(where) <= 80 else where[:77] + "..."
    if "\x00" in text:
        raise APIError(400, f"{where}: strings may not contain NUL characters (\\u0000)", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair), "
                       "which is not text", where) from None  # fmt: skip
