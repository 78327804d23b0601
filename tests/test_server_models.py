"""One server, every model in the store: loading on first use, waiting for a load, keep_alive, the memory
budget's least-recently-used unloading, /api/ps, num_ctx, and the store over HTTP (pull with progress against
the fake Hub, delete, copy), with the official ollama and openai clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from datetime import datetime, timezone

import httpx
import ollama
import openai
import pytest
from fakehub import FakeHub
from huggingface_hub import constants as hf_constants
from serving import LiveServer

from hearthlm import store
from hearthlm.server import load
from hearthlm.server.app import create_app
from hearthlm.server.registry import Models, keep_alive_seconds

DEMO = store.DEMO_DIR / "hearth-demo"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A store with two copies of the demo model and one broken checkpoint."""
    home = tmp_path_factory.mktemp("home")
    root = home / "models"
    root.mkdir()
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(DEMO, root / name)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "none"}))
    mp = pytest.MonkeyPatch()
    mp.setenv("HEARTHLM_HOME", str(home))
    yield home
    mp.undo()


class Loads:
    """The loader the server calls, counting loads; `gate` (when set) holds each load until released."""

    def __init__(self):
        self.names: list[str] = []
        self.gate: threading.Event | None = None

    def __call__(self, path, name):
        self.names.append(name)
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return load(str(path), name=name)


def _serve(**kw):
    loads = Loads()
    models = Models(loads, **kw)
    return LiveServer(create_app(models)), models, loads


@pytest.fixture(scope="module")
def multi(home):
    server, models, loads = _serve(keep_alive=300.0)
    yield server, models, loads
    server.stop()


def _chat(url: str, model: str, **kw) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 3, "temperature": 0}, **kw}  # fmt: skip
    return httpx.post(url + "/api/chat", json=body, timeout=120).json()


def test_lists_every_model_without_loading(multi):
    server, models, loads = multi
    ids = {m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list()}
    assert {"hearth-demo", "hearth-demo-moe", "tiny-a", "tiny-b"} <= ids
    assert "broken" not in ids  # cannot be described, so not listed (and asking for it gives the reason)
    tags = {m.model.removesuffix(":latest"): m for m in ollama.Client(server.url).list().models}
    assert tags["tiny-a"].details.family == "gemma4" and tags["tiny-a"].size > 0 and tags["tiny-a"].digest
    show = ollama.Client(server.url).show("tiny-b")
    assert "completion" in show.capabilities and show.modelinfo["gemma4.context_length"] == 2048
    assert loads.names == []  # listing and showing loaded nothing


def test_first_request_loads_and_concurrent_ones_wait(multi):
    server, models, loads = multi
    loads.gate = threading.Event()

    async def many():
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                    "options": {"num_predict": 2}}  # fmt: skip
            tasks = [asyncio.ensure_future(c.post(server.url + "/api/chat", json=body)) for _ in range(4)]
            await asyncio.sleep(1.0)
            assert not any(t.done() for t in tasks)  # all wait for the one load
            loads.gate.set()
            return await asyncio.gather(*tasks)

    try:
        replies = asyncio.run(many())
    finally:
        loads.gate.set()
        loads.gate = None
    assert [r.status_code for r in replies] == [200] * 4
    assert loads.names.count("tiny-b") == 1
    assert _chat(server.url, "tiny-b:latest")["done"] is True and loads.names.count("tiny-b") == 1


def test_ps_lists_what_is_loaded(multi):
    server, models, loads = multi
    _chat(server.url, "tiny-a", keep_alive="10m")
    ps = {m.model.removesuffix(":latest"): m for m in ollama.Client(server.url).ps().models}
    assert "tiny-a" in ps and "hearth-demo" not in ps
    a = ps["tiny-a"]
    assert a.size > 5_000_000 and a.size_vram == 0 and a.context_length == 2048
    left = (a.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 500 < left <= 600  # keep_alive 10m from the end of the request


def test_keep_alive_zero_unloads_after_the_request(multi):
    server, models, loads = multi
    assert _chat(server.url, "tiny-a", keep_alive=0)["done"] is True
    assert "tiny-a:latest" not in {m.model for m in ollama.Client(server.url).ps().models}
    _chat(server.url, "tiny-a", keep_alive="1s")
    deadline = time.time() + 30
    while "tiny-a" in {s.name for s in models.loaded()} and time.time() < deadline:
        time.sleep(0.2)
    assert "tiny-a" not in {s.name for s in models.loaded()}  # the expiry loop unloaded it


def test_empty_requests_load_and_unload(multi):
    server, models, loads = multi
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny-b"}).json()
    assert r["done_reason"] == "load" and "tiny-b" in {s.name for s in models.loaded()}
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny-b", "keep_alive": 0}).json()
    assert r["done_reason"] == "unload" and "tiny-b" not in {s.name for s in models.loaded()}
    r = httpx.post(server.url + "/api/chat", json={"model": "tiny-b", "messages": [], "keep_alive": "0s"}).json()
    assert r["done_reason"] == "unload"


def test_unknown_and_broken_models(multi):
    server, models, loads = multi
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(server.url).chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "no-such-model" in str(e.value)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert "failed to load" in str(e.value) and "NoSuchForCausalLM" in str(e.value)
    assert _chat(server.url, "tiny-a")["done"] is True  # still serving
    r = httpx.post(server.url + "/api/chat", json={"model": "tiny-a", "messages": [], "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_num_ctx(multi):
    server, models, loads = multi
    long = " ".join(["word"] * 60)
    r = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": "tiny-a", "prompt": long, "raw": True, "stream": False, "options": {"num_ctx": 16}})  # fmt: skip
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]
    r = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": "tiny-a", "prompt": "a b c", "raw": True, "stream": False,
        "options": {"num_ctx": 12, "num_predict": 100, "temperature": 0}}).json()  # fmt: skip
    assert r["prompt_eval_count"] + r["eval_count"] <= 12 and r["done_reason"] == "length"


def test_budget_unloads_least_recently_used(home):
    probe = load(str(DEMO))
    from hearthlm.server.registry import loaded_bytes

    one = loaded_bytes(probe)
    probe.engine.shutdown()
    server, models, loads = _serve(budget=int(one * 2.5))  # room for two models, not three
    try:
        for name in ("tiny-a", "tiny-b"):
            assert _chat(server.url, name)["done"]
        assert {s.name for s in models.loaded()} == {"tiny-a", "tiny-b"}
        _chat(server.url, "tiny-a")  # tiny-b is now the least recently used
        assert _chat(server.url, "hearth-demo")["done"]
        assert {s.name for s in models.loaded()} == {"tiny-a", "hearth-demo"}
    finally:
        server.stop()
    server, models, loads = _serve(budget=one // 2)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-a", "messages": [
            {"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 507 and "--max-memory" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_keep_alive_values():
    assert keep_alive_seconds(None) is None
    assert keep_alive_seconds(30) == 30.0 and keep_alive_seconds("0") == 0.0
    assert keep_alive_seconds("5m") == 300.0 and keep_alive_seconds("1h30m") == 5400.0
    assert keep_alive_seconds("-1") == float("inf") and keep_alive_seconds(-1) == float("inf")
    assert keep_alive_seconds("1.5s") == 1.5 and keep_alive_seconds("250ms") == 0.25
    for bad in ("soon", "5 minutes", "", [1], True):
        with pytest.raises(Exception, match="keep_alive"):
            keep_alive_seconds(bad)


def test_copy_and_delete(multi):
    server, models, loads = multi
    client = ollama.Client(server.url)
    client.copy("tiny-a", "mine:latest")
    assert "mine:latest" in {m.model for m in client.list().models}
    before = list(loads.names)
    _chat(server.url, "tiny-a")
    _chat(server.url, "mine")  # the alias is the same model: no second load
    assert loads.names[len(before) :].count("tiny-a") <= 1 and "mine" not in loads.names
    client.delete("mine")
    assert "mine:latest" not in {m.model for m in client.list().models} and (store.store_root() / "tiny-a").is_dir()
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("hearth-demo")
    assert e.value.status_code == 400 and "built-in" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("no-such-model", "x")
    assert e.value.status_code == 404
    shutil.copytree(DEMO, store.store_root() / "tiny-c")
    _chat(server.url, "tiny-c")
    client.delete("tiny-c")
    assert not (store.store_root() / "tiny-c").exists() and "tiny-c" not in {s.name for s in models.loaded()}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny-c")
    assert e.value.status_code == 404


@pytest.fixture
def hub(home, monkeypatch, tmp_path):
    hub = FakeHub()
    hub.add("acme/tiny", DEMO)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield hub
    hub.close()


def test_pull_streams_progress(multi, hub):
    server, models, loads = multi
    client = ollama.Client(server.url)
    events = list(client.pull("hf.co/acme/tiny", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    files = [e for e in events if e.digest]
    weights = (DEMO / "model.safetensors").stat().st_size
    done = {e.digest: e for e in files if e.completed == e.total}
    assert any(e.total == weights for e in done.values())  # the weights' last line: all bytes
    for e in files:
        assert e.status.startswith("pulling ") and 0 <= e.completed <= e.total
    assert "acme/tiny:latest" in {m.model for m in client.list().models}
    assert _chat(server.url, "acme/tiny")["done"]
    assert client.pull("acme/tiny", stream=False).status == "success"  # already there: nothing to fetch
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2", stream=False)
    assert e.value.status_code == 400 and "Hugging Face" in str(e.value)
    lines = [json.loads(x) for x in httpx.post(server.url + "/api/pull", json={"model": "acme/missing"}).iter_lines()]
    assert lines[0] == {"status": "pulling manifest"} and "error" in lines[-1] and "acme/missing" in lines[-1]["error"]
