"""Hostile requests against the HTTP server (issue 22, item 4): bodies that are not sane JSON, numbers past their
bounds, the Host and Origin a browser sends (DNS rebinding, cross-site requests), the API key on every route, the
store's routes fed paths, and Schemathesis run over /openapi.json. Every refusal is a 4xx in its API's shape."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fakehub import FakeHub
from huggingface_hub import constants as hf_constants
from serving import LiveServer, idle

from hearthlm import store
from hearthlm.server import app as app_module
from hearthlm.server.app import create_app
from hearthlm.server.guard import LOOPBACK_NAMES
from hearthlm.server.registry import Models

MODEL = "hearth-demo"
USER = [{"role": "user", "content": "hi"}]

# One route per API, a body it serves, and how its errors look.
OPENAI = ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": USER}, "openai")
OLLAMA = ("/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 2}, "messages": USER}, "ollama")
ANTHROPIC = ("/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": USER}, "anthropic")
RESPONSES = ("/v1/responses", {"model": MODEL, "max_output_tokens": 2, "input": "hi"}, "openai")
APIS = [OPENAI, OLLAMA, ANTHROPIC, RESPONSES]


def _shape(r: httpx.Response, kind: str) -> str:
    """The error message, after checking the body has the shape of API `kind`."""
    body = r.json()
    if kind == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    if kind == "anthropic":
        assert body["type"] == "error" and isinstance(body["error"]["type"], str), body
        return body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


def _app(served, **kw):
    """Another app over the module's model, whose stop leaves that model's engine running."""
    models = Models(pinned=served)
    models.shutdown = lambda: None
    return create_app(models, **kw)


def post(server, path: str, body=None, raw: bytes | None = None, **kw) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=120, **kw)


def _splice(body: dict, text: str) -> bytes:
    """`body` as JSON with the JSON text `text` standing in for its first message's content (or input)."""
    marker = "@@HERE@@"
    copy = json.loads(json.dumps(body))
    if "messages" in copy:
        copy["messages"] = [{"role": "user", "content": marker}]
    else:
        copy["input"] = marker
    return json.dumps(copy).replace(f'"{marker}"', text).encode()


# -- bodies -----------------------------------------------------------------------------------------
BAD_TEXT = {
    "lone surrogate": ('"\\ud800"', "surrogate"),
    "low surrogate alone": ('"a\\udc00b"', "surrogate"),
    "NUL": ('"a\\u0000b"', "NUL"),
    "deep nesting": ("[" * 5000 + "]" * 5000, "nests deeper"),
    "100k-digit integer": ("9" * 100_000, "digits"),
    "integer past 64 bits": (str(2**64), "64 bits"),
    "NaN": ("NaN", "finite"),
    "infinite float": ("1e999", "finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
@pytest.mark.parametrize("path,body,kind", APIS, ids=[a[0] for a in APIS])
def test_hostile_json_is_a_400_in_the_apis_shape(server, case, path, body, kind):
    text, words = BAD_TEXT[case]
    r = post(server, path, raw=_splice(body, text))
    assert r.status_code == 400, r.text
    assert words in _shape(r, kind)


@pytest.mark.parametrize("raw", [b"\xff\xfe{", b'{"model": "hearth-demo", ', b"[1, 2"], ids=["utf-16", "cut", "list"])
def test_broken_bodies_are_400s(server, raw):
    for path, _, kind in APIS:
        r = post(server, path, raw=raw)
        assert r.status_code == 400, r.text
        _shape(r, kind)


def test_the_tokenizer_routes_refuse_surrogates_too(server):
    for path, raw in [
        ("/tokenize", b'{"content": "\\ud800"}'),
        ("/v1/embeddings", b'{"model": "x", "input": "\\udfff"}'),
    ]:
        r = post(server, path, raw=raw)
        assert r.status_code == 400 and "surrogate" in _shape(r, "openai")


def test_a_surrogate_pair_is_text(server):
    r = post(server, OPENAI[0], raw=_splice(OPENAI[1], '"\\ud83d\\ude00"'))  # U+1F600, written as a pair
    assert r.status_code == 200, r.text


def test_body_size_limit(served):
    s = LiveServer(_app(served, max_body=1 << 20))
    try:
        big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}).encode()
        for path, kind in [("/v1/completions", "openai"), ("/api/generate", "ollama"), ("/v1/messages", "anthropic")]:
            r = httpx.post(s.url + path, content=big, timeout=60)
            assert r.status_code == 413 and "1 MiB" in _shape(r, kind)

        def chunks():  # no Content-Length: the limit counts what arrives
            for _ in range(4):
                yield b" " * (512 << 10)

        r = httpx.post(s.url + "/v1/completions", content=chunks(), timeout=60)
        assert r.status_code == 413
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


# -- numbers ----------------------------------------------------------------------------------------
def _chat(**kw):
    return ("/v1/chat/completions", {"model": MODEL, "messages": USER, **kw})


def _ollama(**options):
    return ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False, "options": options})


OUT_OF_BOUNDS = {
    "n 0": _chat(n=0), "n 17": _chat(n=17), "n 2^40": _chat(n=2**40),
    "max_tokens 0": _chat(max_tokens=0), "max_tokens 2^31": _chat(max_tokens=2**31),
    "max_completion_tokens 2^31": _chat(max_completion_tokens=2**31),
    "top_logprobs 21": _chat(logprobs=True, top_logprobs=21), "top_logprobs -1": _chat(logprobs=True, top_logprobs=-1),
    "top_k 2^31": _chat(top_k=2**31), "top_k -1": _chat(top_k=-1),
    "repetition_penalty 1e-30": _chat(repetition_penalty=1e-30), "repetition_penalty 1e30": _chat(repetition_penalty=1e30),
    "seed 2^63": _chat(seed=2**63), "seed below -2^63": _chat(seed=-(2**63) - 1),
    "stop 17": _chat(stop=[f"s{i}" for i in range(17)]), "stop 2000 chars": _chat(stop=["x" * 2000]),
    "logit_bias 301": _chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias 101": _chat(logit_bias={"5": 101}),
    "logit_bias key": _chat(logit_bias={"a": 1}),
    "best_of 17": ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 17}),
    "logprobs 21": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}),
    "num_ctx -5": _ollama(num_ctx=-5), "num_ctx 0": _ollama(num_ctx=0), "num_ctx 2^31": _ollama(num_ctx=2**31),
    "num_predict -3": _ollama(num_predict=-3), "num_predict 2^31": _ollama(num_predict=2**31),
    "ollama seed 2^63": _ollama(seed=2**63), "ollama top_k 2^31": _ollama(top_k=2**31),
    "ollama temperature 1e30": _ollama(temperature=1e30), "repeat_penalty 0": _ollama(repeat_penalty=0),
    "ollama stop 17": _ollama(stop=["a"] * 17),
    "ollama top_logprobs 21": ("/api/chat", {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21}),
    "anthropic max_tokens 2^31": ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2**31}),
    "anthropic max_tokens 0": ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 0}),
    "anthropic budget 2^31": ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2,
                                               "thinking": {"type": "enabled", "budget_tokens": 2**31}}),
    "anthropic stop 17": ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2, "stop_sequences": ["a"] * 17}),
    "max_output_tokens 2^31": ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2**31}),
    "dimensions 2^31": ("/v1/embeddings", {"model": MODEL, "input": "hi", "dimensions": 2**31}),
    "ollama dimensions 0": ("/api/embed", {"model": MODEL, "input": "hi", "dimensions": 0}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OUT_OF_BOUNDS))
def test_numbers_out_of_bounds_are_400s(server, case):
    path, body = OUT_OF_BOUNDS[case]
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    kind = "anthropic" if path == "/v1/messages" else "ollama" if path.startswith("/api/") else "openai"
    _shape(r, kind)


def test_extreme_sampling_values_neither_fail_nor_spoil_other_requests(server, served):
    """A top_p below float32's reach or a temperature that would overflow the logits once failed the engine's step,
    and with it every request in the batch. Each is served now, and a plain request beside them is too."""
    bodies = [
        _ollama(num_predict=3, top_p=1e-300)[1],
        _ollama(num_predict=3, temperature=1e-300)[1],
        {**_chat(max_tokens=3, temperature=1e-40)[1]},
        {**_chat(max_tokens=3, top_p=1e-45, temperature=1.5)[1]},
    ]
    for body in bodies:
        path = "/api/generate" if "prompt" in body else "/v1/chat/completions"
        r = post(server, path, body)
        assert r.status_code == 200, r.text
    assert post(server, *_ollama(num_predict=2)).status_code == 200
    idle(served)


def test_in_bounds_edges_are_served(server):
    ok = [
        _chat(max_tokens=2, n=16, seed=2**63 - 17, logit_bias={"5": -100}, stop=["x" * 1024] * 16),
        _ollama(num_predict=-2, num_ctx=2**31 - 1, seed=-(2**63)),
        _ollama(num_predict=2, seed=-1, repeat_penalty=100, top_k=2**31 - 1),
    ]
    for path, body in ok:
        body = {**body, "max_tokens": 2} if path.startswith("/v1/") else body
        assert post(server, path, body).status_code == 200


# -- messages ---------------------------------------------------------------------------------------
BAD_MESSAGES = {
    "openai empty": ("/v1/chat/completions", {"model": MODEL, "messages": []}, "openai"),
    "openai role": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "openai"),
    "openai no role": ("/v1/chat/completions", {"model": MODEL, "messages": [{}]}, "openai"),
    "openai not an object": ("/v1/chat/completions", {"model": MODEL, "messages": ["hi"]}, "openai"),
    "ollama role": ("/api/chat", {"model": MODEL, "messages": [{"role": "root", "content": "x"}]}, "ollama"),
    "ollama content type": ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, "ollama"),
    "anthropic empty": ("/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": []}, "anthropic"),
    "anthropic system role": ("/v1/messages", {"model": MODEL, "max_tokens": 2,
                                               "messages": [{"role": "system", "content": "x"}]}, "anthropic"),
    "anthropic block": ("/v1/messages", {"model": MODEL, "max_tokens": 2,
                                         "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "anthropic"),
    "responses empty": ("/v1/responses", {"model": MODEL, "input": []}, "openai"),
    "responses item": ("/v1/responses", {"model": MODEL, "input": [3]}, "openai"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_empty_and_wrong_role_messages_are_400s(server, case):
    path, body, kind = BAD_MESSAGES[case]
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    _shape(r, kind)


# -- malformed tool and output schemas (vLLM's worker once crashed on one) ------------------------------
def _tool(parameters) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


BAD_SCHEMAS = [
    {"type": "object", "properties": 5},
    {"type": "object", "properties": {"a": {"type": "no-such-type"}}},
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}},
    {"$ref": "#"},
    {"type": "object", "required": 7},
    {"type": "string", "pattern": "(unclosed"},
    {"anyOf": []},
]


@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=[json.dumps(s)[:40] for s in BAD_SCHEMAS])
def test_malformed_schemas_are_4xx_and_the_server_goes_on(server, schema):
    asks = [
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": USER, "tools": _tool(schema),
                                  "tool_choice": "required"}),
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": USER,
                                  "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
        ("/api/chat", {"model": MODEL, "stream": False, "messages": USER, "format": schema, "options": {"num_predict": 4}}),
    ]  # fmt: skip
    for path, body in asks:
        r = post(server, path, body)
        assert r.status_code < 500, (path, r.text)
    assert post(server, *OPENAI[:2]).status_code == 200


# -- Host and Origin ----------------------------------------------------------------------------------
def test_dns_rebinding_is_refused(server):
    for host in ["attacker.example", "attacker.example:11434", "127.0.0.1.attacker.example", "10.0.0.5"]:
        for path, body, kind in APIS:
            r = post(server, path, body, headers={"Host": host})
            assert r.status_code == 403 and "--allowed-hosts" in _shape(r, kind)
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 403
    port = server.port
    for host in [f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}", "127.0.0.2", "LOCALHOST."]:
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_any_host(served):
    for hosts, ok, refused in [
        ([*LOOPBACK_NAMES, "llm.proxy.example"], ["llm.proxy.example", "llm.proxy.example:443"], ["other.example"]),
        (None, ["anything.example"], []),  # bound to a public address with no list: any Host
        (["*"], ["anything.example"], []),
    ]:
        s = LiveServer(_app(served, hosts=hosts))
        try:
            for host in ok:
                assert httpx.get(s.url + "/health", headers={"Host": host}).status_code == 200
            for host in refused:
                assert httpx.get(s.url + "/health", headers={"Host": host}).status_code == 403
        finally:
            s.stop()


def test_cross_site_pages_are_refused_and_cors_is_off(server):
    evil = {"Origin": "https://evil.example"}
    for path, body, kind in APIS:
        r = post(server, path, body, headers=evil)
        assert r.status_code == 403 and "--cors-origins" in _shape(r, kind)
    # A form post (text/plain, no preflight) from another site cannot pull, copy or delete.
    r = post(server, "/api/pull", raw=b'{"model": "a/b"}', headers={**evil, "Content-Type": "text/plain"})
    assert r.status_code == 403
    # The server's own pages and pages on this machine may call it; no CORS header is sent unless configured.
    for origin in [server.url, f"http://localhost:{server.port}", "http://127.0.0.1:3000"]:
        r = post(server, *OPENAI[:2], headers={"Origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(server.url + "/v1/chat/completions", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_when_configured(served):
    s = LiveServer(_app(served, cors_origins=["https://app.example"]))
    try:
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = post(s, *OPENAI[:2], headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert post(s, *OPENAI[:2], headers={"Origin": "https://evil.example"}).status_code == 403
    finally:
        s.stop()


# -- the API key on every route ---------------------------------------------------------------------
def _registered(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, through included routers and mounts."""
    out = []

    def walk(routes, prefix: str) -> None:
        for r in routes:
            if hasattr(r, "original_router"):
                walk(r.original_router.routes, prefix + (getattr(r.include_context, "prefix", "") or ""))
            elif hasattr(r, "methods") and r.methods:
                out.extend((m, prefix + r.path) for m in sorted(r.methods))
            elif hasattr(r, "path"):  # a mount (static files): GET
                out.append(("GET", prefix + r.path + "/"))

    walk(app.routes, "")
    return sorted(set(out))


def _is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def test_every_route_but_the_probes_needs_the_key(served, monkeypatch):
    key = "k-" + secrets.token_hex(8)
    calls = []
    real = app_module.secrets.compare_digest
    monkeypatch.setattr(app_module.secrets, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    app = _app(served, api_key=key)
    s = LiveServer(app)
    try:
        routes = _registered(app)
        paths = {p for _, p in routes}
        for expected in ["/v1/chat/completions", "/api/pull", "/api/delete", "/metrics", "/openapi.json", "/tokenize"]:
            assert expected in paths  # the walk found the routers' routes
        for method, path in routes:
            url = s.url + re.sub(r"\{[^}]+\}", "x", path)
            r = httpx.request(method, url, content=b"{}", timeout=60)
            if path in ("/", "/health") or _is_ui(path):
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (method, path, r.status_code)
            wrong = httpx.request(method, url, content=b"{}", headers={"Authorization": "Bearer nope"}, timeout=60)
            assert wrong.status_code == 401
            right = httpx.request(method, url, content=b"{}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert right.status_code != 401, (method, path)
        assert calls  # compared with secrets.compare_digest, in constant time
    finally:
        s.stop()


# -- /openapi.json ----------------------------------------------------------------------------------
def test_openapi_describes_the_request_models_with_the_served_names(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    paths = doc["paths"]
    for route in ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/v1/messages",
                  "/v1/responses", "/v1/embeddings", "/api/embed", "/tokenize", "/api/pull", "/api/delete"]:  # fmt: skip
        assert route in paths, route
    schemas = doc["components"]["schemas"]
    named = {name: s["properties"]["model"] for name, s in schemas.items() if "model" in s.get("properties", {})}
    assert len(named) >= 12
    for name, prop in named.items():
        branches = prop.get("anyOf", [prop])
        enums = [b["enum"] for b in branches if "enum" in b]
        if schemas[name]["title"] == "PullRequest":
            assert not enums  # a pull names a Hub repo
        else:
            assert enums == [[MODEL]], name
    chat = next(s for s in schemas.values() if s["title"] == "ChatRequest" and "n" in s["properties"])
    assert chat["properties"]["n"]["maximum"] == 16 and chat["properties"]["max_tokens"]["anyOf"][0]["maximum"] > 0


# -- the store's routes -----------------------------------------------------------------------------
@pytest.fixture
def store_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "models"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not touch")
    s = LiveServer(create_app(Models(None)))
    yield s, root, outside
    s.stop()


def test_store_routes_keep_inside_the_store(store_server):
    s, root, outside = store_server
    names = ["../outside", "../../etc/passwd", "/etc/passwd", str(outside), "~/x", "a/../../b", "a/b/c", "x\\..\\y"]
    for name in names:
        r = httpx.post(s.url + "/api/copy", json={"source": MODEL, "destination": name})
        assert r.status_code == 400 and "not a model name" in r.json()["error"], name
        r = httpx.request("DELETE", s.url + "/api/delete", json={"model": name})
        assert r.status_code == 404, name
        r = httpx.post(s.url + "/api/show", json={"model": name})
        assert r.status_code == 404, name
    # A path that exists and one that does not get the same answer: the routes look names up, never paths.
    here = httpx.request("DELETE", s.url + "/api/delete", json={"model": str(outside / "secret.txt")})
    gone = httpx.request("DELETE", s.url + "/api/delete", json={"model": str(outside / "missing.txt")})
    assert (here.status_code, here.json()["error"].replace("secret", "X")) == (
        gone.status_code, gone.json()["error"].replace("missing", "X"))  # fmt: skip
    for repo in ["a/..", "../a", "a--b/c", "a/b/../../c", "/abs/x", "org/" + "x" * 200]:
        r = httpx.post(s.url + "/api/pull", json={"model": repo, "stream": False})
        assert r.status_code == 400, repo
    assert (outside / "secret.txt").read_text() == "do not touch" and sorted(p.name for p in root.iterdir()) == []


def test_unauthenticated_callers_learn_nothing_about_paths(served, tmp_path):
    s = LiveServer(_app(served, api_key="sesame"))
    try:
        real, fake = str(tmp_path), str(tmp_path / "nothing-here")
        for path in ["/api/delete", "/api/show", "/api/copy"]:
            answers = set()
            for name in (real, fake):
                body = {"model": name, "source": name, "destination": "y"}
                r = httpx.request("DELETE" if path == "/api/delete" else "POST", s.url + path, json=body)
                answers.add((r.status_code, r.text))
            assert len(answers) == 1 and next(iter(answers))[0] == 401
    finally:
        s.stop()


def test_special_files_in_the_store_are_refused(store_server, tmp_path):
    _, root, outside = store_server
    os.mkfifo(root / "pipe.gguf")
    (root / "zero.gguf").symlink_to("/dev/zero")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    listed = {e.path.name for e in store.list_models()}
    assert "pipe.gguf" not in listed and "zero.gguf" not in listed
    with pytest.raises(store.StoreError, match="device, socket or pipe"):
        store.remove(str(root / "pipe.gguf"))
    store.remove(str(root / "linked"))  # the link goes, what it points to stays
    assert not (root / "linked").exists() and (outside / "secret.txt").exists()


def test_pull_progress_digests_are_sha256(store_server, tmp_path, monkeypatch):
    s, root, _ = store_server
    hub = FakeHub()
    try:
        demo = store.DEMO_DIR / MODEL
        hub.add("acme/tiny", demo)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        r = httpx.post(s.url + "/api/pull", json={"model": "acme/tiny"}, timeout=300)
        events = [json.loads(x) for x in r.text.splitlines()]
        assert events[-1] == {"status": "success"}
        digests = [e["digest"] for e in events if "digest" in e]
        assert digests and all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests)
        files = [e for e in events if e.get("status", "").startswith("pulling ") and "total" in e]
        assert {e["status"].removeprefix("pulling ") for e in files} >= {"config.json", "model.safetensors"}
    finally:
        hub.close()


# -- Schemathesis -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Counted:
    """The engine behind the fuzzed server: every request that reaches it is counted, and its reply capped at a
    few tokens (fuzzed requests ask for thousands; the point is what reaches the engine, not long replies)."""

    engine: object
    cap: int = 4
    generated: int = 0
    calls: int = 0

    def generate(self, ids, params, *args, **kw):
        self.generated += 1
        return self.engine.generate(ids, dataclasses.replace(params, max_tokens=min(params.max_tokens, self.cap)),
                                    *args, **kw)  # fmt: skip

    async def call(self, work):
        self.calls += 1
        return await self.engine.call(work)

    def __getattr__(self, name):
        return getattr(self.engine, name)


SCHEMATHESIS_SECONDS = int(os.environ.get("HEARTHLM_SCHEMATHESIS_SECONDS", "60"))


# Schemathesis's CLI, shielded from a CPython 3.11 ast bug in Hypothesis's descriptions of strategies (see there).
SCHEMATHESIS_CLI = str(Path(__file__).with_name("schemathesis_cli.py"))


def test_schemathesis_finds_no_server_error(tmp_path, capsys, monkeypatch):
    """Schemathesis, positive and negative cases of every operation in /openapi.json for a time budget: no 5xx,
    no hang (a request timeout is a failure), the server alive at the end."""
    pytest.importorskip("schemathesis")
    from hearthlm.server import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a fuzzed /api/pull must not reach the Hub
    served = load(None)
    counted = Counted(served.engine)
    served.engine = counted
    s = LiveServer(_app(served))
    report = tmp_path / "report.ndjson"
    try:
        cmd = [
            sys.executable, SCHEMATHESIS_CLI, "run", s.url + "/openapi.json", "--checks", "not_a_server_error",
            "--mode", "all", "--max-time", str(SCHEMATHESIS_SECONDS), "--request-timeout", "60", "--seed", "22",
            "--workers", "2", "--generation-database", "none", "--no-color", "--suppress-health-check", "all",
            "--report", "ndjson", "--report-ndjson-path", str(report),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=SCHEMATHESIS_SECONDS + 600, cwd=tmp_path)
        tail = (run.stdout + run.stderr)[-6000:]
        assert run.returncode == 0, tail
        assert httpx.get(s.url + "/health").status_code == 200
        cases, statuses, operations = _tally(report)
        assert not [c for c in statuses if c >= 500]
        assert len(operations) >= 18, sorted(operations)  # every operation was tried
        assert counted.generated > 0
        with capsys.disabled():
            print(f"\nschemathesis: {cases} requests over {len(operations)} operations, statuses "
                  f"{dict(sorted(statuses.items()))}; {counted.generated} generations and {counted.calls} embedding "
                  "batches reached the engine")  # fmt: skip
        idle(served)
    finally:
        s.stop()
        served.engine.shutdown()


def _tally(report: Path) -> tuple[int, dict[int, int], set[str]]:
    """(requests, count per status, operations) from Schemathesis's NDJSON event log."""
    statuses: dict[int, int] = {}
    operations: set[str] = set()
    cases = 0
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        recorder = event["recorder"]
        for interaction in (recorder.get("interactions") or {}).values():
            if interaction.get("response"):
                status = interaction["response"]["status_code"]
                cases += 1
                statuses[status] = statuses.get(status, 0) + 1
                operations.add(recorder["label"].split(" -> ")[-1])
    return cases, statuses, operations
