"""Tool calls as models really write them, drifting from their trained syntax (Gemma 4's drift as reported in
Ollama's, llama.cpp's, vLLM's and sglang's trackers; the JSON families' usual slips): where a reader can tell
which call was meant it is returned, streamed or whole; where not, the text comes back, never an empty call.
A reply that ends inside a call it never finished says so (ReplyParser.unfinished_call) and keeps its text.

Every expected call below is the one a person reading the text would extract, written by hand."""

from __future__ import annotations

import random

import pytest

from hearthlm.chat_formats import FORMATS, ReplyParser

Q = '<|"|>'  # Gemma 4's string quote


def gemma(*bodies: str) -> str:
    return "".join(f"<|tool_call>{b}<tool_call|>" for b in bodies)


def qwen(*bodies: str) -> str:
    return "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)


def run(family: str, text: str):
    """(content, [(name, arguments)], unfinished_call), the same whole and streamed in pieces of every size."""
    results = set()
    for pieces in (0, 1, 3, 8, len(text) - 1):  # 0: the whole reply in one feed; len - 1: one character each
        for seed in range(2 if 0 < pieces < len(text) - 1 else 1):
            rng = random.Random(seed)
            cuts = sorted(rng.sample(range(1, len(text)), min(pieces, len(text) - 1)))
            parser = ReplyParser(FORMATS[family], tools=True)
            content, calls = "", []
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                d = parser.feed(text[a:b])
                content, calls = content + d.content, calls + d.tool_calls
            d = parser.finish()
            content, calls = content + d.content, calls + d.tool_calls
            assert all(c.name for c in calls), "never a call without a name"
            results.add((content, repr([(c.name, c.arguments) for c in calls]), parser.unfinished_call))
    assert len(results) == 1, results  # every chunking gives the same result
    content, calls, unfinished = results.pop()
    return content, eval(calls), unfinished


# -- Gemma 4: calls a reader can extract ---------------------------------------------------------------
GEMMA_DRIFT = {
    "key=value": (
        gemma(f"call:get_weather{{city={Q}Paris{Q},days=2}}"),
        [("get_weather", {"city": "Paris", "days": 2})],
    ),
    "unquoted word": (
        gemma("call:get_weather{city:Paris,unit:celsius}"),
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
    "unquoted text with spaces": (
        gemma("call:web_search{query:weather in Paris today,limit:5}"),
        [("web_search", {"query": "weather in Paris today", "limit": 5})],
    ),
    "unquoted text that starts like a number or literal": (
        gemma("call:route{to:3rd Street,mode:true north}"),
        [("route", {"to": "3rd Street", "mode": "true north"})],
    ),
    "JSON-style double quotes": (
        gemma('call:get_weather{"city": "Paris, FR", "days": 2, "note": "say \\"hi\\""}'),
        [("get_weather", {"city": "Paris, FR", "days": 2, "note": 'say "hi"'})],
    ),
    "single quotes": (
        gemma("call:create_file{filename:'out.pdf',content:'a, b: {c}'}"),
        [("create_file", {"filename": "out.pdf", "content": "a, b: {c}"})],
    ),
    "missing final brace before the end marker": (
        gemma(f"call:get_weather{{city:{Q}Paris{Q},days:2"),
        [("get_weather", {"city": "Paris", "days": 2})],
    ),
    "missing final brace after an unquoted value": (
        gemma("call:get_weather{city:Paris"),
        [("get_weather", {"city": "Paris"})],
    ),
    "missing opening quote, closing one written": (
        gemma(f"call:web_search{{query:weather in Tokyo{Q},limit:3}}"),
        [("web_search", {"query": "weather in Tokyo", "limit": 3})],
    ),
    "parentheses instead of braces": (
        gemma(f"call:terminal(command={Q}ls -a{Q}, cwd=/tmp)"),
        [("terminal", {"command": "ls -a", "cwd": "/tmp"})],
    ),
    "two calls back to back in one marker pair": (
        gemma(f"call:get_weather{{city:{Q}Paris{Q}}}call:get_time{{zone:{Q}CET{Q}}}"),
        [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
    ),
    "two calls in one marker pair, a newline between": (
        gemma("call:a{x:1}\ncall:b{}"),
        [("a", {"x": 1}), ("b", {})],
    ),
    "two consecutive marked calls": (
        gemma(f"call:get_weather{{city:{Q}Paris{Q}}}", f"call:get_weather{{city:{Q}Bern{Q}}}"),
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Bern"})],
    ),
    "two calls in one marker pair, the second's brace missing": (
        gemma("call:a{x:1}call:b{y:2"),
        [("a", {"x": 1}), ("b", {"y": 2})],
    ),
    "the same call looping, in consecutive marker pairs": (
        gemma(*[f"call:read_file{{path:{Q}a.txt{Q}}}"] * 6),
        [("read_file", {"path": "a.txt"})],
    ),
    "the same call looping, inside one marker pair": (
        gemma(f"call:read_file{{path:{Q}a.txt{Q}}}" * 4),
        [("read_file", {"path": "a.txt"})],
    ),
    "the same call looping, then another": (
        gemma("call:a{x:1}", "call:a{x:1}", "call:a{x:1}", "call:b{}"),
        [("a", {"x": 1}), ("b", {})],
    ),
}


@pytest.mark.parametrize("case", sorted(GEMMA_DRIFT))
def test_gemma4_drift_gives_the_call(case):
    text, expected = GEMMA_DRIFT[case]
    assert run("gemma4", text) == ("", expected, False)


def test_gemma4_identical_calls_with_text_between_are_two_calls():
    text = f"First Paris. {gemma('call:get_weather{city:Paris}')}Once more. {gemma('call:get_weather{city:Paris}')}"
    assert run("gemma4", text) == (
        "First Paris. Once more. ",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Paris"})],
        False,
    )


# -- Gemma 4: text that is not a call a reader could extract: returned as text ------------------------
GEMMA_TEXT = {
    "empty name": gemma("call:{city:Paris}"),
    "empty body": gemma(""),
    "only a name": gemma("call:get_weather"),
    "no call: prefix": gemma("get_weather"),
    "a comma in an unquoted value": gemma("call:get_weather{city:Paris, FR}"),  # "Paris, FR" or a key FR?
    "a dangling comma where the brace is missing": gemma("call:f{a:1,"),
    "a nested object left open": gemma("call:f{a:{b:1"),
    "an open string": gemma(f"call:f{{a:{Q}open}}"),
    "text after the arguments": gemma("call:f{a:1} and then some"),
}


@pytest.mark.parametrize("case", sorted(GEMMA_TEXT))
def test_gemma4_unreadable_call_is_text(case):
    text = GEMMA_TEXT[case]
    assert run("gemma4", text) == (text, [], False)


# -- A reply that ends inside a call (max_tokens): unfinished_call, and the text kept -------------------
CUT = {
    "gemma4": [
        f"<|tool_call>call:get_weather{{city:{Q}Par",
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:2",  # no brace recovery without the end marker
        "<|tool_call>",
        "<|tool_call>call:get_we",
    ],
    "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '<tool_call>\n{"name": "get_wea'],
    "llama3": ['{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"a": {'],
    "mistral": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par', "[TOOL_CALLS]"],
}


@pytest.mark.parametrize("family,text", [(f, t) for f in sorted(CUT) for t in CUT[f]])
def test_reply_cut_inside_a_call_says_so(family, text):
    if family != "llama3":  # a Llama 3 call is the whole reply; the others may follow some text
        text = "Let me look. " + text
    assert run(family, text) == (text, [], True)


def test_reply_cut_after_a_complete_call_is_not_unfinished():
    # The model ended the reply where the end marker belongs: the call is whole, the intent clear.
    assert run("gemma4", "<|tool_call>call:f{a:1}") == ("", [("f", {"a": 1})], False)
    assert run("qwen", '<tool_call>\n{"name": "f", "arguments": {}}') == ("", [("f", {})], False)
    # A call that is complete, then a second one cut: the first is returned, the second is text.
    text = gemma("call:f{a:1}") + "<|tool_call>call:g{b:"
    assert run("gemma4", text) == ("<|tool_call>call:g{b:", [("f", {"a": 1})], True)


def test_finished_replies_are_not_unfinished():
    assert run("gemma4", "Just an answer.") == ("Just an answer.", [], False)
    assert run("llama3", "{this is prose in braces}") == ("{this is prose in braces}", [], False)
    assert run("qwen", qwen("{not json}")) == (qwen("{not json}"), [], False)


# -- JSON families: Qwen, Llama 3, Mistral --------------------------------------------------------------
JSON_DRIFT = {  # a call written with each drift (Qwen's and Mistral's key names), and the call it means
    "trailing commas": (
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2,],},}',
        ("get_weather", {"city": "Paris", "days": [1, 2]}),
    ),
    "single-quoted strings": (
        """{'name': 'get_weather', 'arguments': {'city': "Paris, FR", 'note': 'say "hi", it\\'s fine'}}""",
        ("get_weather", {"city": "Paris, FR", "note": 'say "hi", it\'s fine'}),
    ),
    "Python literals": (
        '{"name": "set_alarm", "arguments": {"on": True, "repeat": False, "label": None}}',
        ("set_alarm", {"on": True, "repeat": False, "label": None}),
    ),
    "drift look-alikes inside strings are left alone": (
        """{'name': 'say', 'arguments': {'text': "True, None,}"}}""",
        ("say", {"text": "True, None,}"}),
    ),
    "arguments as a JSON string": (
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        ("get_weather", {"city": "Paris"}),
    ),
    "arguments null": ('{"name": "get_time", "arguments": None}', ("get_time", {})),
    "missing final brace": (
        '{"name": "get_weather", "arguments": {"city": "Paris", "where": {"lat": 48.9}}',
        ("get_weather", {"city": "Paris", "where": {"lat": 48.9}}),
    ),
}


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
@pytest.mark.parametrize("case", sorted(JSON_DRIFT))
def test_json_drift_gives_the_call(family, case):
    call, expected = JSON_DRIFT[case]
    if family == "qwen":
        text = qwen(call)
    elif family == "llama3":
        text = call.replace('"arguments"', '"parameters"').replace("'arguments'", "'parameters'")
    elif case == "missing final brace":
        text = f"[TOOL_CALLS][{call}"  # the call's brace and the list's bracket both left out
    else:
        text = f"[TOOL_CALLS][{call}]"
    assert run(family, text) == ("", [expected], False)


def test_mistral_list_drift():
    two = '{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}'
    assert run("mistral", f"[TOOL_CALLS][{two}") == ("", [("a", {}), ("b", {"x": 1})], False)  # no ']'
    assert run("mistral", f"[TOOL_CALLS][{two},]") == ("", [("a", {}), ("b", {"x": 1})], False)


def test_json_loops_give_the_call_once():
    call = '{"name": "read_file", "arguments": {"path": "a.txt"}}'
    assert run("qwen", qwen(call, call, call, call)) == ("", [("read_file", {"path": "a.txt"})], False)
    other = '{"name": "read_file", "arguments": {"path": "b.txt"}}'
    assert run("mistral", f"[TOOL_CALLS][{call}, {call}, {call}, {other}]") == (
        "",
        [("read_file", {"path": "a.txt"}), ("read_file", {"path": "b.txt"})],
        False,
    )


JSON_TEXT = {  # bodies no reader can turn into one definite call
    "empty name": '{"name": "", "arguments": {}}',
    "no name": '{"arguments": {"city": "Paris"}}',
    "name not a string": '{"name": null, "arguments": {}}',
    "arguments not an object": '{"name": "f", "arguments": [1, 2]}',
    "arguments left open": '{"name": "f", "arguments": {"a": 1, "b": {"c": 2}',  # more keys could have followed
    "ends after a comma": '{"name": "f", "arguments": {"a": 1},',
    "prose in braces": "{this is prose in braces}",
    "unbalanced": '{"name": "f", "arguments": {"a": 1]}',
}


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
@pytest.mark.parametrize("case", sorted(JSON_TEXT))
def test_unreadable_json_call_is_text(family, case):
    body = JSON_TEXT[case]
    text = {"qwen": qwen(body), "llama3": body, "mistral": f"[TOOL_CALLS][{body}]"}[family]
    content, calls, _ = run(family, text)
    assert (content, calls) == (text, [])


def test_apostrophes_in_prose_are_not_strings():
    # A Llama 3 reply in braces with an apostrophe is prose, not a call cut inside a single-quoted string.
    assert run("llama3", "{I don't know}") == ("{I don't know}", [], False)
