"""Test helpers for the server: a live uvicorn server in a thread, and a scripted engine whose replies are
given as text (for model output the tiny demo model cannot produce, such as tool-call markup)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import uvicorn

# The one tool definition the server tests offer (rendered by real templates, called in scripted replies).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 300  # a safety net: a loaded machine may take long to start it
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class Output:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Stats:
    waiting: int = 0
    running: int = 0
    kv_blocks_total: int = 64
    kv_blocks_used: int = 0
    block_size: int = 16
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0


@dataclass
class ScriptedEngine:
    """An AsyncEngine stand-in: `reply(prompt_text)` gives the text of the reply, which is encoded and handed
    out two tokens at a time (so that markers are split across pieces). Records the prompts it got."""

    tokenizer: object
    reply: Callable[[str], str]
    prompts: list[str] = field(default_factory=list)
    params: list = field(default_factory=list)
    running: int = 0

    async def generate(self, prompt_ids, params, request_id=None, client=None):
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        self.prompts.append(text)
        self.params.append(params)
        ids = self.tokenizer.encode(self.reply(text), add_special_tokens=False)[: params.max_tokens]
        self.running += 1
        try:
            for i in range(0, max(len(ids), 1), 2):
                await asyncio.sleep(0)
                last = i + 2 >= len(ids)
                reason = ("length" if len(ids) == params.max_tokens else "stop") if last else None
                yield Output("r", ids[i : i + 2], "", None, last, reason, len(prompt_ids), min(i + 2, len(ids)))
        finally:
            self.running -= 1

    def stats(self) -> Stats:
        return Stats(running=self.running)

    def shutdown(self) -> None:
        pass


def with_template(llm, template: str, name: str, specials: dict[str, str] | None = None):
    """A stand-in for `llm` whose tokenizer renders `template` (same vocabulary)."""
    from hearthlm.tokenizer import Tokenizer

    tok = llm.tokenizer
    tokenizer = Tokenizer.from_parts(tok._tok, specials or tok.special_tokens, {"default": (template, name)}, name)
    fake = SimpleNamespace(**{k: v for k, v in vars(llm).items()})
    fake.tokenizer = tokenizer
    fake.stop_token_ids = set(llm.stop_token_ids)
    fake.can_generate = llm.can_generate  # properties are not in vars(llm)
    return fake


def idle(served, timeout: float = 300.0) -> None:
    """Wait until the engine runs nothing and holds no KV block (aborts land on its next step); the timeout is a
    safety net for a hung engine, not an expectation of speed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = served.engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {served.engine.stats()}")
