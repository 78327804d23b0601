"""The chat page (/ui) in a real browser: Debian's headless Chromium driven by selenium, against live servers on
loopback. One server serves the store (the two demo models, loaded on first use by a loader the tests can hold
or fail); one runs tests/serving.ScriptedEngine with the demo model's Gemma 4 template, for replies the tiny demo
model cannot write (thinking, tool calls, a code block, HTML and script); one serves a tiny random Gemma 4 with
image and audio towers (tests/test_server_media's), with the chat requests it gets recorded. Waits poll until a state shows (their
timeouts are safety nets for a slow machine, not expectations of speed).

HEARTHLM_UI_SHOTS=FOLDER saves screenshots of the main states there (docs/ui/ holds the committed ones)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile
import torch
import transformers as tf
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import TOOLS, LiveServer, ScriptedEngine
from test_multimodal import IDS, VARIANTS, _tokenizer

from hearthlm import LLM
from hearthlm.server import load
from hearthlm.server.app import create_app
from hearthlm.server.generation import ServedModel
from hearthlm.server.metrics import Metrics
from hearthlm.server.registry import Models

WAIT = 180  # seconds: a safety net for a loaded machine
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'
THOUGHT = "<|channel>thought\nThe user greets me; greet back.<channel|>Hello there!"
CODE = "Here it is:\n\n```python\ndef add(a, b):\n    return a + b  # sum\n```\n"
# Each probe would set window.pwned if it ran; the link's javascript: URL too, if clicked.
XSS = '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> [click](javascript:window.pwned=3)'


def reply(prompt: str) -> str:
    """What the scripted model writes, by what the prompt holds."""
    if "get_weather" in prompt:
        return CALL
    if "code please" in prompt:
        return CODE
    if "probe" in prompt:
        return "Echo: " + XSS
    return THOUGHT if "<|think|>" in prompt else "Hello there!"


# -- the browser --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    yield b
    b.quit()


def wait(b, condition, what: str):
    stale = (StaleElementReferenceException,)  # a streamed reply's parts are drawn anew on each piece
    return WebDriverWait(b, WAIT, 0.05, ignored_exceptions=stale).until(lambda _: condition(), message=what)


def find(b, css: str):
    return b.find_element(By.CSS_SELECTOR, css)


def last_reply(b):
    return b.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")[-1]


def open_page(b, server) -> None:
    b.get(server.url + "/")
    wait(b, lambda: "ready" in find(b, "#model-status").get_attribute("class"), "the model to be ready")


def setting(b, field: str, value) -> None:
    """Types `value` into a settings field (the panel opens if closed)."""
    if not find(b, "#settings").is_displayed():
        find(b, "#toggle-settings").click()
    el = find(b, "#" + field)
    if isinstance(value, bool):
        if el.is_selected() != value:
            el.click()
        return
    b.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", el, value)


def send(b, text: str, done: bool = True):
    """Sends `text` as the user; waits for the reply to end (`done`); returns the reply's element."""
    before = len(b.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant"))
    b.execute_script("document.getElementById('prompt').value = arguments[0]", text)
    find(b, "#send").click()
    wait(b, lambda: len(b.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")) > before, "the reply to start")
    if done:
        wait(b, lambda: find(b, "#send").is_displayed() and last_reply(b).find_elements(By.CLASS_NAME, "stats"),
             "the reply to end")  # fmt: skip
    return last_reply(b)


def alert(b) -> bool:
    try:
        return bool(b.switch_to.alert.text)
    except NoAlertPresentException:
        return False


def new_chat(b) -> None:
    find(b, "#new-chat").click()


def shot(b, name: str) -> None:
    folder = os.environ.get("HEARTHLM_UI_SHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        b.save_screenshot(os.path.join(folder, name + ".png"))


def metric(server, name: str) -> float:
    """The series `name`, summed over its labels (the token counters have one series per model)."""
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# -- the servers --------------------------------------------------------------------------------------------
class Loader:
    """The loader of the store's server: `hold[name]` (an Event) holds a load until set; a name in `fail` fails."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.hold, self.fail = metrics, {}, set()

    def __call__(self, path, name):
        if name in self.fail:
            raise RuntimeError("not enough memory for the weights (a test's refusal)")
        if name in self.hold:
            self.hold[name].wait(timeout=WAIT)
        return load(str(path), name=name, metrics=self.metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The demo models only: an empty store of our own (the demo models are always listed)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HEARTHLM_HOME", str(tmp_path_factory.mktemp("home")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def multi(store):
    metrics = Metrics()
    loader = Loader(metrics)
    models = Models(loader, keep_alive=600.0)
    server = LiveServer(create_app(models, metrics=metrics))
    server.models, server.loader = models, loader
    yield server
    server.stop()


@pytest.fixture
def slow(multi, monkeypatch):
    """hearth-demo writes until max_tokens, one engine step per `slow.delay` seconds (10 ms): the demo model ends
    at random, and too fast for a person (or a test) to see it write or to press stop."""
    httpx.post(multi.url + "/api/chat", json={"model": "hearth-demo", "messages": []}, timeout=WAIT)  # loads it
    engine = next(s.model for s in multi.models.loaded() if s.name == "hearth-demo").engine.engine
    step, add = engine.step, engine.add_request

    def slow_step():
        time.sleep(slow_step.delay)
        return step()

    slow_step.delay = 0.01
    monkeypatch.setattr(engine, "step", slow_step)
    monkeypatch.setattr(
        engine,
        "add_request",
        lambda rid, ids, p, *media, **kw: add(rid, ids, dataclasses.replace(p, ignore_eos=True), *media, **kw),
    )
    return slow_step


@pytest.fixture(scope="module")
def demo():
    return LLM()


def scripted_server(llm) -> LiveServer:
    return LiveServer(create_app(ServedModel(llm, ScriptedEngine(llm.tokenizer, reply), "hearth-demo", Metrics())))


@pytest.fixture(scope="module")
def scripted(demo):
    server = scripted_server(demo)
    yield server
    server.stop()


# -- the page -----------------------------------------------------------------------------------------------
def test_page_loads_from_the_package_alone(browser, multi):
    assert httpx.get(multi.url + "/").text == "Ollama is running (hearthlm)"  # what Ollama clients check
    page = httpx.get(multi.url + "/", headers={"accept": "text/html"}, follow_redirects=True)
    assert page.url.path == "/ui/" and "<title>hearthlm chat</title>" in page.text
    open_page(browser, multi)
    assert browser.current_url == multi.url + "/ui/"
    names = [o.get_attribute("value") for o in Select(find(browser, "#model")).options]
    assert (
        names == ["hearth-demo", "hearth-demo-moe", "hearth-demo-vision"]
        and find(browser, "#model-status").text == "context 2048"
    )
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(multi.url + "/") for u in loaded)  # nothing from elsewhere: no CDN, no fonts
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors


def test_a_reply_streams_with_its_numbers(browser, multi, slow):
    open_page(browser, multi)
    new_chat(browser)
    setting(browser, "max-tokens", "60")
    # Each change of the reply while the stop button shows: the text must grow in several steps before it ends.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const r = [...document.querySelectorAll('#messages .assistant .content')].pop();
          if (r) window.seen.push([r.textContent.length, !document.getElementById('stop').hidden]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    el = send(browser, "Tell me a story.")
    seen = browser.execute_script("return window.seen")
    assert len({n for n, busy in seen if busy and n > 0}) >= 3  # shown in pieces while the stop button shows
    stats = el.find_element(By.CLASS_NAME, "stats").text
    assert re.fullmatch(r"hearth-demo · 60 tokens · [\d.]+ tokens/s · first token [\d.]+ s · context \d+ / 2048", stats)
    shot(browser, "reply")


def test_stop_cancels_on_the_server(browser, multi, slow):
    open_page(browser, multi)
    new_chat(browser)
    setting(browser, "max-tokens", "2000")
    before = metric(multi, "hearth_generation_tokens_total")
    el = send(browser, "Tell me a long story.", done=False)
    wait(browser, lambda: len(el.find_element(By.CLASS_NAME, "content").text) > 20, "some of the reply")
    assert metric(multi, "hearth_kv_blocks_used") > 0
    shot(browser, "streaming")
    find(browser, "#stop").click()
    wait(browser, lambda: "stopped" in el.text, "the reply to show it stopped")
    wait(browser, lambda: metric(multi, "hearth_kv_blocks_used") == 0, "the server to free the reply's KV blocks")
    wait(browser, lambda: metric(multi, "hearth_requests_running") == 0, "the server to end the request")
    assert metric(multi, "hearth_generation_tokens_total") - before < 2000  # cancelled, not run to its end
    assert find(browser, "#send").is_displayed() and not find(browser, "#stop").is_displayed()


def test_a_model_that_fails_to_load(browser, multi):
    open_page(browser, multi)
    new_chat(browser)
    multi.loader.fail.add("hearth-demo-moe")
    Select(find(browser, "#model")).select_by_value("hearth-demo-moe")
    status = find(browser, "#model-status")
    wait(browser, lambda: "failed" in status.get_attribute("class"), "the load to fail")
    assert "could not be loaded" in status.text and "not enough memory" in status.text
    el = send(browser, "hi")
    assert "The model could not be loaded" in el.find_element(By.CLASS_NAME, "error").text
    shot(browser, "load-failed")
    multi.loader.fail.clear()
    Select(find(browser, "#model")).select_by_value("hearth-demo")  # the page keeps the pick: take back the other
    wait(browser, lambda: find(browser, "#model-status").text == "context 2048", "hearth-demo")


def test_switch_models_with_a_spinner_while_one_loads(browser, multi):
    open_page(browser, multi)
    new_chat(browser)
    gate = multi.loader.hold["hearth-demo-moe"] = threading.Event()
    try:
        Select(find(browser, "#model")).select_by_value("hearth-demo")
        wait(browser, lambda: find(browser, "#model-status").text == "context 2048", "hearth-demo")
        Select(find(browser, "#model")).select_by_value("hearth-demo-moe")
        status = find(browser, "#model-status")
        wait(browser, lambda: "loading" in status.get_attribute("class"), "the spinner")
        shot(browser, "loading")
        ps = httpx.get(multi.url + "/api/ps").json()["models"]
        assert "hearth-demo-moe:latest" not in [m["name"] for m in ps]  # still loading: the spinner tells the truth
    finally:
        gate.set()
    wait(browser, lambda: "ready" in status.get_attribute("class"), "the model to load")
    el = send(browser, "hi")
    assert el.find_element(By.CLASS_NAME, "stats").text.startswith("hearth-demo-moe · ")
    assert "hearth-demo-moe:latest" in [m["name"] for m in httpx.get(multi.url + "/api/ps").json()["models"]]
    browser.refresh()  # the choice is kept
    wait(browser, lambda: Select(find(browser, "#model")).first_selected_option.text == "hearth-demo-moe", "the pick")
    Select(find(browser, "#model")).select_by_value("hearth-demo")
    wait(browser, lambda: find(browser, "#model-status").text == "context 2048", "hearth-demo again")


def test_thinking_is_folded(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    setting(browser, "thinking", True)
    el = send(browser, "hi")
    thinking = el.find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.get_attribute("open") is None and not thinking.find_element(By.TAG_NAME, "div").is_displayed()
    assert el.find_element(By.CLASS_NAME, "content").text == "Hello there!"
    thinking.find_element(By.TAG_NAME, "summary").click()
    assert thinking.find_element(By.TAG_NAME, "div").text == "The user greets me; greet back."
    shot(browser, "thinking")
    setting(browser, "thinking", False)
    assert send(browser, "hi").find_elements(By.CSS_SELECTOR, "details.thinking") == []


def test_tool_calls_show_as_calls(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    setting(browser, "tools", json.dumps(TOOLS))
    el = send(browser, "What is the weather in Paris?")
    call = el.find_element(By.CLASS_NAME, "call").text
    name, args = re.fullmatch(r"call (\w+)\((.*)\)", call, re.S).groups()
    assert name == "get_weather" and json.loads(args) == {"city": "Paris, FR", "days": 2}
    setting(browser, "tools", "")


def test_code_is_highlighted_with_a_copy_button(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    el = send(browser, "code please")
    code = el.find_element(By.CSS_SELECTOR, "pre code.hljs")
    assert "def add(a, b):" in code.text
    keywords = [k.text for k in code.find_elements(By.CLASS_NAME, "hljs-keyword")]
    assert "def" in keywords and "return" in keywords
    assert code.find_element(By.CLASS_NAME, "hljs-comment").text == "# sum"
    copy = el.find_element(By.CSS_SELECTOR, "pre button.copy")
    copy.click()
    wait(browser, lambda: copy.text == "Copied", "the copy button to answer")
    shot(browser, "code")


def test_conversations_survive_a_reload(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    send(browser, "first words")
    browser.refresh()
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user"), "the conversation")
    texts = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#messages .msg")]
    assert texts[0] == "first words" and texts[1].startswith("Hello there!")
    current = find(browser, "#conversations li.current")
    assert current.find_element(By.CLASS_NAME, "title").text == "first words"
    current.find_element(By.CLASS_NAME, "rename").click()
    prompt = browser.switch_to.alert
    prompt.send_keys("Renamed")
    prompt.accept()
    browser.refresh()
    wait(browser, lambda: find(browser, "#conversations li.current .title").text == "Renamed", "the new name")
    count = len(browser.find_elements(By.CSS_SELECTOR, "#conversations li"))
    shot(browser, "conversations")
    find(browser, "#conversations li.current .delete").click()
    browser.switch_to.alert.accept()
    titles = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#conversations .title")]
    assert len(titles) == count - 1 and "Renamed" not in titles


def test_html_and_script_show_as_text(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    el = send(browser, "probe " + XSS)
    for _ in range(2):  # as streamed, then as rendered again from storage
        user = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")[-1]
        assert user.text == "probe " + XSS
        content = last_reply(browser).find_element(By.CLASS_NAME, "content")
        assert '<img src=x onerror="window.pwned=1">' in content.text and "<script>" in content.text
        messages = find(browser, "#messages")
        assert messages.find_elements(By.CSS_SELECTOR, "img, script, iframe, [onerror]") == []
        links = [a.get_attribute("href") for a in messages.find_elements(By.TAG_NAME, "a")]
        assert all(not (h or "").startswith("javascript:") for h in links)
        for a in messages.find_elements(By.TAG_NAME, "a"):
            a.click()
        assert browser.execute_script("return window.pwned") is None
        browser.refresh()
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .content"), "reload")
    assert el is not None


def test_context_overflow_is_explained(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    el = send(browser, "hello " * 3000)
    error = el.find_element(By.CLASS_NAME, "error").text
    assert "Too long for this model's context" in error and "2048" in error


def test_long_prompt_shows_prefill_progress(browser, multi, slow):
    open_page(browser, multi)
    new_chat(browser)
    setting(browser, "max-tokens", "4")
    slow.delay = 0.1  # a frame or more per prefill chunk: each progress report gets drawn
    browser.execute_script("""
        window.progress = [];
        new MutationObserver(() => {
          const p = document.querySelector('#messages progress');
          if (p) window.progress.push([p.value, p.max]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true});
    """)
    send(browser, "word " * 1500)
    progress = browser.execute_script("return window.progress")
    assert progress and all(0 < done < total for done, total in progress)


def test_phone_width_and_dark(browser, scripted):
    def background() -> str:
        return browser.execute_script("return getComputedStyle(document.body).backgroundColor")

    browser.set_window_size(390, 800)
    try:
        open_page(browser, scripted)
        sidebar = find(browser, "#sidebar")
        assert sidebar.rect["x"] + sidebar.rect["width"] <= 0  # a drawer, closed
        find(browser, "#toggle-sidebar").click()
        wait(browser, lambda: sidebar.rect["x"] == 0, "the drawer to open")
        new_chat(browser)  # closes the drawer
        wait(browser, lambda: sidebar.rect["x"] + sidebar.rect["width"] <= 0, "the drawer to close")
        send(browser, "code please")
        width = browser.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1] and find(browser, "#send").rect["x"] + find(browser, "#send").rect["width"] <= 390
        shot(browser, "phone")
        light = background()
        dark = {"media": "", "features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", dark)
        assert (light, background()) == ("rgb(255, 255, 255)", "rgb(24, 24, 27)")
        shot(browser, "phone-dark")
    finally:
        browser.set_window_size(1100, 760)
    shot(browser, "dark")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "", "features": []})


def test_the_api_key_is_asked_once(browser, demo):
    engine = ScriptedEngine(demo.tokenizer, reply)
    server = LiveServer(create_app(ServedModel(demo, engine, "hearth-demo", Metrics()), api_key="sekrit"))
    try:
        assert httpx.get(server.url + "/ui/app.js").status_code == 200  # the page itself is open
        assert httpx.get(server.url + "/v1/models").status_code == 401
        browser.get(server.url + "/")
        wait(browser, lambda: alert(browser), "the page to ask for the key")
        browser.switch_to.alert.send_keys("sekrit")
        browser.switch_to.alert.accept()
        wait(browser, lambda: "ready" in find(browser, "#model-status").get_attribute("class"), "the models")
        new_chat(browser)
        assert send(browser, "hi").find_element(By.CLASS_NAME, "content").text == "Hello there!"
        browser.refresh()  # kept for the session: not asked again
        wait(browser, lambda: "ready" in find(browser, "#model-status").get_attribute("class"), "the models")
        assert send(browser, "hi").find_element(By.CLASS_NAME, "content").text == "Hello there!"
        assert browser.execute_script("return sessionStorage.getItem('hearth.key')") == "sekrit"
    finally:
        server.stop()


def test_a_server_that_went_away(browser, demo):
    server = scripted_server(demo)
    try:
        open_page(browser, server)
        new_chat(browser)
        send(browser, "hi")
    finally:
        server.stop()
    el = send(browser, "are you there?")
    error = el.find_element(By.CLASS_NAME, "error").text
    assert "The server is not answering" in error
    shot(browser, "server-gone")


def test_settings_reach_the_server_and_the_schema_holds(browser):
    """System prompt, temperature, max tokens and a JSON schema set on the page go out in the request, and the real
    engine's reply (the demo model, constrained) is JSON that matches the schema; a broken schema is explained."""
    import jsonschema

    app = Recorder(create_app(load(None)))
    server = LiveServer(app)
    verse = {"type": "string", "maxLength": 40}
    schema = {"type": "object", "properties": {"verse": verse}, "required": ["verse"], "additionalProperties": False}
    try:
        open_page(browser, server)
        new_chat(browser)
        for field, value in (("system", "Answer in JSON."), ("temperature", "0"), ("max-tokens", "80")):
            setting(browser, field, value)
        setting(browser, "schema", json.dumps(schema))
        text = send(browser, "Give me a verse.").find_element(By.CLASS_NAME, "content").text
        body = app.bodies[-1]
        assert body["messages"][0] == {"role": "system", "content": "Answer in JSON."}
        assert body["temperature"] == 0 and body["max_tokens"] == 80
        assert body["response_format"]["json_schema"]["schema"] == schema
        jsonschema.validate(json.loads(text), schema)
        setting(browser, "schema", "{not json")
        error = send(browser, "again").find_element(By.CLASS_NAME, "error").text
        assert "The JSON schema is not valid JSON" in error and len(app.bodies) == 1  # refused before sending
    finally:
        setting(browser, "schema", "")
        setting(browser, "system", "")
        setting(browser, "temperature", "0.7")
        server.stop()


# -- images and audio ---------------------------------------------------------------------------------------
class Recorder:
    """An ASGI wrapper that keeps the JSON body of each /v1/chat/completions request."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def tap():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        await self.app(scope, tap, send)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A tiny random Gemma 4 with both towers (as tests/test_server_media builds it), its requests recorded."""
    config = tf.Gemma4Config(**VARIANTS["e2b"], **IDS)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("av") / "tiny-gemma4-av"
    tf.Gemma4ForConditionalGeneration(config).eval().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    app = Recorder(create_app(load(str(folder), dtype="float32")))
    server = LiveServer(app)
    server.bodies = app.bodies
    yield server
    server.stop()


def png(path, seed: int = 0, size=(40, 56)) -> bytes:
    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    path.write_bytes(out.getvalue())
    return out.getvalue()


def wav(path) -> bytes:
    out = io.BytesIO()
    noise = (np.random.default_rng(1).standard_normal(8000) * 0.1).astype(np.float32)
    soundfile.write(out, noise, 16000, format="WAV")
    path.write_bytes(out.getvalue())
    return out.getvalue()


def attached(b):
    return [x.text for x in b.find_elements(By.CSS_SELECTOR, "#attachments .item .name")]


def user_parts(server) -> list:
    return server.bodies[-1]["messages"][-1]["content"]


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_an_image_goes_with_the_message(browser, media, tmp_path):
    open_page(browser, media)
    new_chat(browser)
    setting(browser, "max-tokens", "3")
    attach = find(browser, "#attach")
    assert attach.is_displayed() and find(browser, "#file").get_attribute("accept") == "audio/*,image/*"
    image, audio = png(tmp_path / "cat.png"), wav(tmp_path / "tone.wav")
    find(browser, "#file").send_keys(f"{tmp_path / 'cat.png'}\n{tmp_path / 'tone.wav'}")
    wait(browser, lambda: attached(browser) == ["cat.png", "tone.wav"], "the image and the audio")
    thumb = find(browser, "#attachments .item.image img")
    assert thumb.get_attribute("src") == data_url(image) and thumb.rect["width"] > 0
    shot(browser, "attached")
    find(browser, "#attachments .item.audio .remove").click()
    assert attached(browser) == ["cat.png"]
    el = send(browser, "What is this?")
    assert not el.find_elements(By.CLASS_NAME, "error") and attached(browser) == []
    parts = user_parts(media)
    assert parts == [{"type": "image_url", "image_url": {"url": data_url(image)}},
                     {"type": "text", "text": "What is this?"}]  # fmt: skip

    def prompt_tokens(content) -> int:  # what the server made of it: an image adds its soft tokens
        body = {"model": "tiny-gemma4-av", "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
        return httpx.post(media.url + "/v1/chat/completions", json=body, timeout=WAIT).json()["usage"]["prompt_tokens"]

    assert prompt_tokens(parts) > prompt_tokens("What is this?") + 10
    user = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")[-1]
    assert user.find_element(By.CSS_SELECTOR, ".media img").get_attribute("src") == data_url(image)
    assert "What is this?" in user.text
    # audio alone (a message with no words), then a reload: the conversation keeps the image and resends it
    find(browser, "#file").send_keys(str(tmp_path / "tone.wav"))
    wait(browser, lambda: attached(browser) == ["tone.wav"], "the audio")
    find(browser, "#send").click()
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")) == 2, "a reply")
    wait(browser, lambda: last_reply(browser).find_elements(By.CLASS_NAME, "stats"), "the reply to end")
    sound = {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
    assert user_parts(media) == [sound]
    browser.refresh()
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user .media img"), "the thumbnail")
    send(browser, "And now?")
    # (by role: the page leaves out an assistant turn with no words, which a 3-token random reply can be)
    users = [m["content"] for m in media.bodies[-1]["messages"] if m["role"] == "user"]
    assert users[0][0]["image_url"]["url"] == data_url(image) and users[1] == [sound] and len(users) == 3


def test_big_and_broken_media(browser, media, tmp_path):
    open_page(browser, media)
    new_chat(browser)
    setting(browser, "max-tokens", "2")
    png(tmp_path / "big.png", size=(720, 720))  # noise: ~1.5 MB, over what the page keeps in localStorage
    find(browser, "#file").send_keys(str(tmp_path / "big.png"))
    wait(browser, lambda: attached(browser) == ["big.png"], "the big image")
    assert not send(browser, "big").find_elements(By.CLASS_NAME, "error")
    assert user_parts(media)[0]["image_url"]["url"].startswith("data:image/png;base64,")
    browser.refresh()
    gone = wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user .media .gone"), "it")
    assert gone[0].text == "image not kept (over 1 MB)"
    wait(browser, lambda: "ready" in find(browser, "#model-status").get_attribute("class"), "the model")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    find(browser, "#file").send_keys(str(tmp_path / "broken.png"))
    wait(browser, lambda: attached(browser) == ["broken.png"], "the broken image")
    error = send(browser, "and this?").find_element(By.CLASS_NAME, "error").text
    assert "The server refused the request (400)" in error and "image" in error


def test_a_file_name_shows_as_text(browser, media, tmp_path):
    open_page(browser, media)
    new_chat(browser)
    setting(browser, "max-tokens", "2")
    name = "<img src=x onerror=alert(1)>.png"
    png(tmp_path / name)
    find(browser, "#file").send_keys(str(tmp_path / name))
    wait(browser, lambda: attached(browser) == [name], "the file")
    send(browser, "probe")
    for _ in range(2):  # as sent, then drawn again from storage
        user = browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")[-1]
        assert user.find_element(By.CSS_SELECTOR, ".media .name").text == name
        assert browser.find_elements(By.CSS_SELECTOR, "[onerror], img[src='x']") == [] and not alert(browser)
        browser.refresh()
        wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user .media"), "reload")


def test_paste_an_image(browser, media, tmp_path):
    open_page(browser, media)
    new_chat(browser)
    image = png(tmp_path / "x.png", seed=3)
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt}));
    """, base64.b64encode(image).decode())  # fmt: skip
    wait(browser, lambda: attached(browser) == ["pasted.png"], "the pasted image")
    find(browser, "#attachments .remove").click()
    assert attached(browser) == []


def test_a_text_model_takes_no_files(browser, scripted):
    open_page(browser, scripted)
    new_chat(browser)
    assert not find(browser, "#attach").is_displayed()
    browser.execute_script("""
        const dt = new DataTransfer();
        dt.items.add(new File(["fake"], "cat.png", {type: "image/png"}));
        const drop = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
        document.getElementById("messages").dispatchEvent(drop);
    """)
    notice = wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#attachments .notice"), "the refusal")
    assert notice[0].text == "cat.png: this model reads text only." and attached(browser) == []
    assert send(browser, "hi").find_element(By.CLASS_NAME, "content").text == "Hello there!"
    assert not find(browser, "#attachments").is_displayed()
