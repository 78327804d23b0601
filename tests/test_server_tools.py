"""Tool calls, reasoning, errors and auth through the HTTP routes, with the official openai and ollama clients.

The engine here is tests/serving.ScriptedEngine: its replies are scripted text (tool-call markup, thinking
blocks) that the tiny demo model cannot write, so the route -> parser -> response path runs end to end on
exactly the markup each model family writes. Other families use the demo vocabulary with their real template."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from serving import TOOLS, LiveServer, ScriptedEngine, with_template

from hearthlm import LLM
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
ARGS = {"city": "Paris, FR", "days": 2}
CALLS = {  # what each family writes to call get_weather(ARGS)
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>',
    "qwen3": '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, FR", "days": 2}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris, FR", "days": 2}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris, FR", "days": 2}}]',
}
THOUGHT = "<|channel>thought\nThe user greets me; greet back.<channel|>Hello there!"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def script(family: str):
    def reply(prompt: str) -> str:
        if "get_weather" in prompt and "response:get_weather" not in prompt and "tool_response" not in prompt:
            return CALLS[family]
        return THOUGHT if family == "gemma4" else "It is sunny."

    return reply


@pytest.fixture(scope="module")
def demo():
    return LLM()


def _serve(llm, family: str, api_key: str | None = None):
    engine = ScriptedEngine(llm.tokenizer, script(family))
    server = LiveServer(create_app(ServedModel(llm, engine, "hearth-demo", Metrics()), api_key))
    server.engine, server.family = engine, family
    return server


@pytest.fixture(scope="module")
def gemma(demo):
    server = _serve(demo, "gemma4")
    yield server
    server.stop()


TEMPLATE_FILES = {
    "qwen3": ("Qwen-Qwen3-0.6B", {"eos_token": "<eos>"}),
    "llama3": ("llama3-format", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407", {"bos_token": "<bos>", "eos_token": "<eos>"}),
}


@pytest.fixture(scope="module", params=sorted(TEMPLATE_FILES))
def other(request, demo):
    name, specials = TEMPLATE_FILES[request.param]
    fake = with_template(demo, (TEMPLATES / f"{name}.jinja").read_text(), name, specials)
    server = _serve(fake, request.param)
    yield server
    server.stop()


def oa(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def stream_tool_calls(chunks) -> tuple[list[dict], str, str, str | None]:
    """Accumulate streamed tool-call deltas by index, as OpenAI clients do."""
    calls: dict[int, dict] = {}
    content, reasoning, reason = "", "", None
    for c in chunks:
        for ch in c.choices:
            d = ch.delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return [calls[i] for i in sorted(calls)], content, reasoning, reason


def test_openai_tool_call_gemma4(gemma):
    client = oa(gemma)
    r = client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    assert call.id.startswith("call_")
    assert "<|tool>declaration:get_weather{" in gemma.engine.prompts[-1]  # rendered through the template
    chunks = client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS, stream=True)
    calls, content, _, reason = stream_tool_calls(chunks)
    assert reason == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", ARGS)]


def test_tool_results_reach_the_template(gemma):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = oa(gemma).chat.completions.create(model="hearth-demo", messages=messages, tools=TOOLS)
    prompt = gemma.engine.prompts[-1]
    assert '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>' in prompt
    assert '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>' in prompt
    assert r.choices[0].message.content == "Hello there!"


def test_tool_choice(gemma):
    client = oa(gemma)
    r = client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS, tool_choice="none")
    assert "get_weather" not in gemma.engine.prompts[-1] and r.choices[0].message.tool_calls is None
    pick = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS, tool_choice=pick)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="hearth-demo", messages=USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}
        )
    assert e.value.body["param"] == "tool_choice"


def test_ollama_tool_call_gemma4(gemma):
    client = ollama.Client(host=gemma.url)
    r = client.chat(model="hearth-demo", messages=USER, tools=TOOLS, stream=False)
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == ARGS
    parts = list(client.chat(model="hearth-demo", messages=USER, tools=TOOLS, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", ARGS)]
    assert parts[-1].done and parts[-1].eval_count > 0 and "".join(p.message.content or "" for p in parts) == ""


def test_thinking_split_openai(gemma):
    client = oa(gemma)
    r = client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high"
    )
    assert "<|think|>" in gemma.engine.prompts[-1]
    msg = r.choices[0].message
    assert msg.content == "Hello there!" and msg.model_extra["reasoning_content"] == "The user greets me; greet back."
    chunks = client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "hi"}], stream=True, reasoning_effort="none"
    )
    _, content, reasoning, _ = stream_tool_calls(chunks)
    assert "<|think|>" not in gemma.engine.prompts[-1]
    assert (content, reasoning) == ("Hello there!", "The user greets me; greet back.")
    client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "hi"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )  # fmt: skip
    assert "<|think|>" in gemma.engine.prompts[-1]


def test_thinking_split_ollama(gemma):
    client = ollama.Client(host=gemma.url)
    r = client.chat(model="hearth-demo", messages=[{"role": "user", "content": "hi"}], think=True)
    assert "<|think|>" in gemma.engine.prompts[-1]
    assert (r.message.content, r.message.thinking) == ("Hello there!", "The user greets me; greet back.")
    parts = list(client.chat(model="hearth-demo", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content for p in parts) == "Hello there!"
    assert "".join(p.message.thinking or "" for p in parts) == "The user greets me; greet back."
    g = client.generate(model="hearth-demo", prompt="hi", think=True)
    assert (g.response, g.thinking) == ("Hello there!", "The user greets me; greet back.")


def test_other_families_tool_calls(other):
    client = oa(other)
    r = client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", ARGS)
    calls, content, reasoning, reason = stream_tool_calls(
        client.chat.completions.create(model="hearth-demo", messages=USER, tools=TOOLS, stream=True)
    )
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", ARGS)] and content == ""
    assert reason == "tool_calls"
    if other.family == "qwen3":
        assert reasoning == "The user wants weather."
    r = ollama.Client(host=other.url).chat(model="hearth-demo", messages=USER, tools=TOOLS)
    assert dict(r.message.tool_calls[0].function.arguments) == ARGS


# -- errors and auth ----------------------------------------------------------------------------
def test_openai_errors(gemma):
    client = oa(gemma)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="hearth-demo", messages=USER, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="hearth-demo", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="hearth-demo", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="hearth-demo", messages=USER, extra_body={"chat_template_kwargs": {"tools": 1}}
        )
    assert e.value.body["param"] == "chat_template_kwargs"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.post(
        gemma.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(gemma.url + "/v1/nothing").json()["error"]["message"].startswith("no route")


def test_ollama_errors(gemma):
    client = ollama.Client(host=gemma.url)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=USER)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="hearth-demo", messages=USER, options={"temperature": -1})
    assert e.value.status_code == 400
    form = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends, as in Ollama's docs
    body = json.dumps({"model": "hearth-demo", "messages": USER, "stream": False})
    assert httpx.post(gemma.url + "/api/chat", content=body, headers=form).json()["done"]
    r = httpx.post(gemma.url + "/api/chat", json={"model": "hearth-demo", "messages": "nope"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_api_key(demo):
    server = _serve(demo, "gemma4", api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            oa(server, api_key="wrong").chat.completions.create(model="hearth-demo", messages=USER)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert oa(server, api_key="sekrit").chat.completions.create(model="hearth-demo", messages=USER).choices
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=server.url).chat(model="hearth-demo", messages=USER)
        assert e.value.status_code == 401
        ok = ollama.Client(host=server.url, headers={"Authorization": "Bearer sekrit"})
        assert ok.chat(model="hearth-demo", messages=USER).message.content == "Hello there!"
        assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(server.url + "/metrics").status_code == 401
    finally:
        server.stop()


def test_ollama_model_routes(gemma):
    client = ollama.Client(host=gemma.url)
    [m] = client.list().models
    assert m.model == "hearth-demo:latest" and m.size > 0 and m.details.family == "gemma4"
    show = client.show("hearth-demo:latest")
    assert "tools" in show.capabilities and "thinking" in show.capabilities and "<|turn>" in show.template
    assert client.ps().models[0].model == "hearth-demo:latest"
    assert httpx.get(gemma.url + "/api/version").json()["version"]
    assert httpx.get(gemma.url + "/").text.startswith("Ollama is running")
    assert httpx.head(gemma.url + "/").status_code == 200
    assert [m.id for m in oa(gemma).models.list().data] == ["hearth-demo"]


def test_json_modes_reach_the_engine_as_constraints(gemma):
    """JSON mode is enforced by constrained decoding (tests/test_structured.py), not asked for in the prompt: the
    request's format reaches the engine as the constraint, with Gemma 4's reasoning markers so it may think first."""
    oa(gemma).chat.completions.create(model="hearth-demo", messages=USER, response_format={"type": "json_object"})
    params, prompt = gemma.engine.params[-1], gemma.engine.prompts[-1]
    assert params.json_schema is True and "JSON" not in prompt
    assert params.reasoning == ("<|channel>thought", "<channel|>")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    ollama.Client(host=gemma.url).chat(model="hearth-demo", messages=USER, format=schema)
    assert gemma.engine.params[-1].json_schema == schema and "JSON" not in gemma.engine.prompts[-1]
    ollama.Client(host=gemma.url).generate(model="hearth-demo", prompt="Hi", format="json")
    assert gemma.engine.params[-1].json_schema is True


class _Broken(ScriptedEngine):
    async def generate(self, prompt_ids, params, request_id=None, client=None):
        if params.max_tokens == 7:
            raise RuntimeError("boom before the first token")
        async for out in super().generate(prompt_ids, params, request_id):
            yield out
            raise RuntimeError("boom mid-stream")


def test_engine_failures_never_leak_a_traceback(demo):
    engine = _Broken(demo.tokenizer, script("gemma4"))
    server = LiveServer(create_app(ServedModel(demo, engine, "hearth-demo", Metrics())))
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions", json={"model": "hearth-demo", "messages": USER, "max_tokens": 7}
        )
        assert r.status_code == 500 and "Traceback" not in r.text and r.json()["error"]["type"] == "server_error"
        r = httpx.post(
            server.url + "/api/chat", json={"model": "hearth-demo", "messages": USER, "options": {"num_predict": 7}}
        )
        assert r.status_code == 500 and set(r.json()) == {"error"}
        body = {"model": "hearth-demo", "messages": USER, "stream": True}
        lines = httpx.post(server.url + "/v1/chat/completions", json=body).text.splitlines()
        assert any("boom mid-stream" in line and '"error"' in line for line in lines) and lines[-2] == "data: [DONE]"
        last = httpx.post(server.url + "/api/chat", json=body).text.splitlines()[-1]
        assert json.loads(last)["error"].endswith("boom mid-stream")
        assert httpx.get(server.url + "/health").status_code == 200  # still serving
    finally:
        server.stop()


def test_cli_serve(monkeypatch):
    from hearthlm import cli, server
    from hearthlm.moe.options import PrivacyOptions

    got = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: got.setdefault("args", (a, kw)))
    monkeypatch.setenv("HEARTH_API_KEY", "from-env")
    assert cli.main(["serve", "--port", "8123", "--quant", "int8"]) == 0
    args, kwargs = got["args"]
    assert args[:6] == (None, "127.0.0.1", 8123, "from-env", None, "int8") and args[7] is None
    defaults = {
        "expert_budget": None,
        "moe_profile": True,
        "keep_alive": None,
        "max_memory": None,
        "image_tokens": None,
        "draft": None,
        "device": None,
        "privacy": PrivacyOptions(),
        "quant_towers": False,
        "mesh": None,  # --tp's rank group (rank 0 of `hearth serve MODEL --tp N`)
    }
    assert kwargs == defaults
    got.clear()
    assert cli.main(["serve", "some/model", "--api-key", "k", "--host", "0.0.0.0", "--expert-budget", "25%"]) == 0
    assert got["args"][0][:4] == ("some/model", "0.0.0.0", 11434, "k")
    assert got["args"][1] == defaults | {"expert_budget": "25%"}
    got.clear()
    assert cli.main(["serve", "--draft", "lookup"]) == 0 and got["args"][1]["draft"] == "lookup"
    got.clear()
    assert cli.main(["serve", "--device", "cuda:1"]) == 0 and got["args"][1]["device"] == "cuda:1"
    got.clear()
    assert cli.main(["serve", "--keep-alive", "10m", "--max-memory", "12GB"]) == 0
    assert got["args"][1]["keep_alive"] == "10m" and got["args"][1]["max_memory"] == "12GB"
