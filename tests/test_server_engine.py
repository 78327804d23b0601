"""The server over the real engine and the demo model, driven by the official openai and ollama clients: greedy
parity (streamed == whole == alone == under load), usage, n, stop, seeds, logprobs, context errors, cancellation,
the prefix cache and /metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import idle

from hearthlm.engine.sampler import SamplingParams

MODEL = "hearth-demo"
ASK = [{"role": "user", "content": "Tell me a fortune."}]


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url)


def test_chat_streamed_equals_whole(client, served):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    # The same conversation through the Python API gives the same answer.
    alone = served.llm.chat(ASK, SamplingParams(max_tokens=40, temperature=0))
    assert alone.text.strip() == text.strip()
    idle(served)


def test_completion_and_max_completion_tokens(client, served):
    r = client.completions.create(model=MODEL, prompt="And it came to pass", temperature=0, max_tokens=24)
    expected = served.llm.generate("And it came to pass", SamplingParams(max_tokens=24, temperature=0))[0]
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(
        model=MODEL, prompt="And it came to pass", temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 3
    echo = client.completions.create(model=MODEL, prompt="Once", temperature=0, max_tokens=4, echo=True)
    assert echo.choices[0].text.startswith("Once")


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=ASK, temperature=1.0, max_tokens=16, n=3, seed=11)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice samples with its own seed
    streamed = client.chat.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in a.choices]
    one = client.chat.completions.create(**{**kw, "n": 1})
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once for n choices
    two = client.completions.create(model=MODEL, prompt=["In the", "The for"], temperature=0, max_tokens=5, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.choices[0].text == two.choices[1].text


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="And it came to pass", temperature=0, max_tokens=30)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model=MODEL, prompt="And it came to pass", temperature=0, max_tokens=30, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="And it came to pass", temperature=0, max_tokens=30, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5)  # greedy: the best
    c = client.completions.create(model=MODEL, prompt="And it came", temperature=0, max_tokens=6, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_too_long_prompt(client, oll, served):
    long = "word " * 3000
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    message = e.value.body["message"]
    assert "2048" in message and e.value.body["code"] == "context_length_exceeded"
    n = len(served.tokenizer.encode_chat(served.tokenizer.apply_chat_template([{"role": "user", "content": long}])))
    assert str(n) in message
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model=MODEL, prompt=long, raw=True)
    assert e.value.status_code == 400 and "2048" in e.value.error
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[1, 2, 999999])  # token outside the vocabulary


def test_ollama_chat_and_generate(oll, served):
    opts = {"temperature": 0, "num_predict": 30}
    whole = oll.chat(model=MODEL, messages=ASK, options=opts, stream=False)
    parts = list(oll.chat(model=MODEL, messages=ASK, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    last = parts[-1]
    assert last.done and last.done_reason in ("stop", "length") and last.eval_count == whole.eval_count
    for r in (whole, last):
        assert r.prompt_eval_count > 0 and r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    g = oll.generate(model=MODEL, prompt="And it came to pass", raw=True, options={"temperature": 0, "num_predict": 5})
    assert g.eval_count == 5 and g.done_reason == "length" and len(g.context) > 5
    more = oll.generate(model=MODEL, prompt=" And", raw=True, context=g.context, options={"num_predict": 2})
    assert more.prompt_eval_count == len(g.context) + len(served.tokenizer.encode(" And", add_special_tokens=False))
    lp = oll.chat(
        model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": 4}, logprobs=True, top_logprobs=2
    )
    assert len(lp.logprobs) == lp.eval_count and all(len(t.top_logprobs) == 2 for t in lp.logprobs)
    seeded = {"temperature": 1.0, "seed": 3, "num_predict": 8}
    a, b = (oll.generate(model=MODEL, prompt="And it came to pass", raw=True, options=seeded) for _ in range(2))
    assert a.response == b.response and a.eval_count == 8
    stop = oll.generate(
        model=MODEL, prompt="And it came to pass", raw=True, options={"temperature": 0, "stop": [g.response[2:5]]}
    )
    assert stop.response == g.response[: g.response.index(g.response[2:5])]


def test_concurrent_greedy_requests_match_alone(oll, served):
    prompts = [f"{w} {i}" for i, w in enumerate(["And", "The", "For", "It", "Tell", "In", "What", "Now"] * 2)]

    def run(p):
        r = oll.generate(model=MODEL, prompt=p, raw=True, options={"temperature": 0, "num_predict": 24})
        return r.context, r.response

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    idle(served)


def test_disconnect_frees_blocks(server, served):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    for n in (1, 3):
        with httpx.Client(base_url=server.url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json={**body, "n": n}) as r:
                lines = 0
                for line in r.iter_lines():
                    lines += line.startswith("data:")
                    if lines >= 5:
                        break
                assert served.engine.stats().running == n and served.engine.stats().kv_blocks_used > 0
        idle(served)
    generated = served.engine.stats().generated_tokens
    time.sleep(0.3)
    assert served.engine.stats().generated_tokens == generated  # nothing is decoding for it any more
    # A non-streamed request whose client gives up is cancelled too.
    body = {**body, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
    idle(served)
    assert served.engine.stats().generated_tokens - generated < 1500


def test_prefix_cache_hit_and_metrics(client, server, served):
    system = "You are a careful reader of old books. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Read me Psa 23."}]
    client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    idle(served)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "hearth_requests", "hearth_prompt_tokens", "hearth_generation_tokens", "hearth_requests_waiting",
        "hearth_requests_running", "hearth_kv_blocks_used", "hearth_kv_blocks_total", "hearth_kv_bytes_resident",
        "hearth_kv_bytes_reserved",
        "hearth_time_to_first_token_seconds", "hearth_time_per_output_token_seconds",
        "hearth_prefix_cache_hit_tokens",
    ):  # fmt: skip
        assert name in families, name
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    model = (("model", MODEL),)
    assert values[("hearth_requests_total", (*model, ("route", "/v1/chat/completions"), ("status", "200")))] >= 2
    assert values[("hearth_prefix_cache_hit_tokens_total", ())] > 0
    assert values[("hearth_kv_blocks_used", ())] == 0 and values[("hearth_kv_blocks_total", ())] > 0
    assert 0 < values[("hearth_kv_bytes_resident", ())] < values[("hearth_kv_bytes_reserved", ())]
    assert values[("hearth_time_to_first_token_seconds_count", model)] > 0
    assert values[("hearth_generation_tokens_total", model)] > 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_bad_request_does_not_disturb_others(client, oll, served):
    """A stream in flight survives bad requests beside it."""
    stream = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, top_p=5)
    r = httpx.post(str(client.base_url) + "chat/completions", json={"model": MODEL, "messages": ASK, "n": "many"})
    assert r.status_code == 400 and json.loads(r.text)["error"]["param"] == "n"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40)
    assert text == whole.choices[0].message.content
    idle(served)
