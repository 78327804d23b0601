"""OpenAI's Responses API (/v1/responses) with the official openai client: whole and streamed responses, tool
round trips with full items and with previous_response_id, the store, text.format on the real engine, and errors.

Most tests run on tests/serving.ScriptedEngine behind the demo model's Gemma 4 template, so the model's output
(a thinking block, a tool call) is exact; text.format and the streamed-equals-whole check run on the real engine."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from serving import LiveServer, ScriptedEngine

from hearthlm import LLM
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics
from hearthlm.server.responses import ResponseStore, Stored

MODEL = "hearth-demo"
ARGS = {"city": "Paris, FR", "days": 2}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'
WHY = "<|channel>thought\nThe user wants weather.<channel|>"
THOUGHT = "<|channel>thought\nThe user greets me; greet back.<channel|>"
TOOLS = [  # the Responses API's flat function tool
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
        "strict": False,
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
EVENTS = TypeAdapter(ResponseStreamEvent)


def reply(prompt: str) -> str:
    """What the scripted model writes: a call while get_weather is offered and unanswered, a thought when
    thinking is on."""
    think, turn = "<|think|>" in prompt, prompt.rsplit("<|turn>user", 1)[-1]
    if "response:get_weather" in turn:  # Gemma 4's template opens a thought after a tool's result
        thought = "The tool answered.<channel|>" if prompt.endswith("<|channel>thought\n") else ""
        return thought + "It is sunny in Paris."
    if "declaration:get_weather" in prompt:
        return (WHY if think else "") + CALL
    return (THOUGHT if think else "") + "Hello there!"


@pytest.fixture(scope="module")
def demo():
    return LLM()


def _serve(llm, engine) -> LiveServer:
    server = LiveServer(create_app(ServedModel(llm, engine, MODEL, Metrics())))
    server.engine = engine
    return server


@pytest.fixture(scope="module")
def scripted(demo):
    server = _serve(demo, ScriptedEngine(demo.tokenizer, reply))
    yield server
    server.stop()


def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def raw_events(server, **body) -> list[dict]:
    """The SSE events of a streamed request, each checked against the SDK's own event types."""
    body = {"model": MODEL, "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines]
    for e in events:
        EVENTS.validate_python(e)
    return events


def kinds(events: list[dict]) -> list[str]:
    """Event types, each run of deltas as one."""
    out = []
    for e in events:
        if not (e["type"].endswith(".delta") and out and out[-1] == e["type"]):
            out.append(e["type"])
    return out


# -- whole responses ---------------------------------------------------------------------------------------
def test_string_input_and_instructions(scripted):
    r = oa(scripted).responses.create(model=MODEL, input="Hi!", instructions="Be brief.", metadata={"k": "v"}, user="u")
    assert r.output_text == "Hello there!" and r.status == "completed" and r.object == "response"
    assert r.id.startswith("resp_") and r.model == MODEL and r.metadata == {"k": "v"}
    [msg] = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.role == "assistant"
    assert msg.status == "completed" and msg.content[0].annotations == []
    prompt = scripted.engine.prompts[-1]
    assert prompt.index("Be brief.") < prompt.index("Hi!")  # instructions: the system turn
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens == 0


def test_item_input_and_the_sdk_model(scripted):
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rule one."}]},
        {"role": "user", "content": "First question"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "First answer"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Second "}, {"type": "input_text", "text": "one"}]},
    ]
    body = {"model": MODEL, "input": items, "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 50}
    raw = httpx.post(scripted.url + "/v1/responses", json=body).json()
    r = Response.model_validate(raw)  # every field the SDK requires is there, with its type
    assert r.output_text == "Hello there!" and (r.temperature, r.top_p, r.max_output_tokens) == (0.5, 0.9, 50)
    assert r.tools == [] and r.tool_choice == "auto" and r.parallel_tool_calls and r.text.format.type == "text"
    prompt = scripted.engine.prompts[-1]
    order = [prompt.index(s) for s in ("Rule one.", "First question", "First answer", "Second one")]
    assert order == sorted(order)
    assert scripted.engine.params[-1].max_tokens == 50 and scripted.engine.params[-1].temperature == 0.5


def test_reasoning_effort_and_reasoning_items(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input="Hi!", reasoning={"effort": "high"})
    assert "<|think|>" in scripted.engine.prompts[-1]
    thought, msg = r.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.summary == []
    assert thought.content[0].type == "reasoning_text" and thought.content[0].text == "The user greets me; greet back."
    assert (
        r.output_text == "Hello there!" and 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    )
    for effort in ("none", "minimal"):
        r = client.responses.create(model=MODEL, input="Hi!", reasoning={"effort": effort})
        assert "<|think|>" not in scripted.engine.prompts[-1] and [o.type for o in r.output] == ["message"]


def test_max_output_tokens_is_incomplete(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input="Hi!", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 2 and r.output_text
    events = raw_events(scripted, input="Hi!", max_output_tokens=2)
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"
    assert events[-2]["type"] == "response.output_item.done" and events[-2]["item"]["status"] == "incomplete"


# -- streaming -----------------------------------------------------------------------------------------------
MESSAGE_EVENTS = [
    "response.output_item.added", "response.content_part.added", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
]  # fmt: skip
REASONING_EVENTS = [
    "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
    "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
]  # fmt: skip


def test_streamed_event_sequence(scripted):
    events = raw_events(scripted, input="Hi!", reasoning={"effort": "high"})
    assert kinds(events) == [
        "response.created", "response.in_progress", *REASONING_EVENTS, *MESSAGE_EVENTS, "response.completed"
    ]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    done = events[-1]["response"]
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(texts) == "Hello there!" and len(texts) > 1  # streamed in pieces
    thinking = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert thinking == done["output"][0]["content"][0]["text"] == "The user greets me; greet back."
    message = done["output"][1]
    for e in events[2:-1]:  # every item event points at its item in the final output
        index = e["output_index"]
        assert index == (1 if e.get("item_id", e.get("item", {}).get("id")) == message["id"] else 0)
    assert {e["response"]["id"] for e in (events[0], events[1], events[-1])} == {done["id"]}
    assert {e["content_index"] for e in events if "content_index" in e} == {0}  # one part per item
    stored = oa(scripted).responses.retrieve(done["id"])  # a streamed response is stored too
    assert stored.output_text == "Hello there!" and stored.output[0].id == done["output"][0]["id"]


def test_sdk_stream_helper_accumulates_the_response(scripted):
    client = oa(scripted)
    with client.responses.stream(model=MODEL, input="Hi!", reasoning={"effort": "high"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    whole = client.responses.create(model=MODEL, input="Hi!", reasoning={"effort": "high"})
    assert final.output_text == "".join(deltas) == whole.output_text == "Hello there!"
    assert [o.type for o in final.output] == [o.type for o in whole.output] == ["reasoning", "message"]
    assert final.status == "completed" and final.usage.total_tokens == whole.usage.total_tokens


def test_stream_equals_whole_on_the_real_engine(client):
    ask = {"model": MODEL, "input": "Hi!", "temperature": 0, "max_output_tokens": 100}
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        final = stream.get_final_response()  # the SDK's helper needs response.completed
    assert whole.status == final.status == "completed" and whole.output_text
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


class _Failing(ScriptedEngine):
    async def generate(self, prompt_ids, params, request_id=None, client=None):
        async for out in super().generate(prompt_ids, params, request_id):
            yield out
            raise RuntimeError("boom mid-stream")


def test_a_failure_mid_stream_is_response_failed(demo):
    server = _serve(demo, _Failing(demo.tokenizer, reply))
    try:
        events = raw_events(server, input="Hi!")
        last = events[-1]
        assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
        assert "boom mid-stream" in last["response"]["error"]["message"]
        assert last["response"]["error"]["code"] == "server_error"
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()


# -- tools ---------------------------------------------------------------------------------------------------
def _call_of(r):
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == ARGS and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    return call


def test_tool_round_trip_with_full_items(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, reasoning={"effort": "high"})
    call = _call_of(r)
    assert r.output_text == "" and [o.type for o in r.output] == ["reasoning", "function_call"]
    assert r.tools[0].name == "get_weather" and "<|tool>declaration:get_weather{" in scripted.engine.prompts[-1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    r2 = client.responses.create(
        model=MODEL, input=[*ASK, *r.output, result], tools=TOOLS, reasoning={"effort": "high"}
    )
    assert r2.output_text == "It is sunny in Paris." and r2.status == "completed"
    prompt = scripted.engine.prompts[-1]
    assert CALL in prompt and '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}' in prompt
    assert "The user wants weather." in prompt  # the reasoning item went back as the call turn's thinking
    assert r2.output[0].content[0].text == "The tool answered."


def test_tool_round_trip_with_previous_response_id(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, instructions="Use tools.")
    call = _call_of(r)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input=[result], tools=TOOLS)
    assert r2.output_text == "It is sunny in Paris." and r2.previous_response_id == r.id
    prompt = scripted.engine.prompts[-1]
    assert ASK[0]["content"] in prompt and CALL in prompt and "response:get_weather" in prompt
    assert "Use tools." not in prompt  # instructions are not carried over, as OpenAI does
    r3 = client.responses.create(model=MODEL, previous_response_id=r2.id, input="Thanks!")
    assert r3.output_text == "Hello there!" and "It is sunny in Paris." in scripted.engine.prompts[-1]
    assert client.responses.retrieve(r2.id).output_text == r2.output_text
    client.responses.delete(r.id)
    for ask in (lambda: client.responses.retrieve(r.id), lambda: client.responses.create(
            model=MODEL, previous_response_id=r.id, input=[result])):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            ask()


def test_streamed_tool_call(scripted):
    events = raw_events(scripted, input=ASK, tools=TOOLS)
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1  # the arguments stream as the model writes them
    assert kinds(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    added, args_done, done = events[2]["item"], events[-3], events[-2]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress" and added["id"] == done["id"]
    assert all(e["item_id"] == added["id"] and e["output_index"] == 0 for e in [*deltas, args_done])
    assert "".join(e["delta"] for e in deltas) == args_done["arguments"] == done["arguments"]
    assert json.loads(done["arguments"]) == ARGS
    with oa(scripted).responses.stream(model=MODEL, input=ASK, tools=TOOLS) as stream:
        final = stream.get_final_response()
    _call_of(final)


def test_tool_choice(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice="none")
    assert "get_weather" not in scripted.engine.prompts[-1] and r.output_text == "Hello there!"
    r = client.responses.create(
        model=MODEL, input=ASK, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    )  # fmt: skip
    _call_of(r)
    assert scripted.engine.params[-1].grammar  # the call is held to the tool's schema
    assert r.tool_choice.name == "get_weather" and r.parallel_tool_calls is False
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice={"type": "function", "name": "x"})
    assert e.value.body["param"] == "tool_choice"


# -- the store -----------------------------------------------------------------------------------------------
def test_store_false_keeps_nothing(scripted):
    client = oa(scripted)
    r = client.responses.create(model=MODEL, input="Hi!", store=False)
    assert r.output_text == "Hello there!" and r.store is False
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Again", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id" and set(e.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    events = raw_events(scripted, input="Hi!", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(events[-1]["response"]["id"])


def test_each_server_has_its_own_store(scripted, demo):
    r = oa(scripted).responses.create(model=MODEL, input="Hi!")
    other = _serve(demo, ScriptedEngine(demo.tokenizer, reply))
    try:
        with pytest.raises(openai.NotFoundError):
            oa(other).responses.retrieve(r.id)
    finally:
        other.stop()
    assert oa(scripted).responses.retrieve(r.id).id == r.id


def test_store_is_bounded_least_recently_used_first():
    store = ResponseStore(limit=2)
    for rid in ("a", "b"):
        store.put(rid, Stored({"id": rid}, []))
    store.get("a")  # used: "b" is now the oldest
    store.put("c", Stored({"id": "c"}, []))
    assert store.get("a") and store.get("c")
    with pytest.raises(Exception, match="no stored response"):
        store.get("b")


# -- text.format on the real engine ------------------------------------------------------------------------
class Prophet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=12)
    age: int = Field(ge=1, le=120)


def test_json_schema_format_is_enforced(client):
    schema = Prophet.model_json_schema()
    fmt = {"type": "json_schema", "name": "prophet", "schema": schema, "strict": True}
    ask = {"model": MODEL, "input": "Name a prophet.", "temperature": 0, "max_output_tokens": 120}
    r = client.responses.create(**ask, text={"format": fmt})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)
    parsed = client.responses.parse(**{**ask, "temperature": 1.0}, text_format=Prophet)
    assert isinstance(parsed.output_parsed, Prophet)
    r = client.responses.create(**ask, text={"format": {"type": "json_object"}})
    assert r.status != "completed" or isinstance(json.loads(r.output_text), dict)
    assert r.output_text.lstrip().startswith("{")


# -- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [{"type": "banana"}]}, "input.0.type", "'banana'"),
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input.0", "nope"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content",
         "input_image"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", "role"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]}, "input.0.arguments",
         "JSON"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "web_search"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema", "schema"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "strang"}}}}, None,
         "strang"),
        ({"input": "x", "temperature": 5}, "temperature", "temperature"),
        ({"input": []}, "input", "empty"),
    ],
)  # fmt: skip
def test_bad_requests_are_400s(scripted, client, body, param, words):
    target = client if "text" in body else oa(scripted)  # a schema is compiled by the real engine
    with pytest.raises(openai.BadRequestError) as e:
        target.responses.create(model=MODEL, **body)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    assert words in e.value.body["message"] and (param is None or e.value.body["param"] == param)


def test_not_found_errors_and_still_serving(scripted):
    client = oa(scripted)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="no-such-model", input="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert e.value.body["code"] == "response_not_found"
    r = httpx.delete(scripted.url + "/v1/responses/resp_unknown")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(scripted.url + "/v1/responses", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Traceback" not in r.text
    assert client.responses.create(model=MODEL, input="Hi!").output_text == "Hello there!"
