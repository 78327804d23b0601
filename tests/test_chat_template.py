"""Chat templates: our rendering against transformers' apply_chat_template(..., tokenize=False) on the templates
the real models ship, and the errors a broken or missing template gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import VOCAB
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hearthlm import LLM, ChatTemplateError, SamplingParams, load_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

GEMMA = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
QWEN = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
# template file -> the special tokens of the real model's tokenizer_config.json
MODELS = {
    "gemma4-e2b-it": GEMMA,
    "gemma4-31b-it": GEMMA,
    "Qwen-Qwen2.5-7B-Instruct": QWEN,
    "Qwen-Qwen3-0.6B": QWEN,
    "llama3-format": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistralai-Mistral-Nemo-Instruct-2407": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web & return <b>snippets</b>.",
            "parameters": {
                "type": "object",
                "properties": {
                    "queries": {"type": "array", "items": {"type": "string"}, "description": "What to look for"},
                    "limit": {"type": "integer", "description": "At most this many", "nullable": True},
                },
                "required": ["queries"],
            },
        },
    },
]
CALL = {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
ASKED = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "How warm is it in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "The user wants the weather; call the tool.",
        "tool_calls": [CALL],
    },
    {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": '{"temperature": 21}'},
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello there! Ünïcödé & <tags> 你好 🙂"}],
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 3 + 3?  "},
    ],
    "tool_response": ASKED,
    "tool_answered": ASKED + [{"role": "assistant", "content": "It is 21 °C."}, {"role": "user", "content": "Thanks"}],
}


def tiny_backend(tokens: list[str]) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<unk>", *tokens]))}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(vocab))
    return tok


def reference(name: str) -> PreTrainedTokenizerFast:
    specials = MODELS[name]
    template = (TEMPLATES / f"{name}.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tiny_backend(list(specials.values())), chat_template=template, **specials
    )


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(transformers tokenizer, our tokenizer loaded from the folder transformers saved)."""
    hf = reference(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_tokenizer(folder)


def test_testdata_is_found():
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(MODELS)


def assert_renders_alike(hf, ours, messages, **kw):
    # Llama's template prints today's date: render ours on both sides of transformers' call.
    before = ours.apply_chat_template(messages, **kw)
    expected = hf.apply_chat_template(messages, tokenize=False, **kw)
    assert expected in (before, ours.apply_chat_template(messages, **kw))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_matches_transformers(pair, conversation):
    hf, ours = pair
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation.startswith("tool") else None
    for add_generation_prompt in (True, False):
        for extra in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            assert_renders_alike(hf, ours, messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)


def test_tool_declarations_without_a_call(pair):
    hf, ours = pair
    assert_renders_alike(hf, ours, CONVERSATIONS["single"], add_generation_prompt=True, tools=TOOLS)


def test_none_values_are_dropped_like_transformers(pair):
    # OpenAI clients send content=None next to tool_calls; transformers drops None-valued keys.
    hf, ours = pair
    messages = [{"role": "user", "content": "Weather?", "name": None}, {**ASKED[2], "content": None}, ASKED[3]]
    try:
        expected = hf.apply_chat_template(messages, tokenize=False, tools=TOOLS)
    except Exception:  # some templates need content; then ours must fail too, cleanly
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template(messages, add_generation_prompt=False, tools=TOOLS)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=False, tools=TOOLS) == expected


def test_gemma_thinking_switch(tmp_path):
    for name in ("gemma4-e2b-it", "gemma4-31b-it"):
        folder = write_folder(tmp_path / name, GEMMA, (TEMPLATES / f"{name}.jinja").read_text())
        ours = load_tokenizer(folder)
        messages = CONVERSATIONS["single"]
        on = ours.apply_chat_template(messages, enable_thinking=True)
        off = ours.apply_chat_template(messages)
        assert on.startswith("<bos><|turn>system\n<|think|>\n") and "<|think|>" not in off
        assert off.endswith("<|turn>model\n<|channel>thought\n<channel|>" if "31b" in name else "<|turn>model\n")


def write_folder(folder: Path, config: dict, template: str | None = None, tokens=("<bos>", "<eos>")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_backend(list(tokens)).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def test_template_and_special_tokens_from_tokenizer_config(tmp_path):
    # Older checkpoints: the template inside tokenizer_config.json, special tokens as AddedToken dicts.
    template = (TEMPLATES / "gemma4-e2b-it.jinja").read_text()
    config = {"bos_token": {"content": "<bos>", "special": True, "lstrip": False}, "eos_token": "<eos>"}
    ours = load_tokenizer(write_folder(tmp_path / "m", {**config, "chat_template": template}))
    hf = reference("gemma4-e2b-it")
    for messages in CONVERSATIONS.values():
        assert_renders_alike(hf, ours, messages, add_generation_prompt=True, tools=TOOLS)
    assert ours.bos_token == "<bos>" and ours.apply_chat_template(CONVERSATIONS["single"]).startswith("<bos><|turn>")


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path):
    config = {
        "chat_template": [
            {"name": "default", "template": "plain:{{ messages[0].content }}"},
            {"name": "tool_use", "template": "tools:{{ tools | length }}:{{ messages[0].content }}"},
        ]
    }
    ours = load_tokenizer(write_folder(tmp_path / "m", config))
    hf = PreTrainedTokenizerFast(tokenizer_object=tiny_backend([]), chat_template={
        t["name"]: t["template"] for t in config["chat_template"]
    })  # fmt: skip
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == "plain:hi" == hf.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages, tools=TOOLS) == "tools:2:hi"
    assert hf.apply_chat_template(messages, tools=TOOLS, tokenize=False) == "tools:2:hi"


def test_environment_features(tmp_path):
    template = (
        "{{ tools | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}|{{ dict(a=1) | tojson }}|"
        "{% generation %}{{ custom }}{% endgeneration %}|{{ eos_token }}{{ bos_token is defined }}"
    )
    ours = load_tokenizer(write_folder(tmp_path / "m", {"eos_token": "<eos>"}, template))
    hf = PreTrainedTokenizerFast(tokenizer_object=tiny_backend(["<eos>"]), chat_template=template, eos_token="<eos>")
    messages = [{"role": "user", "content": "<é> & ü"}, {"role": "assistant", "content": "x"}]
    kw = {"tools": [{"name": "f", "description": "ä<b>"}], "custom": "ok"}
    assert ours.apply_chat_template(messages, **kw) == hf.apply_chat_template(messages, tokenize=False, **kw)
    assert '"<é> & ü"' in ours.apply_chat_template(messages, **kw)


def test_template_is_compiled_once(tmp_path):
    ours = load_tokenizer(write_folder(tmp_path / "m", {}, "{{ messages | length }}"))
    ours.apply_chat_template([{"role": "user", "content": "a"}])
    compiled = ours._compile("default")
    assert ours.apply_chat_template([{"role": "user", "content": "a"}] * 3) == "3"
    assert ours._compile("default") is compiled


# -- errors ----------------------------------------------------------------------------------------
def test_raise_exception_message_surfaces(tmp_path):
    name = "mistralai-Mistral-Nemo-Instruct-2407"
    folder = write_folder(tmp_path / "m", MODELS[name], (TEMPLATES / f"{name}.jinja").read_text())
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError) as info:
        load_tokenizer(folder).apply_chat_template(messages)
    message = str(info.value)
    assert "conversation roles must alternate user/assistant" in message
    assert message.startswith(f"{folder / 'chat_template.jinja'}, line 18: the chat template refused")
    assert info.value.source == str(folder / "chat_template.jinja") and info.value.line == 18
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_gemma_refuses_string_tool_arguments(tmp_path):
    folder = write_folder(tmp_path / "m", GEMMA, (TEMPLATES / "gemma4-e2b-it.jinja").read_text())
    call = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(ChatTemplateError, match="must be a JSON object"):
        load_tokenizer(folder).apply_chat_template(messages)


def test_syntax_error_names_the_file_and_line(tmp_path):
    broken = "{{ bos_token }}\n{% for m in messages %}\n{{ m.content }\n{% endfor %}\n"
    folder = write_folder(tmp_path / "m", {}, broken)
    with pytest.raises(ChatTemplateError) as info:
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "a"}])
    assert str(info.value).startswith(f"{folder / 'chat_template.jinja'}, line 3: chat template syntax error")
    assert info.value.line == 3 and info.value.__suppress_context__

    folder = write_folder(tmp_path / "n", {"chat_template": broken})
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json \(chat_template\), line 3"):
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "a"}])


def test_render_error_names_the_line(tmp_path):
    template = "{% for m in messages %}\n{{ m.content }}\n{{ m.missing.deeper }}\n{% endfor %}"
    folder = write_folder(tmp_path / "m", {}, template)
    with pytest.raises(ChatTemplateError) as info:
        load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "a"}])
    message = str(info.value)
    assert info.value.line == 3 and "UndefinedError" in message and "chat_template.jinja, line 3" in message


def test_missing_template(tmp_path):
    folder = write_folder(tmp_path / "m", {"bos_token": "<bos>"})
    tok = load_tokenizer(folder)
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


# -- LLM.chat and end-of-turn stops on a tiny Gemma 4 -----------------------------------------------
TURN_END = 6


@pytest.fixture(scope="module")
def gemma_folder(checkpoint, tmp_path_factory):
    """A tiny random Gemma 4 with a Gemma-style word-level tokenizer: <bos> added by the post-processor,
    <turn|> a special token, and a generation_config.json that lists only <eos> (id 1)."""
    _, src = checkpoint("gemma4_plain")
    folder = tmp_path_factory.mktemp("gemma_chat") / "model"
    shutil.copytree(src, folder)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    words = specials + ["user", "model", "system"]
    vocab = {w: i for i, w in enumerate(words)} | {f"w{i}": i for i in range(len(words), VOCAB)}
    assert vocab["<turn|>"] == TURN_END
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(GEMMA))
    shutil.copy(TEMPLATES / "gemma4-e2b-it.jinja", folder / "chat_template.jinja")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 2}))
    return folder


def scripted(llm: LLM, ids: list[int]) -> None:
    """Make the model pick `ids` in turn (greedy): the forward pass runs, its logits are replaced."""
    script = iter(ids)

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = torch.full((h.shape[0], llm.config.vocab_size), -30.0)
        out[:, next(script)] = 30.0
        return out

    llm.model.logits = logits


def test_generation_stops_at_end_of_turn(gemma_folder):
    llm = LLM(gemma_folder, dtype="float32")
    assert llm.config.eos_token_ids == [1] and llm.stop_token_ids == {1, TURN_END}
    greedy = SamplingParams(max_tokens=6, temperature=0)
    scripted(llm, [20, 21, TURN_END, 22, 23, 24])
    [out] = llm.generate("w11 w12", greedy)
    assert (out.token_ids, out.finish_reason, out.text) == ([20, 21], "stop", "w20 w21")
    scripted(llm, [20, 21, TURN_END, 22, 23, 24])
    [out] = llm.generate("w11 w12", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert (out.token_ids, out.finish_reason) == ([20, 21, TURN_END, 22, 23], "length")


def test_chat_renders_encodes_once_and_stops(gemma_folder):
    llm = LLM(gemma_folder, dtype="float32")
    messages = [{"role": "system", "content": "w30"}, {"role": "user", "content": "w31 w32"}]
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<bos><|turn>system\nw30<turn|>\n<|turn>user\nw31 w32<turn|>\n<|turn>model\n"
    ids = llm.tokenizer.encode_chat(text)
    assert ids[0] == 2 and ids.count(2) == 1  # the template's <bos>; the post-processor's is not added again
    assert llm.tokenizer.encode(text) == [2, *ids]  # (what plain encoding would have done)
    streamed = []
    scripted(llm, [40, 41, TURN_END, 42])
    out = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0), on_token=lambda i, t: streamed.append(t))
    assert (out.token_ids, out.finish_reason, out.text) == ([40, 41], "stop", "w40 w41")
    assert streamed == [40, 41] and out.usage.prompt_tokens == len(ids)


def test_chat_passes_tools_and_template_keywords(gemma_folder):
    llm = LLM(gemma_folder, dtype="float32")
    seen = {}
    generate = llm.generate

    def spy(prompts, params=None, on_token=None):
        seen["ids"] = prompts[0]
        return generate(prompts, params, on_token)

    llm.generate = spy
    scripted(llm, [TURN_END])
    messages = [{"role": "user", "content": "w31"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0), tools=TOOLS, enable_thinking=True)
    assert out.token_ids == [] and out.finish_reason == "stop"
    text = llm.tokenizer.apply_chat_template(messages, tools=TOOLS, enable_thinking=True)
    assert "<|think|>" in text and "declaration:get_weather" in text
    assert seen["ids"] == llm.tokenizer.encode_chat(text)


def test_chat_without_a_tokenizer_or_template(gemma_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(gemma_folder, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        LLM(bare).chat([{"role": "user", "content": "w31"}])
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        LLM(bare).chat([{"role": "user", "content": "w31"}])
