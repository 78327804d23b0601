"""Reply parsers (hearthlm.chat_formats) on the text the real chat templates render: tool calls and
reasoning written by each template are read back, whole and streamed in pieces of every size."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from serving import TOOLS
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from hearthlm.chat_formats import FORMATS, ReplyParser, detect, parse_reply
from hearthlm.chat_formats.calls import CallSyntaxError, parse_gemma4_call
from hearthlm.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = {
    "gemma4-e2b-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "gemma4-31b-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "Qwen-Qwen2.5-7B-Instruct": {"eos_token": "<|im_end|>"},
    "Qwen-Qwen3-0.6B": {"eos_token": "<|im_end|>"},
    "llama3-format": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistralai-Mistral-Nemo-Instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
}
EXPECTED = {
    "gemma4-e2b-it": "gemma4",
    "gemma4-31b-it": "gemma4",
    "Qwen-Qwen2.5-7B-Instruct": "qwen",
    "Qwen-Qwen3-0.6B": "qwen3",
    "llama3-format": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
}
END = ("<turn|>", "<|tool_response>", "<|im_end|>", "<|eot_id|>", "</s>")
ARGS = {"city": "Zürich, {CH}", "days": 3, "hourly": True, "tags": ["a", "b"], "where": {"lat": 47.4, "x": None}}


def template_tokenizer(name: str) -> Tokenizer:
    text = (TEMPLATES / f"{name}.jinja").read_text()
    backend = HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Tokenizer.from_parts(backend, SPECIALS[name], {"default": (text, name)}, name)


def rendered_reply(tok: Tokenizer, assistant: dict) -> str:
    """What the template writes for `assistant` after the generation prompt, up to its end-of-turn marker."""
    user = [{"role": "user", "content": "Weather in Zürich?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tools=TOOLS)
    full = tok.apply_chat_template([*user, assistant], add_generation_prompt=False, tools=TOOLS)
    if not full.startswith(prompt):  # gemma4-31b's prompt closes an empty thinking block, its history does not
        prompt = prompt.removesuffix("<|channel>thought\n<channel|>")
    assert full.startswith(prompt), (prompt, full)
    reply = full[len(prompt) :]
    cut = min((i for e in END if (i := reply.find(e)) >= 0), default=len(reply))
    return reply[:cut]


def streamed(fmt, text: str, tools: bool, pieces: int, seed: int = 0, in_reasoning: bool = False):
    """parse `text` fed in random pieces; returns (content, reasoning, calls)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces, len(text) - 1))) if len(text) > 1 else []
    parser = ReplyParser(fmt, tools=tools, in_reasoning=in_reasoning)
    content, reasoning, calls = "", "", []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        d = parser.feed(text[a:b])
        content, reasoning, calls = content + d.content, reasoning + d.reasoning, calls + d.tool_calls
    d = parser.finish()
    return content + d.content, reasoning + d.reasoning, calls + d.tool_calls


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_format_is_detected_from_the_template(name):
    assert detect((TEMPLATES / f"{name}.jinja").read_text()).name == EXPECTED[name]
    assert detect("{{ messages }}").name == "plain" and detect(None).name == "plain"


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_tool_call_written_by_the_template_is_read_back(name):
    tok = template_tokenizer(name)
    fmt = detect((TEMPLATES / f"{name}.jinja").read_text())
    call = {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
    reply = rendered_reply(tok, {"role": "assistant", "content": "", "tool_calls": [call]})
    whole = parse_reply(fmt, reply, tools=True)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", ARGS)], reply
    assert whole.content == "" and whole.reasoning == ""
    for pieces in (1, 3, len(reply)):  # every chunking gives the same result
        content, reasoning, calls = streamed(fmt, reply, True, pieces)
        assert (content, reasoning, [(c.name, c.arguments) for c in calls]) == ("", "", [("get_weather", ARGS)])
    if fmt.name == "mistral":
        assert len(whole.tool_calls[0].id) == 9  # Mistral's template accepts only such ids back
    # Tools off: the markup is just text.
    assert parse_reply(fmt, reply, tools=False).tool_calls == []


@pytest.mark.parametrize("name", ["gemma4-e2b-it", "gemma4-31b-it", "Qwen-Qwen3-0.6B"])
def test_reasoning_written_by_the_template_is_split_from_the_answer(name):
    tok = template_tokenizer(name)
    fmt = detect((TEMPLATES / f"{name}.jinja").read_text())
    msg = {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "Look it up <b>first</b>."}
    reply = rendered_reply(tok, msg)
    if fmt.name == "gemma4" and "<|channel>" not in reply:  # e2b: the template drops reasoning of the last turn
        reply = "<|channel>thought\nLook it up <b>first</b>.\n<channel|>" + reply
    for pieces in (0, 2, 7, len(reply)):
        content, reasoning, calls = streamed(fmt, reply, True, pieces, seed=pieces)
        assert (content, reasoning, calls) == ("It is 21 degrees.", "Look it up <b>first</b>.", []), reply


def test_gemma4_prompt_that_opens_the_thinking_block():
    fmt = FORMATS["gemma4"]
    assert fmt.opens_reasoning("<|turn>model\n<|channel>thought\n")
    assert not fmt.opens_reasoning("<|turn>model\n<|channel>thought\n<channel|>")  # 31b, thinking off
    content, reasoning, _ = streamed(fmt, "plan\n<channel|>answer", False, 4, in_reasoning=True)
    assert (content, reasoning) == ("answer", "plan")


def test_qwen3_thinking_and_calls_together():
    reply = '<think>\nneed weather\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Basel\\"}"}\n</tool_call>'
    for pieces in (0, 5, len(reply)):
        content, reasoning, calls = streamed(FORMATS["qwen3"], reply, True, pieces)
        assert reasoning == "need weather" and content == "Let me check.\n"
        assert [c.arguments["city"] for c in calls] == ["Bern", "Basel"]
        assert len({c.id for c in calls}) == 2


def test_partial_markers_are_held_back_until_decided():
    p = ReplyParser(FORMATS["gemma4"], tools=True)
    assert p.feed("Hello <|tool").content == "Hello "  # could be the start of <|tool_call>
    assert p.feed("box> ok").content == "<|toolbox> ok"  # it was not
    assert p.feed("<|cha").content == ""
    d = p.feed("nnel>thought\nhmm")
    assert d.reasoning == "hmm" and d.content == ""
    assert p.finish().reasoning == ""


def test_broken_call_is_returned_as_text():
    text = '<|tool_call>call:get_weather{city:<|"|>Bern}<tool_call|>'
    d = parse_reply(FORMATS["gemma4"], text, tools=True)
    assert d.tool_calls == [] and d.content == text
    d = parse_reply(FORMATS["qwen"], "<tool_call>\n{not json\n</tool_call>", tools=True)
    assert d.tool_calls == [] and "{not json" in d.content
    d = parse_reply(FORMATS["llama3"], "{this is prose in braces}", tools=True)
    assert d.tool_calls == [] and d.content == "{this is prose in braces}"
    d = parse_reply(FORMATS["llama3"], 'Sure: {"a": 1}', tools=True)  # JSON not at the start: an answer
    assert d.content == 'Sure: {"a": 1}'


def test_gemma4_argument_syntax():
    call = parse_gemma4_call(
        'call:f{s:<|"|>a, b: {c}<|"|>,n:-3,x:2.5e3,ok:false,none:null,xs:[1,<|"|>two<|"|>,[]],o:{<|"|>k k<|"|>:{}},e:CELSIUS}'
    )[0]
    assert call.name == "f"
    assert call.arguments == {
        "s": "a, b: {c}", "n": -3, "x": 2500.0, "ok": False, "none": None, "xs": [1, "two", []], "o": {"k k": {}},
        "e": "CELSIUS",
    }  # fmt: skip
    assert parse_gemma4_call("call:noargs{}")[0].arguments == {}
    for bad in ("f{a:1}", "call:f{a:1", "call:f{a:1} trailing", 'call:f{a:<|"|>open}'):
        with pytest.raises(CallSyntaxError):
            parse_gemma4_call(bad)


def test_llama3_several_calls_and_python_tag():
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    content, _, calls = streamed(FORMATS["llama3"], text, True, 6)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {})]
    content, _, calls = streamed(FORMATS["llama3"], "  plain answer", True, 3)
    assert content == "  plain answer" and calls == []
