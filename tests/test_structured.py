"""Constrained decoding (engine/guided.py) on the demo model: every constrained reply parses and validates, over
seeds and temperatures; regex, choice and grammars; a constrained and a free request in one batch; the grammar
engine over every kind of tokenizer we load; bad constraints as clear errors."""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from hearthlm import LLM, SamplingParams, load_tokenizer
from hearthlm.engine.guided import Guide, GuideError, Guides

PROMPTS = ["Read me Genesis 1.", "Tell me a fortune.", "def main():", "The LORD said"]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "role": {"enum": ["prophet", "king", "scribe"]},
            "home": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25},
                },
                "required": ["city", "lat"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "role", "home", "tags"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "answer": {
                "anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}, {"const": "n/a"}]
            },
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["answer", "note"],
        "additionalProperties": False,
    },
    "formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.125},
        },
        "required": ["day", "id", "score"],
        "additionalProperties": False,
    },
    "list": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
}


@pytest.fixture(scope="module")
def llm():
    return LLM()


def validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_json_schema_replies_parse_and_validate(llm, name, temperature):
    schema = SCHEMAS[name]
    for seed in range(3):
        params = SamplingParams(max_tokens=160, temperature=temperature, top_p=0.95, seed=seed, json_schema=schema)
        for out in llm.generate(PROMPTS, params):
            assert out.finish_reason == "stop", (out.finish_reason, out.text)
            validate(out.text, schema)


def test_json_object_and_schema_as_text(llm):
    for seed in range(4):
        out = llm.generate(PROMPTS[seed], SamplingParams(max_tokens=200, temperature=1.0, seed=seed, json_schema=True))
        if out[0].finish_reason == "stop":  # an open-ended object may run past max_tokens; a finished one parses
            assert isinstance(json.loads(out[0].text), dict)
        else:
            assert out[0].finish_reason == "length" and out[0].text.startswith("{")
    text = json.dumps(SCHEMAS["list"])
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0.9, seed=1, json_schema=text))[0]
    validate(out.text, SCHEMAS["list"])


def test_regex_choice_and_grammars_match(llm):
    cases = [
        (
            dict(regex=r"[A-Z][a-z]{2,6} [0-9]{1,3}:[0-9]{1,3}"),
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{1,3}:[0-9]{1,3}", t),
        ),
        (dict(choice=["yes", "no", "maybe later"]), lambda t: t in {"yes", "no", "maybe later"}),
        (dict(grammar='root ::= "A" [0-9]{2,4} ("!" | "?")'), lambda t: re.fullmatch(r"A[0-9]{2,4}[!?]", t)),  # GBNF
        (
            dict(grammar='start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'),
            lambda t: re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", t),
        ),  # Lark
    ]
    for constraint, ok in cases:
        for seed in range(3):
            params = SamplingParams(max_tokens=40, temperature=1.0, seed=seed, **constraint)
            for out in llm.generate(PROMPTS, params):
                assert out.finish_reason == "stop" and ok(out.text), (constraint, out.text, out.finish_reason)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out


def test_constrained_and_free_requests_in_one_batch_match_each_alone(llm):
    engine = llm.engine()
    tok = llm.tokenizer
    free = SamplingParams(max_tokens=24, temperature=0)
    schema = SamplingParams(max_tokens=200, temperature=0, json_schema=SCHEMAS["any_of"])
    regex = SamplingParams(max_tokens=30, temperature=0.8, seed=5, regex=r"[a-z ]{5,20}\.")
    requests = {
        "free": (tok.encode(PROMPTS[0]), free),
        "schema": (tok.encode(PROMPTS[1]), schema),
        "regex": (tok.encode(PROMPTS[2]), regex),
        "free2": (tok.encode(PROMPTS[3]), free),
    }
    together = _run(engine, requests)
    alone = {rid: _run(engine, {rid: req})[rid] for rid, req in requests.items()}
    assert together == alone
    validate(tok.decode(together["schema"]), SCHEMAS["any_of"])
    assert together["free"] == llm.generate(PROMPTS[0], free)[0].token_ids  # the free rows are not masked


def test_bad_constraints_are_clear_errors(llm):
    cases = [
        (dict(regex="[a-"), "(?s)invalid regex.*unclosed character class"),
        (dict(json_schema={"type": "object", "properties": {"a": {"type": "strang"}}}), "JSON schema.*strang"),
        (dict(json_schema={"type": "object", "not": {"required": ["a"]}}), r'unsupported JSON schema.*keys: \["not"\]'),
        (dict(json_schema={"type": "string", "format": "hostname-xyz"}), "Unknown format: hostname-xyz"),
        (dict(grammar='root ::= "a" ('), "invalid grammar.*GBNF"),
        (dict(grammar="start: foo"), "invalid grammar.*foo"),
    ]
    for constraint, message in cases:
        with pytest.raises(GuideError, match=message):
            llm.generate("x", SamplingParams(max_tokens=4, **constraint))
    for bad, message in [
        (dict(regex="a", choice=["b"]), "at most one of json_schema, regex, choice and grammar"),
        (dict(choice=[]), "choice must be a non-empty list of strings"),
        (dict(json_schema="{not json"), "json_schema is a string but not JSON"),
        (dict(json_schema=3), "json_schema must be a JSON schema"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
    assert llm.engine().stats().running == 0  # nothing was queued


def test_a_grammar_with_no_token_left_ends_the_reply(llm, monkeypatch):
    """When the grammar allows no token at all (it needs text the vocabulary cannot write), the engine ends the
    reply with finish_reason "grammar" rather than sampling from nothing or waiting: it never hangs."""
    monkeypatch.setattr(Guide, "restrict", lambda self, logits: None)
    out = llm.generate("x", SamplingParams(max_tokens=20, regex="a+"))[0]
    assert out.finish_reason == "grammar" and out.token_ids == []
    assert llm.engine().stats().running == 0


def test_compiled_grammars_are_cached_by_text(llm):
    guides = llm.engine()._guides()
    params = SamplingParams(json_schema=SCHEMAS["any_of"])
    first = guides.guide(params)
    assert guides.guide(SamplingParams(json_schema=dict(SCHEMAS["any_of"]))).matcher is not first.matcher
    assert len([k for k in guides._compiled if k[1] == json.dumps(SCHEMAS["any_of"])]) == 1


def test_thinking_model_reasons_freely_then_answers_in_the_schema(llm):
    """Gemma 4's reasoning markers: the thought channel may open first and hold any text; once it closes, the
    schema holds the answer. Then through LLM.chat with thinking on, which passes the markers itself."""
    tok, schema = llm.tokenizer, SCHEMAS["any_of"]
    guide = (
        llm.engine()._guides().guide(SamplingParams(json_schema=schema, reasoning=("<|channel>thought", "<channel|>")))
    )
    zeros = torch.zeros(llm.config.vocab_size)

    def allowed() -> set[int]:
        return set(torch.isfinite(guide.restrict(zeros)).nonzero().flatten().tolist())

    brace, word = tok.encode("{", add_special_tokens=False), tok.encode(" The", add_special_tokens=False)
    opening, closing = tok.token_id("<|channel>"), tok.token_id("<channel|>")
    assert {opening, brace[0]} <= allowed() and word[0] not in allowed()
    for t in [opening, *tok.encode("thought\nThe user asks ] not JSON {", add_special_tokens=False), closing]:
        assert t in allowed(), tok.token(t)
        assert guide.accept(t)
    assert brace[0] in allowed() and word[0] not in allowed() and opening not in allowed()
    for seed in range(4):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, json_schema=schema)
        out = llm.chat([{"role": "user", "content": "Is it so?"}], params, enable_thinking=True)
        text = tok.decode(out.token_ids, skip_special_tokens=False)
        answer = text.split("<channel|>", 1)[1] if text.startswith("<|channel>") else text
        assert out.finish_reason == "stop", text
        validate(answer.strip(), schema)


# -- the tokenizer bridge: every kind of vocabulary we load --------------------------------------------------
VOCABS = ["llama-spm", "gpt-2", "qwen2", "deepseek-llm", "gemma-4"]
DATA = Path(__file__).parent / "data" / "llama_cpp"


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


def _gguf_tokenizer(name: str, folder: Path):
    """llama.cpp's vocabulary-only GGUF file NAME (shipped in tests/data), read by hearthlm.load_tokenizer."""
    path = folder / f"{name}.gguf"
    if not path.exists():
        path.write_bytes(lzma.decompress((DATA / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    return load_tokenizer(path)


@pytest.mark.parametrize("name", VOCABS)
def test_grammars_run_on_gguf_rebuilt_tokenizers(name, vocab_dir):
    """Tokenizers rebuilt from GGUF metadata (SentencePiece-style, byte-level BPE, Gemma 4's) drive the grammar
    engine as tokenizer.json ones do: random logits, masked, always give text inside the constraint."""
    tok = _gguf_tokenizer(name, vocab_dir)
    vocab = tok.vocab_size
    guides = Guides(tok, vocab, tok.stop_token_ids())
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    gen = torch.Generator().manual_seed(0)
    for params, check in [
        (SamplingParams(json_schema=schema), lambda t: validate(t, schema)),
        (SamplingParams(regex=r"Zoë [0-9]{2} 東京"), lambda t: re.fullmatch(r"Zoë [0-9]{2} 東京", t) or pytest.fail(t)),
    ]:
        for _ in range(3):
            guide, ids = guides.guide(params), []
            for _ in range(200):
                logits = guide.restrict(torch.randn(vocab, generator=gen))
                token = int(torch.argmax(logits))
                if token in tok.stop_token_ids() and guide.matcher.is_accepting():
                    break
                assert guide.accept(token)
                ids.append(token)
                if guide.done:
                    break
            check(tok.decode(ids, skip_special_tokens=False))
