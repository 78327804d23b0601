"""Embeddings over HTTP: /v1/embeddings with the openai client (float and base64, dimensions, token inputs),
/api/embed and /api/embeddings with the ollama client, LangChain's embedding classes, one batched forward per
request, and a dedicated embedding model that refuses to generate."""

from __future__ import annotations

import json
import shutil

import httpx
import ollama
import openai
import pytest
import torch
import transformers as tf
from serving import LiveServer

from hearthlm import store
from hearthlm.server import load
from hearthlm.server.app import create_app

TEXTS = ["the fortune teller smiled", "a", "rain tomorrow, then sun on the hills"]


def _close(got, want) -> bool:
    return torch.allclose(
        torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32), atol=1e-5
    )


def test_openai_embeddings(server, client, served):
    want = served.llm.embed(TEXTS)
    r = client.embeddings.create(model="hearth-demo", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "hearth-demo"
    assert all(_close(d.embedding, w) for d, w in zip(r.data, want))
    assert r.usage.prompt_tokens == sum(len(x) for x in served.llm.embed_inputs(TEXTS)) == r.usage.total_tokens
    floats = client.embeddings.create(model="hearth-demo", input=TEXTS[0], encoding_format="float")
    assert len(floats.data) == 1 and _close(floats.data[0].embedding, want[0])
    assert len(want[0]) == served.llm.embedding_dims
    ids = served.llm.embed_inputs(TEXTS[2])[0]
    tokens = client.embeddings.create(model="hearth-demo", input=[ids], encoding_format="float")
    assert _close(tokens.data[0].embedding, want[2])
    short = client.embeddings.create(model="hearth-demo", input=TEXTS[2], dimensions=8, encoding_format="float")
    v = torch.tensor(short.data[0].embedding)
    assert v.shape == (8,) and abs(v.norm().item() - 1) < 1e-5
    assert _close(v, torch.nn.functional.normalize(torch.tensor(want[2][:8]), dim=0))


def test_openai_embedding_errors(server, client):
    c = client.with_options(max_retries=0)
    for bad in ({"input": []}, {"input": "x", "dimensions": 100_000}, {"input": "word " * 3000}):
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model="hearth-demo", encoding_format="float", **bad)
        assert e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="nope", input="x")
    assert c.embeddings.create(model="hearth-demo", input="still serving").data


def test_many_inputs_are_one_forward(server, served, monkeypatch):
    calls = []
    real = served.llm.embed_ids
    monkeypatch.setattr(
        served.llm, "embed_ids", lambda rows, dims=None, **kw: calls.append(len(rows)) or real(rows, dims)
    )
    r = httpx.post(
        server.url + "/v1/embeddings", json={"model": "hearth-demo", "input": [f"text {i}" for i in range(24)]}
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 24 and calls == [24]


def test_ollama_embed(server, served):
    c = ollama.Client(server.url)
    want = served.llm.embed(TEXTS)
    r = c.embed(model="hearth-demo", input=TEXTS)
    assert len(r.embeddings) == 3 and all(_close(g, w) for g, w in zip(r.embeddings, want))
    assert r.prompt_eval_count == sum(len(x) for x in served.llm.embed_inputs(TEXTS))
    one = c.embed(model="hearth-demo:latest", input=TEXTS[1])
    assert len(one.embeddings) == 1 and _close(one.embeddings[0], want[1])
    legacy = c.embeddings(model="hearth-demo", prompt=TEXTS[0])
    assert _close(legacy.embedding, want[0])
    long = "word " * 3000
    assert len(c.embed(model="hearth-demo", input=long).embeddings[0]) == served.llm.embedding_dims  # cut to fit
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="hearth-demo", input=long, truncate=False)
    assert e.value.status_code == 400 and "tokens" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="nope", input="x")
    assert e.value.status_code == 404


def test_langchain_embeddings(server, served):
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    want = served.llm.embed(TEXTS)
    oa = OpenAIEmbeddings(model="hearth-demo", base_url=server.url + "/v1", api_key="x",
                          check_embedding_ctx_length=False)  # fmt: skip
    assert all(_close(g, w) for g, w in zip(oa.embed_documents(TEXTS), want))
    assert _close(oa.embed_query(TEXTS[0]), want[0])
    ol = OllamaEmbeddings(model="hearth-demo", base_url=server.url)
    assert all(_close(g, w) for g, w in zip(ol.embed_documents(TEXTS), want))


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    """A tiny random EmbeddingGemma 2 checkpoint with the demo model's tokenizer."""
    demo = store.DEMO_DIR / "hearth-demo"
    vocab = json.loads((demo / "config.json").read_text()).get("vocab_size") or json.loads(
        (demo / "config.json").read_text())["text_config"]["vocab_size"]  # fmt: skip
    text = tf.EmbeddingGemma2TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=3,
        hidden_size_per_layer_input=8, embedding_dim=40, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("eg2") / "tiny-embedder"
    tf.EmbeddingGemma2TextModel(text).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)
    served = load(str(folder))
    s = LiveServer(create_app(served))
    yield s, served
    s.stop()


def test_embedding_model_embeds_and_refuses_to_generate(embedding_model):
    s, served = embedding_model
    c = ollama.Client(s.url)
    assert c.show("tiny-embedder").capabilities == ["embedding"]
    r = c.embed(model="tiny-embedder", input=["the cat", "sat"])
    assert len(r.embeddings[0]) == 40 and _close(r.embeddings, served.llm.embed(["the cat", "sat"]))
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="tiny-embedder", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "embedding model" in str(e.value)
    oa = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="tiny-embedder", prompt="hi", max_tokens=2)
    assert "embedding model" in str(e.value)
    assert len(oa.embeddings.create(model="tiny-embedder", input="the cat").data[0].embedding) == 40
