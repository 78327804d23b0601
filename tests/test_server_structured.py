"""Structured outputs through the server, with the real engine on the demo model and the official clients,
unchanged: openai (response_format, `.parse()` with a Pydantic model, streamed), ollama (`format`), LangChain's
`with_structured_output` over both, vLLM's and llama-server's extension fields, tool_choice "required" and a named
function in every tool-call format we parse, and bad constraints as 400s in each API's error shape."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from serving import LiveServer, with_template

from hearthlm.chat_formats import FORMATS
from hearthlm.engine.async_engine import AsyncEngine
from hearthlm.engine.engine import Engine
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics

MODEL = "hearth-demo"
ASK = [{"role": "user", "content": "Name a prophet and his age."}]


class Prophet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict mode requires

    name: str = Field(max_length=12)
    age: int = Field(ge=1, le=120)
    role: Literal["prophet", "king", "scribe"]
    books: list[Annotated[str, StringConstraints(max_length=10)]] = Field(max_length=3)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "roll",
            "description": "Roll dice.",
            "parameters": {
                "type": "object",
                "properties": {"sides": {"type": "integer", "minimum": 2, "maximum": 20}},
                "required": ["sides"],
            },
        },
    },
]


def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Prophet, temperature=1.0, seed=seed, max_tokens=150
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Prophet)


def test_openai_json_schema_and_json_object_streamed_and_whole(client):
    schema = Prophet.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "prophet", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=150
    )
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    chunks = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=150, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, temperature=0.8, seed=4, max_tokens=200
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_completions_route_and_extension_fields(client, server):
    """vLLM's guided_* and structured_outputs, llama-server's grammar and json_schema: the same constraints."""
    cases = [
        ({"guided_regex": r"[0-9]{3}-[a-z]{3}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{3}", t)),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in {"red", "green", "blue"}),
        ({"structured_outputs": {"regex": r"(yes|no)!"}}, lambda t: t in {"yes!", "no!"}),
        ({"grammar": 'root ::= "v" [0-9] "." [0-9]'}, lambda t: re.fullmatch(r"v\d\.\d", t)),
        ({"json_schema": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
         lambda t: 1 <= len(json.loads(t)) <= 3),
    ]  # fmt: skip
    for extra, ok in cases:
        r = client.completions.create(
            model=MODEL, prompt="Answer:", max_tokens=30, temperature=1.0, seed=2, extra_body=extra
        )
        assert r.choices[0].finish_reason == "stop" and ok(r.choices[0].text), (extra, r.choices[0].text)
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, temperature=0, extra_body=extra)
        assert ok(r.choices[0].message.content), (extra, r.choices[0].message.content)


def test_ollama_format_schema_and_json(server):
    c = ollama.Client(host=server.url)
    r = c.chat(model=MODEL, messages=ASK, format=Prophet.model_json_schema(), options={"temperature": 0.9, "seed": 1})
    assert r.done_reason == "stop"
    Prophet.model_validate_json(r.message.content)
    r = c.generate(model=MODEL, prompt="List three:", format=Prophet.model_json_schema(), options={"seed": 3})
    Prophet.model_validate_json(r.response)
    parts = c.chat(model=MODEL, messages=ASK, format=Prophet.model_json_schema(), stream=True, options={"seed": 5})
    Prophet.model_validate_json("".join(p.message.content for p in parts))
    r = httpx.post(
        server.url + "/api/generate", json={"model": MODEL, "prompt": "x", "stream": False, "regex": "[ab]{4}"}
    )
    assert re.fullmatch("[ab]{4}", r.json()["response"])


def test_langchain_with_structured_output(server):
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", temperature=1.0, seed=1, max_tokens=300)
    assert isinstance(chat.with_structured_output(Prophet, method="json_schema").invoke("Who?"), Prophet)
    # json_mode asks for any JSON object, which bounds nothing: the demo model never saw JSON and at temperature 1
    # writes keys of any length, so some seeds reach max_tokens. Every reply must parse as an object or end with
    # finish_reason "length" (which LangChain raises as such), and some seed must give an object.
    outcomes = []
    for seed in range(6):
        chat = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", temperature=1.0, seed=seed,
                          max_tokens=300)  # fmt: skip
        try:
            out = chat.with_structured_output(Prophet.model_json_schema(), method="json_mode").invoke(
                "Who? Answer in JSON."
            )
            assert isinstance(out, dict)
            outcomes.append("object")
        except openai.LengthFinishReasonError:
            outcomes.append("length")
    assert "object" in outcomes, outcomes
    local = ChatOllama(model=MODEL, base_url=server.url, temperature=1.0, seed=1, num_predict=300)
    assert isinstance(local.with_structured_output(Prophet, method="json_schema").invoke("Who?"), Prophet)


def test_bad_constraints_are_400s_in_each_api_shape(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"guided_regex": "[a-"})
    assert "invalid regex" in e.value.body["message"] and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_object"}, extra_body={"guided_choice": ["a"]}
        )
    assert "response_format and guided_choice" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    assert "json_schema.schema" in e.value.body["message"]
    r = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": ASK, "format": {"type": "strang"}})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "strang" in r.json()["error"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "grammar": "start: x"})
    assert r.status_code == 400 and "invalid grammar" in r.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3).choices  # still serving


# -- tool calls: "required" and a named function, in every tool-call format -------------------------------------
TEMPLATES = {
    "qwen3": ("Qwen-Qwen3-0.6B", {"eos_token": "<eos>"}),
    "llama3": ("llama3-format", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407", {"bos_token": "<bos>", "eos_token": "<eos>"}),
}


@pytest.fixture(scope="module", params=["gemma4", *sorted(TEMPLATES)])
def family_server(request, served):
    """The demo's weights and vocabulary behind each family's real chat template, on the real engine: what the
    model writes is held to that family's call syntax by the grammar alone."""
    from pathlib import Path

    llm = served.llm
    if request.param != "gemma4":
        name, specials = TEMPLATES[request.param]
        text = (Path(__file__).parent / "data" / "chat_templates" / f"{name}.jinja").read_text()
        llm = with_template(llm, text, name, specials)
    engine = AsyncEngine(Engine(llm, max_running=4))
    model = ServedModel(llm, engine, MODEL, Metrics())
    assert model.format is FORMATS[request.param]
    s = LiveServer(create_app(model))
    yield s
    s.stop()
    engine.shutdown()


def _check_call(call, tools=TOOLS):
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in schema
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


def test_tool_choice_required_and_named_give_valid_calls(family_server):
    client = openai.OpenAI(base_url=family_server.url + "/v1", api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=120,
            parallel_tool_calls=False, reasoning_effort="none",
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message.content
        for call in choice.message.tool_calls:
            _check_call(call)
    named = {"type": "function", "function": {"name": "roll"}}
    chunks = client.chat.completions.create(
        model=MODEL, messages=ask, tools=TOOLS, tool_choice=named, temperature=0.7, seed=1, max_tokens=120, stream=True,
        reasoning_effort="none",
    )  # fmt: skip
    calls, reason = {}, None
    for c in chunks:
        for ch in c.choices:
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    assert reason == "tool_calls" and calls and all(c["name"] == "roll" for c in calls.values())
    for c in calls.values():
        assert 2 <= json.loads(c["arguments"])["sides"] <= 20


def test_auto_tool_choice_holds_opened_calls(family_server):
    """With "auto" the reply is free; a call it opens is held to the tools (no unparsed call text comes back)."""
    client = openai.OpenAI(base_url=family_server.url + "/v1", api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "Roll a die, or tell me a fortune."}]
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=80, reasoning_effort="none"
        )
        choice = r.choices[0]
        for call in choice.message.tool_calls or []:
            _check_call(call)
        if choice.finish_reason == "stop":
            assert "<|tool_call>" not in (choice.message.content or "")
