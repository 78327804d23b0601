"""/metrics on a server with several models: the request, token and latency series carry a `model` label, and
each model's series move with its own requests. Read with prometheus_client's own parser."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import LiveServer

from hearthlm.server import load
from hearthlm.server.app import create_app
from hearthlm.server.metrics import Metrics
from hearthlm.server.registry import Models

DENSE, MOE = "hearth-demo", "hearth-demo-moe"
PER_MODEL = ("hearth_prompt_tokens_total", "hearth_generation_tokens_total", "hearth_engine_requests_total",
             "hearth_time_to_first_token_seconds_count", "hearth_time_per_output_token_seconds_count")  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HEARTHLM_HOME", str(tmp_path_factory.mktemp("home")))  # an empty store: the built-in demos
    metrics = Metrics()
    models = Models(lambda path, name: load(str(path), name=name, metrics=metrics), keep_alive=300.0)
    live = LiveServer(create_app(models, metrics=metrics))
    yield live
    live.stop()
    mp.undo()


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics").text
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def of(values: dict, name: str, model: str) -> float:
    return sum(v for (n, labels), v in values.items() if n == name and ("model", model) in labels)


def test_each_model_has_its_own_series(server):
    before = scrape(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        client.chat.completions.create(model=DENSE, messages=ask, max_tokens=5, temperature=0)
    list(ollama.Client(host=server.url).chat(model=MOE, messages=ask, stream=True, options={"num_predict": 5}))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ask, max_tokens=5)
    after = scrape(server)

    def moved(name: str, model: str) -> float:
        return of(after, name, model) - of(before, name, model)

    for name in PER_MODEL:
        assert moved(name, DENSE) > 0 and moved(name, MOE) > 0, name
    assert moved("hearth_engine_requests_total", DENSE) == 2 and moved("hearth_engine_requests_total", MOE) == 1
    requests = {labels: v - before.get(("hearth_requests_total", labels), 0)
                for (n, labels), v in after.items() if n == "hearth_requests_total"}  # fmt: skip
    assert requests[(("model", DENSE), ("route", "/v1/chat/completions"), ("status", "200"))] == 2
    assert requests[(("model", MOE), ("route", "/api/chat"), ("status", "200"))] == 1
    assert requests[(("model", ""), ("route", "/v1/chat/completions"), ("status", "404"))] == 1
    buckets = [labels for (n, labels) in after if n == "hearth_time_to_first_token_seconds_bucket"]
    assert {dict(labels)["model"] for labels in buckets} == {DENSE, MOE}


def test_label_values_are_escaped():
    m = Metrics()
    m.request("/api/chat", 200, 'odd "name"\\with\nbreaks')
    [sample] = [s for f in text_string_to_metric_families(m.render(None)) for s in f.samples]
    assert sample.labels["model"] == 'odd "name"\\with\nbreaks' and sample.value == 1
