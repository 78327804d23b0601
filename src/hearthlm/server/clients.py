"""Who sent a request, for `hearth serve --isolate-clients` (docs/privacy.md, A3): requests of different clients
never share the expert pool (engine/scheduler.py), so one client's latency tells nothing of another's routing.

What a server can trust to tell clients apart:
- an API key (`--api-key K1,K2,...`): the server checked it; one key, one client;
- without keys, a bearer token the client chose: not checked, but a secret, so another client cannot join its
  partition without knowing it (a client that wants isolation sends a random one);
- else the TCP peer address: not forgeable, but every client behind one proxy, NAT or on this machine shares it.
Forwarding headers (X-Forwarded-For and kin) are set by the client or by any proxy and are never used.
"""

from __future__ import annotations

import contextvars
import hashlib

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("hearthlm_client", default=None)


def identity(scope) -> str:
    """A client's name for one ASGI request: a hash of its key or bearer token (never the secret itself, which
    could end up in a log), else its peer address."""
    headers = dict(scope.get("headers") or [])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    secret = token.strip() if scheme.lower() == "bearer" else ""
    secret = secret or headers.get(b"x-api-key", b"").decode("latin-1").strip()
    if secret:
        return "key:" + hashlib.sha256(secret.encode()).hexdigest()[:16]
    peer = scope.get("client")
    return f"addr:{peer[0]}" if peer else "addr:unknown"


def enter(scope) -> contextvars.Token:
    """Name the client of the request being handled (Gate, before the routes)."""
    return _current.set(identity(scope))


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> str | None:
    """The client of the request being handled, None outside one (LLM.generate, tests)."""
    return _current.get()
