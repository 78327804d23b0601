"""The FastAPI app: the OpenAI, Ollama and Anthropic routers (and llama-server's tokenizer routes) over the
server's Models, the API key, error shapes and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..api import ContextLengthError
from . import anthropic, clients, embeddings, llama_server, ollama, openai, responses, schema
from .errors import APIError, anthropic_body, ollama_body, openai_body, validation_error
from .generation import ServedModel
from .guard import LOOPBACK_NAMES, MAX_BODY, HostPolicy, check_json, read_body, replay
from .metrics import Metrics
from .registry import Models

log = logging.getLogger("hearthlm.server")

OPEN_PATHS = {"/", "/health"}  # answered without the API key: liveness probes
_BODIES = {"POST", "PUT", "PATCH", "DELETE"}  # methods whose body is read and checked before the route
UI = Path(__file__).parent / "ui" / "static"  # the chat page, static: it asks for the key when an API call needs it


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/")


def _is_ollama(path: str) -> bool:
    return path == "/" or path.startswith("/api/")


def _is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_json(path: str, e: APIError) -> JSONResponse:
    if _is_anthropic(path):
        return JSONResponse(anthropic_body(e), status_code=e.status)
    body = ollama_body(e) if _is_ollama(path) else openai_body(e)
    return JSONResponse(body, status_code=e.status)


def _as_json(scope):
    """Bodies are JSON whatever the content-type says: Ollama's documented curl examples send none (curl -d
    makes it form-encoded)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class Gate:
    """Pure ASGI middleware (it leaves streaming and disconnects alone): the Host and Origin (guard.HostPolicy),
    the API key, the body (guard.check_json), then counts each request by route and status."""

    def __init__(self, app, api_key: str | None, metrics, routes: set[str], models: Models, policy: HostPolicy,
                 max_body: int):  # fmt: skip
        self.app, self.api_key, self.metrics, self.routes, self.models = app, api_key, metrics, routes, models
        self.policy, self.max_body = policy, max_body

    def _route(self, path: str) -> str:
        if path in self.routes:
            return path
        return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"

    def _authorized(self, scope) -> bool:
        """The request carries one of the keys (`api_key`: one, or several separated by commas: one per client,
        which --isolate-clients tells apart)."""
        headers = dict(scope.get("headers") or [])
        keys = [k.strip() for k in self.api_key.split(",") if k.strip()]
        key = headers.get(b"x-api-key")  # Anthropic's header, on its routes
        if key is not None and _is_anthropic(scope["path"]):
            return any(secrets.compare_digest(key.strip(), k.encode()) for k in keys)
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip(), k) for k in keys)

    async def _admit(self, scope, receive):
        """Refuse (APIError) a request from the wrong host or page, without the key, or with a bad body; else the
        receive that hands the body on."""
        headers = dict(scope.get("headers") or [])
        self.policy.check(headers)
        path = scope["path"]
        if self.api_key and not _is_open(path) and not self._authorized(scope):
            how = "'x-api-key: KEY' or " if _is_anthropic(path) else ""
            raise APIError(401, f"missing or wrong API key: send {how}'Authorization: Bearer KEY'", None,
                           "invalid_api_key")  # fmt: skip
        if scope["method"] not in _BODIES:
            return receive
        body = await read_body(receive, headers.get(b"content-length"), self.max_body)
        check_json(body)
        return replay(body, receive)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]
        if scope["method"] == "POST":
            scope = _as_json(scope)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        held = self.models.hold()  # the models this request names stay loaded until it ends
        client = clients.enter(scope)  # who asks: --isolate-clients keeps clients apart in the expert pool
        try:
            try:
                receive = await self._admit(scope, receive)
            except APIError as e:
                return await error_json(path, e)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            clients.leave(client)
            named = self.models.holding()
            self.models.release(held)
            self.metrics.request(self._route(path), status[0], named[0] if named else "")


async def _expire(models: Models) -> None:
    while True:
        await asyncio.sleep(1.0)
        models.expire()


def _engine_stats(models: Models):
    """The loaded engines' stats, summed."""
    stats = [s.model.engine.stats() for s in models.loaded()]
    if not stats:
        return None
    return type(stats[0])(**{f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(stats[0])})


def create_app(served: ServedModel | Models, api_key: str | None = None, metrics: Metrics | None = None, *,
               hosts: list[str] | tuple[str, ...] | None = LOOPBACK_NAMES, cors_origins: list[str] | tuple = (),
               max_body: int = MAX_BODY) -> FastAPI:  # fmt: skip
    """The server's app for `served`: one model, pinned, or the Models of a server that serves the store;
    `api_key`: required on every route but / and /health. `hosts`: the Host names it answers (loopback names
    always; None: any, for a server bound to a public address); `cors_origins`: web origins allowed to call it
    from a browser ("*": any); `max_body`: bytes a request body may have."""
    models = served if isinstance(served, Models) else Models(pinned=served)
    counters = metrics or (served.metrics if isinstance(served, ServedModel) else Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        expiry = asyncio.ensure_future(_expire(models))
        yield
        expiry.cancel()
        models.shutdown()

    app = FastAPI(title="hearthlm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(llama_server.router)
    app.include_router(anthropic.router)
    app.include_router(embeddings.router)
    app.include_router(responses.router)
    app.mount("/ui", StaticFiles(directory=UI, html=True), name="ui")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [s.name for s in models.loaded()]}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json():
        return await asyncio.to_thread(schema.document, app, models)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        moe = next((m for s in models.loaded() if (m := s.model.llm.moe_stats()) is not None), None)
        if any(getattr(s.model.llm.privacy, "isolate_clients", False) for s in models.loaded()):
            moe = None  # the pool's counters move with every client's routing: no channel around the isolation
        text = counters.render(_engine_stats(models), moe)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_json(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        return error_json(request.url.path, validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}.get(e.status_code)
        return error_json(request.url.path, APIError(e.status_code, message or str(e.detail)))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, e: ValueError):  # template refusals, engine checks
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
        return error_json(request.url.path, APIError(400, str(e), None, code))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return error_json(request.url.path, APIError(500, f"internal error ({type(e).__name__}); see the server log"))

    routers = (app.router, openai.router, responses.router, ollama.router, anthropic.router, embeddings.router,
               llama_server.router)  # fmt: skip
    routes = {r.path for router in routers for r in router.routes if hasattr(r, "path")}
    policy = HostPolicy(hosts, cors_origins)
    app.add_middleware(Gate, api_key=api_key, metrics=counters, routes=routes, models=models, policy=policy,
                       max_body=max_body)  # fmt: skip
    if cors_origins:  # outside the Gate: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    return app
