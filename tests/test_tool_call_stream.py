"""Tool calls stream their arguments as the model writes them: the reply parser's call pieces (CallDelta) and the
OpenAI chat, Anthropic Messages and Responses streams, checked with the official clients' own accumulators.

The invariant everywhere: a call's argument pieces concatenate to exactly the final arguments string (the one
the non-streamed answer carries), and a call longer than a few tokens arrives in more than one piece."""

from __future__ import annotations

import json
import random

import anthropic
import openai
import pytest
from serving import LiveServer, ScriptedEngine, with_template
from test_server_tools import TEMPLATES, TOOLS

from hearthlm import LLM
from hearthlm.chat_formats import FORMATS, ReplyParser, parse_reply
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics

MODEL = "hearth-demo"
ARGS = {"city": "Paris, FR", "days": 2, "note": 'a "quoted" word, a\\backslash, é and 🌍', "tags": ["x", 1.5, None]}
LONG = {"city": "Saint-Rémy-de-Provence, France", "days": 14, "units": "metric", "hourly": True}


def gemma_value(v) -> str:
    """`v` as Gemma 4 writes an argument value."""
    if isinstance(v, str):
        return f'<|"|>{v}<|"|>'
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{gemma_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(gemma_value(x) for x in v) + "]"
    return json.dumps(v)


def written(family: str, name: str, args: dict, compact: bool = False, ascii: bool = False) -> str:
    """The reply in which a model of `family` calls name(args); `ascii`: JSON's \\u escapes for the rest."""
    sep = (",", ":") if compact else (", ", ": ")
    if family == "gemma4":
        return f"<|tool_call>call:{name}{gemma_value(args)}<tool_call|>"
    key = "parameters" if family == "llama3" else "arguments"
    obj = json.dumps({"name": name, key: args}, separators=sep, ensure_ascii=ascii)
    if family == "qwen3":
        return f"<think>\nLet me look.\n</think>\n\n<tool_call>\n{obj}\n</tool_call>"
    return f"[TOOL_CALLS][{obj}]" if family == "mistral" else obj


def streamed(family: str, text: str, sizes=(1,)) -> tuple[dict, list]:
    """Feed `text` in pieces of the given sizes (cycled); (index -> the call's pieces, all Deltas' tool_calls)."""
    p, pieces, calls, i, k = ReplyParser(FORMATS[family], tools=True), {}, [], 0, 0
    deltas = []
    while i < len(text):
        n = sizes[k % len(sizes)]
        deltas.append(p.feed(text[i : i + n]))
        i, k = i + n, k + 1
    deltas.append(p.finish())
    for d in deltas:
        calls += d.tool_calls
        for c in d.calls:
            pieces.setdefault(c.index, []).append(c)
    return pieces, calls


def check_pieces(pieces: dict, calls: list, to_the_end: bool = False) -> None:
    """Each call's pieces: named first, done last, concatenating to its arguments; `to_the_end`: the call's text
    was fed character by character in the trained syntax, so all of it went out before the call's end."""
    assert sorted(pieces) == list(range(len(calls)))
    for i, call in enumerate(calls):
        first, last = pieces[i][0], pieces[i][-1]
        assert (first.id, first.name) == (call.id, call.name) and all(c.name is None for c in pieces[i][1:])
        assert last.done and last.call is call and not any(c.done for c in pieces[i][:-1])
        assert "".join(c.arguments for c in pieces[i]) == call.arguments_json
        assert last.arguments == "" or not to_the_end


@pytest.mark.parametrize("family", ["gemma4", "qwen3", "llama3", "mistral"])
@pytest.mark.parametrize("compact", [False, True])
def test_pieces_concatenate_to_the_final_arguments(family, compact):
    text = written(family, "get_weather", ARGS, compact)
    whole = parse_reply(FORMATS[family], text, tools=True)
    for sizes in [(1,), (2, 3), (5, 1, 7), (len(text),)]:
        pieces, calls = streamed(family, text, sizes)
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]
        check_pieces(pieces, calls, to_the_end=sizes == (1,))
        if sizes == (1,):
            assert len(pieces[0]) > 5  # streamed, not sent whole


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 2 else []))
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\té🌍\u2028{}[],:<>') for _ in range(rng.randrange(8)))
    if kind == "int":
        return rng.randrange(-1000, 1000)
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.0e21, 123.456])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(4))}


@pytest.mark.parametrize("family", ["gemma4", "qwen3", "llama3", "mistral"])
def test_random_arguments(family):
    rng = random.Random(7)
    for _ in range(60):
        args = {f"a{i}": random_value(rng) for i in range(rng.randrange(1, 4))}
        text = written(family, "f", args, compact=rng.random() < 0.5, ascii=rng.random() < 0.5)
        size = rng.randrange(1, 4)
        pieces, calls = streamed(family, text, (size,))
        assert [c.arguments for c in calls] == [args]
        check_pieces(pieces, calls, to_the_end=size == 1)


def test_drift_still_ends_in_the_parsed_arguments():
    texts = {
        "qwen3": '<tool_call>{"name": "f", "arguments": {"a": True, "b": [1, 2,], \'c\': None}}</tool_call>',
        "gemma4": '<|tool_call>call:f{q:weather in Paris,n:3,s:<|"|>x<|"|>}<tool_call|>',
        "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]',
        "llama3": '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": 2}}',
    }
    for family, text in texts.items():
        pieces, calls = streamed(family, text)
        whole = parse_reply(FORMATS[family], text, tools=True).tool_calls
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole] != []
        check_pieces(pieces, calls)


def test_a_repeated_call_is_not_streamed_twice():
    one = '<tool_call>{"name": "f", "arguments": {"a": 1, "b": "xyz"}}</tool_call>'
    pieces, calls = streamed("qwen3", one * 3)
    assert len(calls) == 1 and sorted(pieces) == [0]
    check_pieces(pieces, calls)
    two = one + '\n<tool_call>{"name": "f", "arguments": {"a": 1, "b": "xyw"}}</tool_call>'
    pieces, calls = streamed("qwen3", two)
    assert [c.arguments["b"] for c in calls] == ["xyz", "xyw"]
    check_pieces(pieces, calls)


def test_a_call_that_never_parses_ends_as_text():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, "b": oops}}</tool_call>'
    pieces, calls = streamed("qwen3", text)
    assert calls == [] and pieces[0][-1].done and pieces[0][-1].call is None
    p = ReplyParser(FORMATS["qwen3"], tools=True)
    out = p.feed(text)
    out.add(p.finish())
    assert out.content == text


# -- through the server, with the official clients -------------------------------------------------------
def script(family: str):
    def reply(prompt: str) -> str:
        if "get_weather" not in prompt:
            return "Hello there!"
        if "broken" in prompt:  # the arguments go wrong half way: the call ends unparsed, its text is the answer
            return BROKEN[family]
        if "two cities" in prompt:
            return written(family, "get_weather", LONG) + "\n" + written(family, "get_weather", ARGS)
        return written(family, "get_weather", LONG)

    return reply


@pytest.fixture(scope="module")
def demo():
    return LLM()


@pytest.fixture(scope="module", params=["gemma4", "qwen3"])
def server(request, demo):
    llm = demo
    if request.param == "qwen3":
        llm = with_template(demo, (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(), "qwen3", {"eos_token": "<eos>"})
    engine = ScriptedEngine(llm.tokenizer, script(request.param))
    live = LiveServer(create_app(ServedModel(llm, engine, MODEL, Metrics())))
    yield live
    live.stop()


ASK = [{"role": "user", "content": "What is the weather in Saint-Rémy?"}]
BROKEN = {
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Saint-Rémy-de-Provence<|"|>,days:[1,}<tool_call|>',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Saint-Rémy-de-Provence", "days": x}}\n</tool_call>',
}
TWO = [{"role": "user", "content": "The weather in two cities, please."}]


def test_openai_chat_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    whole = client.chat.completions.create(model=MODEL, messages=TWO, tools=TOOLS)
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    pieces: dict[int, int] = {}
    with client.chat.completions.stream(model=MODEL, messages=TWO, tools=TOOLS) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces[event.index] = pieces.get(event.index, 0) + 1
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == expected
    assert [json.loads(a) for _, a in expected] == [LONG, ARGS]
    assert all(c.id.startswith("call_") for c in choice.message.tool_calls)
    assert sorted(pieces) == [0, 1] and all(n > 1 for n in pieces.values())


def test_anthropic_stream(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    fn = TOOLS[0]["function"]
    tool = {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}
    whole = client.messages.create(model=MODEL, max_tokens=400, messages=ASK, tools=[tool])
    n = 0
    with client.messages.stream(model=MODEL, max_tokens=400, messages=ASK, tools=[tool]) as stream:
        for event in stream:
            n += event.type == "content_block_delta" and event.delta.type == "input_json_delta"
        final = stream.get_final_message()
    [use] = [b for b in final.content if b.type == "tool_use"]
    [expected] = [b for b in whole.content if b.type == "tool_use"]
    assert (use.name, use.input) == (expected.name, expected.input) and use.input == LONG
    assert use.id.startswith("toolu_") and final.stop_reason == "tool_use" and n > 1


def test_responses_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    tools = [{"type": "function", **TOOLS[0]["function"]}]
    whole = client.responses.create(model=MODEL, input=ASK, tools=tools)
    deltas = []
    with client.responses.stream(model=MODEL, input=ASK, tools=tools) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    [call] = [i for i in final.output if i.type == "function_call"]
    [expected] = [i for i in whole.output if i.type == "function_call"]
    assert (
        (call.name, call.arguments)
        == (expected.name, expected.arguments)
        == ("get_weather", json.dumps(LONG, ensure_ascii=False))
    )
    assert "".join(deltas) == call.arguments and len(deltas) > 1 and call.status == "completed"


def test_a_call_that_goes_wrong_ends_in_every_stream(server):
    """Its start was streamed; it ends (unparsed) and its text follows as the answer, in an order each SDK takes."""
    ask = [{"role": "user", "content": "A broken call, please."}]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    text = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS).choices[0].message.content
    assert "get_weather" in text
    with client.chat.completions.stream(model=MODEL, messages=ask, tools=TOOLS) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.message.content == text and final.finish_reason == "stop"
    fn = TOOLS[0]["function"]
    tool = {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    with claude.messages.stream(model=MODEL, max_tokens=400, messages=ask, tools=[tool]) as stream:
        message = stream.get_final_message()
    assert message.content[-1].type == "text" and message.content[-1].text == text
    assert message.stop_reason == "end_turn"
    tools = [{"type": "function", **fn}]
    with client.responses.stream(model=MODEL, input=ask, tools=tools) as stream:
        response = stream.get_final_response()
    assert response.output_text == text and response.output[0].status == "incomplete"
