"""The routes that tools probe before they talk to a server: Ollama's /api/version, /api/show and /api/tags (read with
the official ollama client's own types), and llama-server's /tokenize and /detokenize (httpx). Expected values come
from the demo model's files and the clients' types, not from the server."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from importlib.metadata import version as installed_version
from pathlib import Path

import httpx
import ollama
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from hearthlm.server.catalog import ollama_architecture

MODEL = "hearth-demo"
DEMO = Path(__import__("hearthlm").__file__).parent / "demo" / MODEL
CONFIG = json.loads((DEMO / "config.json").read_text())


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url)


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


# -- /api/version --------------------------------------------------------------------------------
def test_version_passes_the_clients_gate(server):
    body = httpx.get(server.url + "/api/version").json()
    # VS Code Copilot's Ollama provider splits the version on dots, reads each part as an integer and refuses < 0.6.4
    parts = body["version"].split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)
    assert tuple(int(p) for p in parts) >= (0, 6, 4)
    assert body["hearthlm"] == installed_version("hearthlm")


# -- /api/show -----------------------------------------------------------------------------------
def test_show_parses_with_the_ollama_client(oll):
    show = oll.show(MODEL)  # ShowResponse: every field below is one of its fields
    # The demo's template is Gemma 4's: it writes tool calls (<|tool_call>) and a thinking channel (<|channel>).
    assert "<|tool_call>" in show.template and "<|channel>" in show.template and "<|turn>" in show.template
    assert show.capabilities == ["completion", "tools", "thinking"]
    # config.json: Gemma4ForCausalLM, which Ollama (llama.cpp's GGUF metadata) calls "gemma4".
    assert CONFIG["architectures"] == ["Gemma4ForCausalLM"]
    info = show.modelinfo
    assert info["general.architecture"] == "gemma4"
    assert info["general.basename"] == MODEL
    assert info["gemma4.context_length"] == CONFIG["max_position_embeddings"] == 2048
    assert isinstance(show.modified_at, datetime) and show.modified_at.tzinfo is not None
    assert show.details.family == "gemma4" and show.details.families == ["gemma4"]  # Ollama's name, not model_type
    assert show.details.format == "safetensors"
    # PARAMETER lines: the config's eos tokens (ids 1 and 6) and Gemma 4's end of turn end a reply.
    lines = show.parameters.splitlines()
    assert lines and all(re.fullmatch(r'stop +"[^"]+"', line) for line in lines)
    assert {'"<eos>"', '"<turn|>"'} <= {line.split(None, 1)[1] for line in lines}
    assert show.modelfile.startswith("FROM ")


def test_show_takes_the_legacy_name_and_refuses_others(server, oll):
    by_name = post(server, "/api/show", {"name": MODEL + ":latest"})
    assert by_name.status_code == 200
    assert by_name.json()["model_info"]["general.architecture"] == "gemma4"
    assert set(by_name.json()["capabilities"]) <= {
        "completion",
        "tools",
        "thinking",
        "vision",
        "audio",
        "embedding",
        "insert",
    }
    missing = post(server, "/api/show", {})
    assert missing.status_code == 400 and "model" in missing.json()["error"]
    with pytest.raises(ollama.ResponseError) as e:
        oll.show("llama3.2")
    assert e.value.status_code == 404


def test_ollama_architecture_names():
    # general.architecture values as llama.cpp writes them (Mistral and Mixtral convert as llama)
    assert ollama_architecture("LlamaForCausalLM") == "llama"
    assert ollama_architecture("MistralForCausalLM") == "llama"
    assert ollama_architecture("MixtralForCausalLM") == "llama"
    assert ollama_architecture("Qwen2ForCausalLM") == "qwen2"
    assert ollama_architecture("Qwen3MoeForCausalLM") == "qwen3moe"
    assert ollama_architecture("Gemma3ForConditionalGeneration") == "gemma3"
    assert ollama_architecture("Phi3ForCausalLM") == "phi3"


# -- /api/tags -----------------------------------------------------------------------------------
def test_tags_parses_with_the_ollama_client(server, oll, served):
    [m] = oll.list().models  # ListResponse
    assert m.model == MODEL + ":latest"  # tagged as Ollama lists names
    assert m.size == sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert re.fullmatch(r"[0-9a-f]{64}", m.digest)
    assert isinstance(m.modified_at, datetime)
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    d = m.details
    assert d.parent_model == "" and d.format == "safetensors"
    assert d.family == "gemma4" and list(d.families) == ["gemma4"]
    assert d.parameter_size == f"{params / 1e6:.1f}M"  # under a billion: millions, one decimal, as Ollama writes it
    # the weights as served: bfloat16 by default, "BF16" in Ollama's words
    assert d.quantization_level == {"torch.bfloat16": "BF16", "torch.float32": "F32"}[str(served.llm.dtype)]
    raw = httpx.get(server.url + "/api/tags").json()["models"][0]
    assert set(raw["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(raw)


# -- /tokenize and /detokenize -------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle():
    """The demo's tokenizer.json read by `tokenizers` itself."""
    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


TEXT = "Hello world, this is a test"


def test_tokenize(server, oracle):
    r = post(server, "/tokenize", {"content": TEXT})
    assert r.status_code == 200
    assert r.json() == {"tokens": oracle.encode(TEXT, add_special_tokens=False).ids}
    with_bos = post(server, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"]
    assert with_bos == [CONFIG["bos_token_id"]] + r.json()["tokens"]  # config.json: bos_token_id 2
    assert post(server, "/tokenize", {"content": ""}).json() == {"tokens": []}
    # a special token written in the text is that token, as llama-server reads it
    assert post(server, "/tokenize", {"content": "<bos>Hi"}).json()["tokens"][0] == CONFIG["bos_token_id"]


def test_tokenize_with_pieces(server, oracle):
    pieces = post(server, "/tokenize", {"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == oracle.encode(TEXT, add_special_tokens=False).ids
    assert all(set(p) == {"id", "piece"} and isinstance(p["piece"], str) for p in pieces)
    assert "".join(p["piece"] for p in pieces) == TEXT  # ASCII: each token's text, leading spaces kept
    # 媽 is E5 AA BD in UTF-8, 🤗 F0 9F A4 97: a piece that is part of a character comes as its bytes
    text = "Hi 媽 🤗"
    pieces = post(server, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == oracle.encode(text, add_special_tokens=False).ids
    raw = [p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces]
    assert b"".join(raw) == text.encode()
    assert any(isinstance(p["piece"], list) for p in pieces)  # the demo's byte-level BPE splits these characters
    for p in pieces:
        if isinstance(p["piece"], list):
            assert all(0 <= b < 256 for b in p["piece"]) and not _utf8(bytes(p["piece"]))


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_detokenize_round_trip(server):
    for text in (TEXT, "unicode 媽 and emoji 🤗", "  two spaces\nand a line"):
        ids = post(server, "/tokenize", {"content": text}).json()["tokens"]
        assert post(server, "/detokenize", {"tokens": ids}).json() == {"content": text}
    ids = post(server, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["content"] == "<bos>" + TEXT  # specials written out
    assert post(server, "/detokenize", {"tokens": []}).json() == {"content": ""}


def test_tokenizer_routes_check_the_model_name(server):
    for name in (MODEL, MODEL + ":latest"):
        assert post(server, "/tokenize", {"content": "hi", "model": name}).status_code == 200
        assert post(server, "/detokenize", {"tokens": [2], "model": name}).status_code == 200
    for path, body in (("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [2]})):
        r = post(server, path, {**body, "model": "llama3.2"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {"content": 5}, "content"),
        ("/tokenize", {"content": ["a", "b"]}, "content"),
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": "hi", "add_special": "yes"}, "add_special"),
        ("/tokenize", {"content": "hi", "with_pieces": 1}, "with_pieces"),
        ("/detokenize", {"tokens": "2 3"}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {"tokens": [2, 2.5]}, "tokens.1"),
        ("/detokenize", {"tokens": [True]}, "tokens.0"),
        ("/detokenize", {"tokens": [2, 4096]}, "tokens.1"),  # tokenizer.json: 4096 tokens, ids 0 to 4095
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/detokenize", {}, "tokens"),
    ],
)
def test_tokenizer_routes_refuse_bad_input(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400
    error = r.json()["error"]  # the OpenAI error shape
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_return_progress_reports_a_long_prefill(client, served):
    """llama-server's return_progress: chunks with no choices and `prompt_progress` while the prompt prefills
    (one per prefill chunk but the last), before the first token; none unless asked."""
    words = " ".join(f"w{i % 50}" for i in range(600))
    total = len(served.chat_prompt([{"role": "user", "content": words}], None).ids)
    chunk = served.engine.engine.prefill_chunk
    assert total > 2 * chunk  # the prompt takes three chunks or more

    def stream(**extra):
        return list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=2, stream=True, **extra))  # fmt: skip

    chunks = stream(extra_body={"return_progress": True})
    progress = [c.model_extra["prompt_progress"] for c in chunks if (c.model_extra or {}).get("prompt_progress")]
    assert [p["processed"] for p in progress] == list(range(chunk, total, chunk))
    assert all(p["total"] == total and p["cache"] == 0 and p["time_ms"] >= 0 for p in progress)
    first_text = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    last_progress = max(i for i, c in enumerate(chunks) if (c.model_extra or {}).get("prompt_progress"))
    assert last_progress < first_text
    assert not any((c.model_extra or {}).get("prompt_progress") for c in stream())
