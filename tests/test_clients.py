"""The server as real clients see it: litellm (its ollama_chat and openai providers, unchanged), and the requests
four editors send to an Ollama server, in their order and shape, with every field each one reads back checked.

Each editor test cites, in comments, the repository and file each request and each parsed field comes from:
  VS Code Copilot  microsoft/vscode-copilot-chat  src/extension/byok/vscode-node/ollamaProvider.ts (+ the
                   OpenAI endpoint it chats through)
  Zed              zed-industries/zed             crates/ollama/src/ollama.rs, crates/language_models/src/provider/ollama.rs
  Continue         continuedev/continue           core/llm/llms/Ollama.ts
  Open WebUI       open-webui/open-webui          backend/open_webui/routers/ollama.py, backend/open_webui/utils/response.py

The engine is tests/serving.ScriptedEngine over the demo model's tokenizer and Gemma 4 template: its replies are
scripted Gemma 4 markup (a thinking channel, a tool call) that the tiny demo model cannot write. Expected values come
from the script, the demo model's files and the clients' own parsing rules. A socket guard fails any test that
tries to reach a host other than this one (litellm's telemetry and cost-map fetches included)."""

from __future__ import annotations

import json
import math
import re
import socket
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from serving import TOOLS, LiveServer, ScriptedEngine

from hearthlm import LLM
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics

MODEL = "hearth-demo"
DEMO = Path(__import__("hearthlm").__file__).parent / "demo" / MODEL
CONFIG = json.loads((DEMO / "config.json").read_text())
ARGS = {"city": "Paris, FR", "days": 2}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'  # Gemma 4's tool-call markup
THOUGHT, ANSWER = "The user greets me; greet back.", "Hello there!"
COMPLETION = "return a + b"  # what the script writes after a raw code prompt (autocomplete)
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
HI = [{"role": "user", "content": "hi"}]


def reply(prompt: str) -> str:
    if prompt.removeprefix("<bos>").startswith("def add("):  # a raw prompt: code to complete
        return COMPLETION
    if "get_weather" in prompt and "tool_response" not in prompt:  # tools offered, no result yet: call one
        return CALL
    # Gemma 4's template opens the thought channel itself after a tool response when thinking is on; the model
    # then goes on with the thought
    opened = prompt.endswith("<|channel>thought\n")
    return ("" if opened else "<|channel>thought\n") + f"{THOUGHT}<channel|>{ANSWER}"


@pytest.fixture(scope="module")
def gemma():
    llm = LLM()
    engine = ScriptedEngine(llm.tokenizer, reply)
    server = LiveServer(create_app(ServedModel(llm, engine, MODEL, Metrics())))
    server.engine = engine
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection a test opens goes to this machine; an attempt elsewhere is recorded and refused."""
    tried: list = []
    connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"test network guard: no connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert tried == [], f"a client tried to reach {tried}"


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def sse(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# -- litellm ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the bundled cost map: no fetch at import
        # This litellm's telemetry is the proxy's, opt-in (litellm/telemetry/consent.py: OFF unless groups are
        # turned on); the SDK sends none. loopback_only fails a test if anything tries another host all the same.
        import litellm

        yield litellm


def _litellm_targets(server) -> list[tuple[str, dict]]:
    return [
        ("ollama_chat/" + MODEL, {"api_base": server.url}),
        ("openai/" + MODEL, {"api_base": server.url + "/v1", "api_key": "x"}),
    ]


def test_litellm_plain_and_streamed(litellm, gemma):
    for model, kw in _litellm_targets(gemma):
        r = litellm.completion(model=model, messages=HI, **kw)
        message = r.choices[0].message
        assert (message.content, message.reasoning_content) == (ANSWER, THOUGHT), model
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        chunks = list(litellm.completion(model=model, messages=HI, stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER, model
        thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        assert thought == THOUGHT, model
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"], model


def test_litellm_tool_call(litellm, gemma):
    for model, kw in _litellm_targets(gemma):
        r = litellm.completion(model=model, messages=WEATHER, tools=TOOLS, **kw)
        assert "<|tool>declaration:get_weather{" in gemma.engine.prompts[-1]  # the tools reached the template
        [call] = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", ARGS), model
        assert r.choices[0].finish_reason == "tool_calls" and call.id
        chunks = list(litellm.completion(model=model, messages=WEATHER, tools=TOOLS, stream=True, **kw))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        name = "".join(tc.function.name or "" for tc in calls)
        assert (name, json.loads("".join(tc.function.arguments or "" for tc in calls))) == ("get_weather", ARGS)
        assert "tool_calls" in [c.choices[0].finish_reason for c in chunks], model


def test_litellm_real_engine(litellm, server):
    """The same providers over the real engine and the demo model (whatever it writes)."""
    for model, kw in _litellm_targets(server):
        r = litellm.completion(model=model, messages=HI, max_tokens=4, temperature=0, **kw)
        assert isinstance(r.choices[0].message.content, str) and 1 <= r.usage.completion_tokens <= 4, model
        assert r.choices[0].finish_reason in ("stop", "length")


# -- VS Code Copilot (Ollama BYOK provider) ----------------------------------------------------------------------
def _copilot_version_supported(current: str, minimum: str = "0.6.4") -> bool:
    # ollamaProvider.ts _isVersionSupported: split on dots, parseInt each part (NaN counts as 0), compare in order
    def parts(v: str) -> list[int]:
        return [int(m.group()) if (m := re.match(r"\s*[+-]?\d+", p)) else 0 for p in v.split(".")]

    cur, low = parts(current), parts(minimum)
    for i in range(max(len(cur), len(low))):
        c, m = (cur[i] if i < len(cur) else 0), (low[i] if i < len(low) else 0)
        if c != m:
            return c > m
    return True


def test_copilot_ollama_provider(gemma):
    url = gemma.url
    # microsoft/vscode-copilot-chat src/extension/byok/vscode-node/ollamaProvider.ts _checkOllamaVersion:
    # GET {url}/api/version, versionInfo.version compared against MINIMUM_OLLAMA_VERSION '0.6.4'
    version = httpx.get(f"{url}/api/version").json()["version"]
    assert isinstance(version, str) and _copilot_version_supported(version)
    assert not _copilot_version_supported("0.6.3") and _copilot_version_supported("0.10.0")  # the rule as written
    # ollamaProvider.ts getAllModels: GET {url}/api/tags, then one POST /api/show {model: model.model} per model
    models = httpx.get(f"{url}/api/tags").json()["models"]
    assert [m["model"] for m in models] == [MODEL + ":latest"]
    for m in models:
        show = httpx.post(f"{url}/api/show", json={"model": m["model"]}, headers={"Content-Type": "application/json"})
        info = show.json()
        # _getOllamaModelInfo: model_info[`${model_info['general.architecture']}.context_length`] ?? 32768,
        # model_info['general.basename'] as the name, capabilities.includes('vision' | 'tools')
        arch = info["model_info"]["general.architecture"]
        context = info["model_info"][f"{arch}.context_length"]
        assert arch == "gemma4" and context == CONFIG["max_position_embeddings"]  # the demo's config.json
        assert isinstance(info["model_info"]["general.basename"], str) and info["model_info"]["general.basename"]
        assert isinstance(info["capabilities"], list) and "tools" in info["capabilities"]
        assert "vision" not in info["capabilities"]  # text only: Copilot must not send images
        assert isinstance(info["template"], str) and isinstance(info["details"]["family"], str)
        output = context // 2 if context < 4096 else 4096  # outputTokens, and maxInputTokens = context - output
        assert output + (context - output) == context and context - output > 0
    # The chat goes through Copilot's OpenAI endpoint (microsoft/vscode-copilot-chat
    # src/extension/byok/vscode-node/baseOpenAICompatibleProvider.ts: POST `${baseUrl}/chat/completions`, the
    # Ollama provider's base being `${ollamaBaseUrl}/v1`; src/extension/byok/node/openAIEndpoint.ts interceptBody:
    # streamed, max_tokens deleted, stream_options.include_usage, tools given parameters). Copilot reads
    # choices[].delta.content / tool_calls / finish_reason and the usage chunk.
    body = {
        "model": models[0]["model"], "messages": WEATHER, "stream": True, "n": 1, "temperature": 0.1, "top_p": 1,
        "tools": TOOLS, "tool_choice": "auto", "stream_options": {"include_usage": True},
    }  # fmt: skip
    headers = {"Content-Type": "application/json", "Authorization": "Bearer none"}  # `Bearer ${apiKey}`
    chunks = sse(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60))
    calls: dict[int, dict] = {}
    for c in chunks:
        for choice in c["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.get("id") or ""
                entry["name"] += tc["function"].get("name") or ""
                entry["arguments"] += tc["function"].get("arguments") or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", ARGS)]
    assert all(c["id"] for c in calls.values())
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["tool_calls"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    # A turn without tools: the text Copilot shows
    body.update(messages=HI, tools=None, tool_choice=None)
    body = {k: v for k, v in body.items() if v is not None}
    chunks = sse(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60))
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == ANSWER


# -- Zed (crates/ollama) -----------------------------------------------------------------------------------------
def _zed_chat_delta(line: dict) -> dict:
    """What serde makes of one /api/chat line as zed-industries/zed crates/ollama/src/ollama.rs ChatResponseDelta:
    model and created_at strings, message tagged by role, done a bool, the counts optional integers. For an
    assistant message, content is a String (required, not null), thinking Option<String>, and tool_calls
    Option<Vec<OllamaToolCall>>, OllamaToolCall being the enum `Function(OllamaFunctionCall)`: an object with the
    one key "function" (serde refuses any other key), holding name (String) and arguments (any JSON)."""
    assert isinstance(line["model"], str) and isinstance(line["created_at"], str) and isinstance(line["done"], bool)
    for key in ("prompt_eval_count", "eval_count"):
        assert line.get(key) is None or (isinstance(line[key], int) and line[key] >= 0)
    assert line.get("done_reason") is None or isinstance(line["done_reason"], str)
    message = line["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert message.get("thinking") is None or isinstance(message["thinking"], str)
    for call in message.get("tool_calls") or []:
        assert list(call) == ["function"], call
        assert isinstance(call["function"]["name"], str) and "arguments" in call["function"]
    return message


def test_zed_ollama_provider(gemma):
    url = gemma.url
    # zed-industries/zed crates/ollama/src/ollama.rs get_models: GET {api_url}/api/tags (Accept: application/json)
    # into LocalModelsResponse { models: Vec<LocalModelListing> }: name, modified_at (String), size (u64), digest,
    # details { format, family, families: Option<Vec<String>>, parameter_size, quantization_level } (Strings)
    listing = httpx.get(f"{url}/api/tags", headers={"Accept": "application/json"}).json()["models"]
    for m in listing:
        assert all(isinstance(m[k], str) for k in ("name", "modified_at", "digest"))
        assert isinstance(m["size"], int) and m["size"] >= 0
        d = m["details"]
        assert all(isinstance(d[k], str) for k in ("format", "family", "parameter_size", "quantization_level"))
        assert d["families"] is None or all(isinstance(f, str) for f in d["families"])
    # crates/language_models/src/provider/ollama.rs fetch_models: names with "-embed" are skipped; show_model per
    # model: POST {api_url}/api/show {"model": name} into ModelShow { capabilities: Vec<String> } (serde default)
    names = [m["name"] for m in listing if "-embed" not in m["name"]]
    assert names == [MODEL + ":latest"]
    show = httpx.post(f"{url}/api/show", json={"model": names[0]}).json()
    capabilities = show.get("capabilities", [])
    assert all(isinstance(c, str) for c in capabilities)
    supports_tools, supports_thinking = "tools" in capabilities, "thinking" in capabilities
    assert supports_tools and supports_thinking and "vision" not in capabilities
    # provider/ollama.rs to_ollama_request: stream, keep_alive -1 (KeepAlive::indefinite), options from
    # ChatOptions with None serialized as null (num_ctx: max_tokens, 4096 for a name it does not know), tools when
    # supports_tools, think when supports_thinking; ollama.rs stream_chat_completion reads the NDJSON lines
    request = {
        "model": names[0], "messages": WEATHER, "stream": True, "keep_alive": -1,
        "options": {"num_ctx": 4096, "num_predict": None, "stop": [], "temperature": 1.0, "top_p": None},
        "tools": TOOLS, "think": supports_thinking,
    }  # fmt: skip
    lines = ndjson(httpx.post(f"{url}/api/chat", json=request, timeout=60))
    messages = [_zed_chat_delta(line) for line in lines]
    # map_to_language_model_completion_events: the first tool call of a line is a ToolUse; done ends the turn
    used = [m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")]
    assert [(f["name"], f["arguments"]) for f in used] == [("get_weather", ARGS)]
    assert [line["done"] for line in lines].count(True) == 1 and lines[-1]["done"]
    assert lines[-1]["prompt_eval_count"] > 0 and lines[-1]["eval_count"] > 0
    # The next turn as Zed sends it: the assistant's tool_calls as {"function": ...} with thinking null, then the
    # result as role "tool" with tool_name (ChatMessage::Tool)
    request["messages"] = [
        *WEATHER,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": ARGS}}],
         "thinking": None},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]  # fmt: skip
    lines = ndjson(httpx.post(f"{url}/api/chat", json=request, timeout=60))
    messages = [_zed_chat_delta(line) for line in lines]
    assert "sunny" in gemma.engine.prompts[-1] and "<|think|>" in gemma.engine.prompts[-1]  # think: true
    assert "".join(m["content"] for m in messages) == ANSWER
    assert "".join(m.get("thinking") or "" for m in messages) == THOUGHT


# -- Continue (core/llm/llms/Ollama.ts) ----------------------------------------------------------------------------
CONTINUE_PARAMETER_LINE = re.compile(r'^(\S+)\s+((?:".*")|\S+)$')  # Ollama.ts constructor, as written there


def test_continue_ollama_provider(gemma):
    url = gemma.url
    headers = {"Content-Type": "application/json"}
    # continuedev/continue core/llm/llms/Ollama.ts constructor: POST api/show {name: model}; if body.parameters,
    # each line must match the regex below (a line that does not makes `parts.length` throw and drops the rest);
    # "num_ctx" sets contextLength, each "stop" value is JSON.parse'd onto completionOptions.stop; FIM is assumed
    # when body.template includes ".Suffix"
    show = httpx.post(f"{url}/api/show", json={"name": MODEL}, headers=headers)
    assert show.status_code == 200
    body = show.json()
    stops = []
    for line in body["parameters"].split("\n"):
        parts = CONTINUE_PARAMETER_LINE.match(line)
        assert parts is not None, line
        key, value = parts.group(1), parts.group(2)
        if key == "num_ctx":
            assert int(value) > 0
        if key == "stop":
            stops.append(json.loads(value))
    assert "<turn|>" in stops and "<eos>" in stops  # Gemma 4's end of turn and the config's eos token
    # hearthlm refuses suffix (fill-in-the-middle), so the template must not make Continue send one
    assert ".Suffix" not in body["template"]
    assert httpx.post(f"{url}/api/generate", json={"model": MODEL, "prompt": "a", "suffix": "b"}).status_code == 400
    # Ollama.ts listModels: GET api/tags, data.models.map(model => model.name)
    names = [m["name"] for m in httpx.get(f"{url}/api/tags", headers=headers).json()["models"]]
    assert names == [MODEL + ":latest"]
    # Ollama.ts _streamChat: POST api/chat {model, messages [{role, content}], options: _getModelFileParams
    # (undefined fields dropped by JSON.stringify: num_predict = maxTokens, stop, num_ctx = contextLength),
    # keep_alive 60 * 30, stream}; each line: "error" in it throws, else message.role / message.content
    options = {"num_predict": 4096, "stop": stops, "num_ctx": 8192}  # Continue's defaults exceed the demo's 2048
    chat = {"model": MODEL, "messages": HI, "options": options, "keep_alive": 60 * 30, "stream": True}
    lines = ndjson(httpx.post(f"{url}/api/chat", json=chat, headers=headers, timeout=60))
    assert not any("error" in j for j in lines)
    assert all(j["message"]["role"] == "assistant" and isinstance(j["message"]["content"], str) for j in lines)
    assert "".join(j["message"]["content"] for j in lines) == ANSWER
    # With tools (and the last message from the user) Continue sets stream false and reads one JSON body:
    # message.tool_calls[].function.name and JSON.stringify(function.arguments) (an object)
    chat.update(messages=WEATHER, stream=False, tools=TOOLS)
    r = httpx.post(f"{url}/api/chat", json=chat, headers=headers, timeout=60).json()
    assert "error" not in r and r["message"]["role"] == "assistant" and isinstance(r["message"]["content"], str)
    assert [(tc["function"]["name"], tc["function"]["arguments"]) for tc in r["message"]["tool_calls"]] == [
        ("get_weather", ARGS)
    ]
    # Ollama.ts _streamComplete (autocomplete, no FIM): POST api/generate {model, prompt, raw, options,
    # keep_alive, stream}; each line's j.response is yielded
    gen = {"model": MODEL, "prompt": "def add(a, b):\n    ", "raw": True, "options": options, "keep_alive": 1800,
           "stream": True}  # fmt: skip
    lines = ndjson(httpx.post(f"{url}/api/generate", json=gen, headers=headers, timeout=60))
    assert not any("error" in j for j in lines) and all(isinstance(j["response"], str) for j in lines)
    assert "".join(j["response"] for j in lines) == COMPLETION
    assert gemma.engine.prompts[-1].removeprefix("<bos>") == gen["prompt"]  # raw: no template around it


# -- Open WebUI (backend/open_webui/routers/ollama.py) -----------------------------------------------------------------
def test_open_webui_ollama_router(gemma):
    url = gemma.url
    # open-webui/open-webui backend/open_webui/routers/ollama.py verify_connection and get_ollama_versions:
    # GET {url}/api/version, the lowest of tuple(map(int, re.sub(r"^v|-.*", "", x["version"]).split(".")))
    version = httpx.get(f"{url}/api/version").json()["version"]
    assert all(isinstance(n, int) for n in tuple(map(int, re.sub(r"^v|-.*", "", version).split("."))))
    # get_all_models: GET {url}/api/tags; merge_ollama_models_lists keys each model by model["model"]; the model
    # list it serves reads name, model, and passes details (family, parameter_size, quantization_level) to the UI
    tags = httpx.get(f"{url}/api/tags", headers={"Content-Type": "application/json"}).json()
    merged = {m["model"]: m for m in tags["models"]}
    assert MODEL + ":latest" in merged  # Open WebUI tags a bare name ':latest', then looks for it here
    for m in merged.values():
        assert isinstance(m["name"], str) and isinstance(m["size"], int) and isinstance(m["modified_at"], str)
        assert {"family", "parameter_size", "quantization_level", "format"} <= set(m["details"])
    # ...then GET {url}/api/ps: expires_map = {m["name"]: m["expires_at"]}, each read by datetime.fromisoformat
    # and stored as int(dt.timestamp()) on the tags entry of the same name
    load = httpx.post(f"{url}/api/generate", json={"model": MODEL, "prompt": ""})  # loads it (Ollama's empty call)
    assert load.json()["done"] is True
    ps = httpx.get(f"{url}/api/ps", headers={"Content-Type": "application/json"}).json()["models"]
    expires = {m["name"]: m["expires_at"] for m in ps if "expires_at" in m}
    assert set(expires) <= {m["name"] for m in merged.values()} and expires
    assert all(isinstance(int(datetime.fromisoformat(v).timestamp()), int) for v in expires.values())
    # generate_chat_completion: GenerateChatCompletionForm(...).model_dump(exclude_none=True), the model name with
    # ":latest" when it has no tag, POST {url}/api/chat passed through as application/x-ndjson
    payload = {"model": MODEL + ":latest", "messages": HI, "stream": True, "options": {"temperature": 0.8}}
    lines = ndjson(httpx.post(f"{url}/api/chat", json=payload, timeout=60))
    # backend/open_webui/utils/response.py convert_streaming_response_ollama_to_openai: per line data.get("model"),
    # message.get("content" | "thinking" | "tool_calls"), data.get("done"); on done, convert_ollama_usage_to_openai:
    # int(prompt_eval_count), int(eval_count), and eval_duration / prompt_eval_duration / total_duration as numbers
    assert all(isinstance(line["model"], str) and isinstance(line["message"], dict) for line in lines)
    assert "".join(line["message"].get("content") or "" for line in lines) == ANSWER
    assert "".join(line["message"].get("thinking") or "" for line in lines) == THOUGHT
    done = [line for line in lines if line.get("done")]
    assert len(done) == 1 and done[0] is lines[-1]
    for key in ("prompt_eval_count", "eval_count", "eval_duration", "prompt_eval_duration", "total_duration"):
        assert isinstance(done[0][key], int) and done[0][key] >= 0, key
    assert int(done[0]["prompt_eval_count"]) > 0 and int(done[0]["eval_count"]) > 0
    # Tools (native function calling): convert_ollama_tool_call_to_openai reads tool_call.get("index",
    # function.get("index", 0)), tool_call.get("id", <its own>), function["name"], json.dumps(function["arguments"])
    payload.update(messages=WEATHER, tools=TOOLS)
    lines = ndjson(httpx.post(f"{url}/api/chat", json=payload, timeout=60))
    calls = [tc for line in lines for tc in (line["message"].get("tool_calls") or [])]
    assert [(tc["function"]["name"], json.loads(json.dumps(tc["function"]["arguments"]))) for tc in calls] == [
        ("get_weather", ARGS)
    ]
    assert all(isinstance(tc.get("index", tc["function"].get("index", 0)), int) for tc in calls)
    # unload_model: POST {url}/api/generate {"model", "keep_alive": 0, "prompt": ""}, stream False, read as JSON
    r = httpx.post(f"{url}/api/generate", json={"model": MODEL + ":latest", "keep_alive": 0, "prompt": ""})
    assert r.status_code == 200 and r.json()["done"] is True


# -- embeddings (Continue and Open WebUI) -----------------------------------------------------------------------------
def test_clients_embed(server):
    """Part of both clients' flows: Continue's codebase index (core/llm/llms/Ollama.ts _embed: POST api/embed
    {model, input: chunks}, reads data.embeddings, throws when missing or empty) and Open WebUI's RAG
    (backend/open_webui/routers/ollama.py embed: POST {url}/api/embed with GenerateEmbedForm dumped without
    nulls, the model with ":latest"; utils/response.py convert_embedding_response_ollama_to_openai reads
    response["embeddings"] as plain float lists)."""
    chunks = ["def add(a, b):\n    return a + b", "The weather in Paris is sunny."]
    for body in ({"model": MODEL, "input": chunks}, {"model": MODEL + ":latest", "input": chunks}):
        r = httpx.post(f"{server.url}/api/embed", json=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
        embeddings = r.json()["embeddings"]
        assert len(embeddings) == len(chunks) and all(isinstance(e, list) and e for e in embeddings)
        assert len({len(e) for e in embeddings}) == 1
        assert all(isinstance(x, float) and math.isfinite(x) for e in embeddings for x in e)
        assert embeddings[0] != embeddings[1]
