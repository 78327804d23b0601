"""Tool-call bodies: each model family writes a call in its own syntax; these turn one into ToolCalls."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One function call the model asked for: its name and its arguments as a JSON object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def short_call_id() -> str:
    """Nine letters and digits: the only id shape Mistral's template accepts back."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


class CallSyntaxError(ValueError):
    """The model wrote a tool-call marker whose body does not parse."""


def _json_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise CallSyntaxError(f"a tool call needs a 'name': {obj!r}"[:200])
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise CallSyntaxError(f"tool call arguments are not JSON: {args[:100]!r}") from None
    if not isinstance(args, dict):
        raise CallSyntaxError(f"tool call arguments must be an object, got {args!r}"[:200])
    return ToolCall(obj["name"], args)


def _loads(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise CallSyntaxError(f"tool call is not JSON ({e})") from None


def parse_json_call(body: str) -> list[ToolCall]:
    """Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` body."""
    return [_json_call(_loads(body.strip()))]


def parse_json_calls(body: str) -> list[ToolCall]:
    """Llama 3's bare reply `{"name": ..., "parameters": {...}}` (several joined by ';') or Mistral's
    `[TOOL_CALLS][{...}, ...]` list."""
    body = body.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].strip()
    try:
        value = json.loads(body)
    except ValueError:
        value = [_loads(part) for part in body.split(";") if part.strip()]
    return [_json_call(v) for v in (value if isinstance(value, list) else [value])]


# -- Gemma 4: call:NAME{key:value,...} with <|"|> as the string quote -----------------------------
QUOTE = '<|"|>'
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_NAME = re.compile(r"call:([^{\s]+)\s*\{")


def parse_gemma4_call(body: str) -> list[ToolCall]:
    """The body of `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,flag:true,xs:[1,2],obj:{a:1}}<tool_call|>`."""
    body = body.strip()
    m = _NAME.match(body)
    if not m:
        raise CallSyntaxError(f"expected call:NAME{{...}}, got {body[:80]!r}")
    reader = _Gemma4Reader(body, m.end() - 1)
    args = reader.value()
    if reader.rest().strip():
        raise CallSyntaxError(f"text after the call's arguments: {reader.rest()[:80]!r}")
    return [ToolCall(m.group(1), args)]


class _Gemma4Reader:
    """Recursive descent over Gemma 4's argument syntax: JSON-like, bare keys, <|"|>-quoted strings."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def rest(self) -> str:
        return self.text[self.pos :]

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _fail(self, what: str):
        raise CallSyntaxError(f"tool call arguments: expected {what} at {self.text[self.pos : self.pos + 40]!r}")

    def value(self) -> Any:
        self._skip()
        t, p = self.text, self.pos
        if t.startswith(QUOTE, p):
            return self._string()
        if t.startswith("{", p):
            return self._object()
        if t.startswith("[", p):
            return self._array()
        for word, v in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, p) and not (t[p + len(word) : p + len(word) + 1].isalnum()):
                self.pos += len(word)
                return v
        m = _NUMBER.match(t, p)
        if m:
            self.pos = m.end()
            return float(m.group()) if m.group(1) or m.group(2) else int(m.group())
        end = p  # a bare word: taken as a string, the way the model sometimes writes enum values
        while end < len(t) and t[end] not in ",}]":
            end += 1
        if end == p:
            self._fail("a value")
        self.pos = end
        return t[p:end].strip()

    def _string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            self._fail('a closing <|"|>')
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def _key(self) -> str:
        self._skip()
        if self.text.startswith(QUOTE, self.pos):
            return self._string()
        end = self.text.find(":", self.pos)
        if end < 0:
            self._fail("key:")
        key, self.pos = self.text[self.pos : end].strip(), end
        return key

    def _expect(self, ch: str) -> None:
        self._skip()
        if not self.text.startswith(ch, self.pos):
            self._fail(repr(ch))
        self.pos += 1

    def _object(self) -> dict[str, Any]:
        self._expect("{")
        out: dict[str, Any] = {}
        self._skip()
        if self.text.startswith("}", self.pos):
            self.pos += 1
            return out
        while True:
            key = self._key()
            self._expect(":")
            out[key] = self.value()
            self._skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self._expect("}")
            return out

    def _array(self) -> list[Any]:
        self._expect("[")
        out: list[Any] = []
        self._skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            self._skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self._expect("]")
            return out
