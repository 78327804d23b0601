"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) through the official anthropic client.

Most tests run on tests/serving.ScriptedEngine with the demo model's Gemma 4 template, so that tool calls and
thinking (markup the tiny demo model cannot write) run end to end; a few run on the real engine. Expected
values come from the script, the template and the SDK's own types, not from the server."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, TextBlock, ThinkingBlock, ToolUseBlock
from serving import TOOLS, LiveServer, ScriptedEngine

from hearthlm import LLM
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics

MODEL = "hearth-demo"
ARGS = {"city": "Paris, FR", "days": 2}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'
THOUGHT = "<|channel>thought\nThe user greets me; greet back.<channel|>Hello there!"
USER = [{"role": "user", "content": "hi"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FN = TOOLS[0]["function"]
TOOL = {"name": FN["name"], "description": FN["description"], "input_schema": FN["parameters"]}  # Anthropic's shape


def reply(prompt: str) -> str:
    """What the scripted model writes, by what the prompt holds."""
    if "response:get_weather" in prompt:
        return "It is sunny in Paris."
    if "get_weather" in prompt:
        return CALL
    if "count to five" in prompt:
        return "one two three four five"
    return THOUGHT if "<|think|>" in prompt else "Hello there!"


@pytest.fixture(scope="module")
def demo():
    return LLM()


def _serve(llm, engine, api_key: str | None = None) -> LiveServer:
    served = ServedModel(llm, engine, MODEL, Metrics())
    server = LiveServer(create_app(served, api_key))
    server.engine, server.served = engine, served
    return server


@pytest.fixture(scope="module")
def scripted(demo):
    server = _serve(demo, ScriptedEngine(demo.tokenizer, reply))
    yield server
    server.stop()


def client_for(server, api_key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def ac(scripted):
    return client_for(scripted)


def raw_events(server, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event of a streamed request."""
    r = httpx.post(server.url + "/v1/messages", json={**body, "stream": True}, headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for chunk in r.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- plain replies -------------------------------------------------------------------------------
def test_create_plain(ac, scripted, demo):
    m = ac.messages.create(model=MODEL, max_tokens=64, messages=USER)
    assert isinstance(m, Message) and m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_") and [type(b) for b in m.content] == [TextBlock]
    assert m.content[0].text == "Hello there!" and m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.output_tokens == len(demo.tokenizer.encode("Hello there!", add_special_tokens=False))
    assert m.usage.input_tokens > 0 and m.usage.cache_read_input_tokens == 0
    assert scripted.engine.params[-1].max_tokens == 64 and scripted.engine.params[-1].temperature == 1.0


def test_system_prompt(ac, scripted):
    ac.messages.create(model=MODEL, max_tokens=16, system="You answer tersely.", messages=USER)
    assert "You answer tersely." in scripted.engine.prompts[-1]
    blocks = [{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two.", "cache_control": None}]
    sampling = {"temperature": 0, "top_k": 5, "metadata": {"user_id": "u1"}}  # not in this SDK's create()
    m = ac.messages.create(model=MODEL, max_tokens=16, system=blocks, messages=USER, extra_body=sampling)
    prompt, params = scripted.engine.prompts[-1], scripted.engine.params[-1]
    assert "Rule one." in prompt and "Rule two." in prompt and m.content[0].text == "Hello there!"
    assert (params.temperature, params.top_k) == (0, 5)


def test_stream_with_the_sdk(ac):
    with ac.messages.stream(model=MODEL, max_tokens=64, messages=USER) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello there!"
    assert [b.text for b in final.content] == ["Hello there!"] and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_stream_event_order(scripted):
    events = raw_events(scripted, {"model": MODEL, "max_tokens": 64, "messages": USER})
    assert all(name == data["type"] for name, data in events)  # each event line names its data's type
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 2  # the script hands out two tokens at a time
    assert names == [
        "message_start", "ping", "content_block_start", *["content_block_delta"] * deltas, "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello there!"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None} and delta["usage"]["output_tokens"] > 0


# -- tools ---------------------------------------------------------------------------------------
def test_tool_round_trip(ac, scripted):
    m = ac.messages.create(model=MODEL, max_tokens=128, messages=WEATHER, tools=[TOOL])
    assert "<|tool>declaration:get_weather{" in scripted.engine.prompts[-1]  # rendered through the template
    assert m.stop_reason == "tool_use"
    [call] = m.content
    assert isinstance(call, ToolUseBlock) and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("get_weather", ARGS)
    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "sunny"}]}
    history = [*WEATHER, {"role": "assistant", "content": m.content}, {"role": "user", "content": [result]}]
    final = ac.messages.create(model=MODEL, max_tokens=128, messages=history, tools=[TOOL])
    prompt = scripted.engine.prompts[-1]
    assert CALL in prompt  # the call went back to the model as it wrote it
    assert '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>' in prompt
    assert [b.text for b in final.content] == ["It is sunny in Paris."] and final.stop_reason == "end_turn"
    result["is_error"], result["content"] = True, "no such city"
    ac.messages.create(model=MODEL, max_tokens=16, messages=[*history[:2], {"role": "user", "content": [result]}])
    assert "Error: no such city" in scripted.engine.prompts[-1]


def test_tool_use_streamed(ac):
    with ac.messages.stream(model=MODEL, max_tokens=128, messages=WEATHER, tools=[TOOL]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    [call] = final.content
    assert isinstance(call, ToolUseBlock) and call.input == ARGS and call.id.startswith("toolu_")


def test_tool_choice(ac, scripted):
    served = scripted.served
    openai_tools = [{"type": "function", "function": dict(FN)}]
    ac.messages.create(model=MODEL, max_tokens=64, messages=WEATHER, tools=[TOOL])
    auto = served.tool_constraint(openai_tools, required=False)["grammar"]
    assert scripted.engine.params[-1].grammar == auto
    m = ac.messages.create(model=MODEL, max_tokens=64, messages=WEATHER, tools=[TOOL], tool_choice={"type": "any"})
    assert scripted.engine.params[-1].grammar == served.tool_constraint(openai_tools, required=True)["grammar"] != auto
    assert m.stop_reason == "tool_use"
    pick = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    ac.messages.create(model=MODEL, max_tokens=64, messages=WEATHER, tools=[TOOL], tool_choice=pick)
    one = served.tool_constraint(openai_tools, required=True, parallel=False)["grammar"]
    assert scripted.engine.params[-1].grammar == one
    m = ac.messages.create(model=MODEL, max_tokens=64, messages=USER, tools=[TOOL], tool_choice={"type": "none"})
    assert "get_weather" not in scripted.engine.prompts[-1] and scripted.engine.params[-1].grammar is None
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(
            model=MODEL, max_tokens=8, messages=USER, tools=[TOOL], tool_choice={"type": "tool", "name": "x"}
        )
    assert e.value.body["error"]["type"] == "invalid_request_error" and "'x'" in e.value.body["error"]["message"]


def test_output_format_is_a_constraint(ac, scripted):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    ac.messages.create(model=MODEL, max_tokens=16, messages=USER, output_config=fmt)
    assert scripted.engine.params[-1].json_schema == schema and "JSON" not in scripted.engine.prompts[-1]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(
            model=MODEL, max_tokens=16, messages=WEATHER, tools=[TOOL], tool_choice={"type": "any"}, output_config=fmt
        )
    assert "output_config.format" in e.value.body["error"]["message"]


# -- stops ---------------------------------------------------------------------------------------
COUNT = [{"role": "user", "content": "Please count to five."}]


def test_stop_sequence(ac, scripted):
    m = ac.messages.create(model=MODEL, max_tokens=64, messages=COUNT, stop_sequences=["four", "zzz"])
    assert (m.stop_reason, m.stop_sequence, m.content[0].text) == ("stop_sequence", "four", "one two three ")
    body = {"model": MODEL, "max_tokens": 64, "messages": COUNT, "stop_sequences": ["zzz", "three"]}
    delta = raw_events(scripted, body)[-2][1]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "three"}


def test_max_tokens(ac, scripted):
    m = ac.messages.create(model=MODEL, max_tokens=2, messages=COUNT)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2 and m.content[0].text == "one two"
    with ac.messages.stream(model=MODEL, max_tokens=2, messages=COUNT) as s:
        assert s.get_final_message().stop_reason == "max_tokens"


# -- thinking ------------------------------------------------------------------------------------
def test_thinking_blocks(ac, scripted):
    m = ac.messages.create(
        model=MODEL, max_tokens=2048, messages=USER, thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert "<|think|>" in scripted.engine.prompts[-1]
    thinking, text = m.content
    assert isinstance(thinking, ThinkingBlock) and thinking.thinking == "The user greets me; greet back."
    assert thinking.signature and isinstance(text, TextBlock) and text.text == "Hello there!"
    ac.messages.create(model=MODEL, max_tokens=64, messages=USER, thinking={"type": "disabled"})
    assert "<|think|>" not in scripted.engine.prompts[-1]
    with pytest.raises(anthropic.BadRequestError):
        ac.messages.create(model=MODEL, max_tokens=64, messages=USER, thinking={"type": "enabled"})


def test_thinking_streamed(ac, scripted):
    body = {"model": MODEL, "max_tokens": 64, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 10}}
    events = raw_events(scripted, body)
    kinds = [d["delta"]["type"] if n == "content_block_delta" else n for n, d in events]
    first_text = kinds.index("text_delta")
    assert kinds[3] == "thinking_delta" and kinds[first_text - 3 : first_text] == [
        "signature_delta", "content_block_stop", "content_block_start",
    ]  # fmt: skip
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    with ac.messages.stream(**{k: v for k, v in body.items()}) as s:
        final = s.get_final_message()
    thinking, text = final.content
    assert (thinking.thinking, text.text) == ("The user greets me; greet back.", "Hello there!") and thinking.signature


def test_thinking_history_is_accepted(ac, scripted):
    history = [
        *USER,
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Greet back.", "signature": "abc"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Hello!"},
        ]},
        {"role": "user", "content": "And now?"},
    ]  # fmt: skip
    m = ac.messages.create(model=MODEL, max_tokens=64, messages=history)
    assert "Hello!" in scripted.engine.prompts[-1] and "opaque" not in scripted.engine.prompts[-1]
    assert m.content[0].text == "Hello there!"


# -- count_tokens --------------------------------------------------------------------------------
def test_count_tokens(ac, demo):
    system, messages = "Be brief.", [*WEATHER, {"role": "assistant", "content": "Which days?"}, *USER]
    n = ac.messages.count_tokens(model=MODEL, system=system, messages=messages, tools=[TOOL]).input_tokens
    tok = demo.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": system}, *messages], tools=[TOOLS[0]])
    assert n == len(tok.encode_chat(text))
    m = ac.messages.create(model=MODEL, max_tokens=8, system=system, messages=messages, tools=[TOOL])
    assert m.usage.input_tokens == n
    assert ac.messages.count_tokens(model=MODEL, messages=USER).input_tokens < n


def test_thinking_is_off_unless_asked(ac, demo):
    """Anthropic's default: no thinking field means none, whatever the template's own default is."""
    tok = demo.tokenizer
    count = lambda **kw: ac.messages.count_tokens(model=MODEL, messages=USER, **kw).input_tokens  # noqa: E731
    off = tok.apply_chat_template(USER, enable_thinking=False)
    on = tok.apply_chat_template(USER, enable_thinking=True)
    assert len(tok.encode_chat(on)) != len(tok.encode_chat(off))  # the template marks thinking in the prompt
    assert count() == count(thinking={"type": "disabled"}) == len(tok.encode_chat(off))
    assert count(thinking={"type": "enabled", "budget_tokens": 1024}) == len(tok.encode_chat(on))


# -- errors --------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int, kind: str) -> str:
    body = r.json()
    assert r.status_code == status and set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def test_errors_in_anthropic_shape(ac, scripted):
    post = lambda body, **kw: httpx.post(scripted.url + "/v1/messages", json=body, timeout=60, **kw)  # noqa: E731
    assert "max_tokens" in _error(post({"model": MODEL, "messages": USER}), 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError) as e:
        ac.messages.create(model="claude-nonexistent", max_tokens=8, messages=USER)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        ac.messages.count_tokens(model="claude-nonexistent", messages=USER)
    bad = [{"role": "user", "content": [{"type": "video", "url": "x"}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model=MODEL, max_tokens=8, messages=bad)
    assert e.value.body["error"]["type"] == "invalid_request_error" and "'video'" in e.value.body["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert "does not take image input" in e.value.body["error"]["message"]  # the demo reads text only
    cases = [
        {"model": MODEL, "max_tokens": 8, "messages": USER, "temperature": 1.5},
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]},
        {"model": MODEL, "max_tokens": 8, "messages": [*USER, {"role": "assistant", "content": "Sure"}]},
        {"model": MODEL, "max_tokens": 8, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "w"}]},
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    ]
    for body in cases:
        _error(post(body), 400, "invalid_request_error")
    raw = httpx.post(scripted.url + "/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    _error(raw, 400, "invalid_request_error")
    _error(httpx.post(scripted.url + "/v1/messages/nothing", json={}), 404, "not_found_error")
    assert ac.messages.create(model=MODEL, max_tokens=16, messages=USER).content[0].text == "Hello there!"  # serving


def test_api_key(demo):
    server = _serve(demo, ScriptedEngine(demo.tokenizer, reply), api_key="sekrit")
    body = {"model": MODEL, "max_tokens": 8, "messages": USER}
    try:
        with pytest.raises(anthropic.AuthenticationError) as e:
            client_for(server, "wrong").messages.create(**body)
        assert e.value.body["error"]["type"] == "authentication_error"
        assert client_for(server, "sekrit").messages.create(**body).content[0].text == "Hello there!"
        ok = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": "sekrit"})
        assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "Hello there!"
        wrong = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": "nope"})
        assert "x-api-key" in _error(wrong, 401, "authentication_error")
        other = {"model": MODEL, "messages": USER}  # x-api-key is Anthropic's header, for its routes only
        assert (
            httpx.post(server.url + "/v1/chat/completions", json=other, headers={"x-api-key": "sekrit"}).status_code
            == 401
        )
    finally:
        server.stop()


class _Broken(ScriptedEngine):
    async def generate(self, prompt_ids, params, request_id=None, client=None):
        if params.max_tokens == 7:
            raise RuntimeError("boom before the first token")
        async for out in super().generate(prompt_ids, params, request_id):
            yield out
            raise RuntimeError("boom mid-stream")


def test_engine_failures(demo):
    server = _serve(demo, _Broken(demo.tokenizer, reply))
    try:
        r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 7, "messages": USER})
        assert "Traceback" not in r.text and "boom" not in _error(r, 500, "api_error")
        events = raw_events(server, {"model": MODEL, "max_tokens": 64, "messages": USER})
        name, data = events[-1]
        assert name == "error" and data["type"] == "error" and data["error"]["type"] == "api_error"
        assert "boom mid-stream" in data["error"]["message"] and events[0][0] == "message_start"
        with pytest.raises(anthropic.APIStatusError) as e:  # the SDK raises on the error event
            with client_for(server).messages.stream(model=MODEL, max_tokens=64, messages=USER) as s:
                s.get_final_message()
        assert "boom mid-stream" in str(e.value)
        assert httpx.get(server.url + "/health").status_code == 200  # still serving
    finally:
        server.stop()


# -- the real engine and the demo model ----------------------------------------------------------
def test_real_engine(server):
    client = client_for(server)
    greedy = {"temperature": 0}
    m = client.messages.create(model=MODEL, max_tokens=4, messages=USER, extra_body=greedy)
    assert m.stop_reason in ("max_tokens", "end_turn") and 0 < m.usage.output_tokens <= 4
    assert (
        m.usage.input_tokens + m.usage.cache_read_input_tokens
        == client.messages.count_tokens(model=MODEL, messages=USER).input_tokens
    )
    with client.messages.stream(model=MODEL, max_tokens=4, messages=USER, extra_body=greedy) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    assert streamed == text == "".join(b.text for b in final.content if b.type == "text")  # greedy: the same reply


def test_real_engine_stop_sequence(server):
    client, greedy = client_for(server), {"temperature": 0}
    m = client.messages.create(model=MODEL, max_tokens=12, messages=USER, extra_body=greedy)
    text = "".join(b.text for b in m.content if b.type == "text")
    stop = text.strip()[len(text.strip()) // 2 :][:2]  # from the middle of the greedy reply
    assert stop.strip(), text
    cut = client.messages.create(model=MODEL, max_tokens=12, messages=USER, stop_sequences=[stop], extra_body=greedy)
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in cut.content if b.type == "text") == text[: text.index(stop)]
