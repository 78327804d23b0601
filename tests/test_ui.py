"""The chat page (/ui) in a real browser: Debian's headless Chromium driven by selenium, against live servers on
loopback. One server serves the store (the two demo models, loaded on first use by a loader the tests can hold
or fail); one runs tests/serving.ScriptedEngine with the demo model's Gemma 4 template, for replies the tiny demo
model cannot write (thinking, tool calls, a code block, HTML and script). Waits poll until a state shows (their
timeouts are safety nets for a slow machine, not expectations of speed).

HEARTHLM_UI_SHOTS=FOLDER saves screenshots of the main states there (docs/ui/ holds the committed ones)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import time

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import TOOLS, LiveServer, ScriptedEngine

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
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


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
        engine, "add_request", lambda rid, ids, p: add(rid, ids, dataclasses.replace(p, ignore_eos=True))
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
    assert names == ["hearth-demo", "hearth-demo-moe"] and find(browser, "#model-status").text == "context 2048"
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
