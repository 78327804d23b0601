"""Tool-call bodies: each model family writes a call in its own syntax; these turn one into ToolCalls.

Each parser takes the call's text and `closed`: whether the call's end is known (its end marker came, or it
runs to the end of the reply by design), so that a missing final brace is a slip, not a reply cut off.

Models drift from their trained syntax (Gemma 4 in particular, as Ollama's, llama.cpp's and vLLM's trackers
show). Each drift tolerated here is one named step below, taken only where the call a reader would extract
is unambiguous; anything else raises CallSyntaxError and the reply parser returns the text as it was."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any


def call_id() -> str:
    """A new call id in OpenAI's shape."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One function call the model asked for: its name and its arguments as a JSON object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=call_id)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def short_call_id() -> str:
    """Nine letters and digits: the only id shape Mistral's template accepts back."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


class CallSyntaxError(ValueError):
    """The model wrote a tool-call marker whose body does not parse."""


class CallCutOff(CallSyntaxError):
    """The call's text ends inside it (an open string, object or list, or nothing at all): the reply was cut."""


def _named(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():  # never an empty call
        raise CallSyntaxError(f"a tool call needs a name, got {name!r}"[:200])
    return name.strip()


# -- JSON families: Qwen, Llama 3, Mistral ---------------------------------------------------------------
def _json_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise CallSyntaxError(f"a tool call needs a 'name': {obj!r}"[:200])
    name = _named(obj.get("name"))
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _loads(args, closed=True)
    if args is None:  # drift: `"arguments": null` (or Python's None) for a call without arguments
        args = {}
    if not isinstance(args, dict):
        raise CallSyntaxError(f"tool call arguments must be an object, got {args!r}"[:200])
    return ToolCall(name, args)


_WORD = re.compile(r"[A-Za-z_]\w*")
_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}
_UNESCAPED_DQUOTE = re.compile(r'(?<!\\)"')


def _json_string_end(text: str, i: int) -> int:
    """Index just past the JSON string that opens at text[i], or -1 if the text ends inside it."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == text[i]:
            return j + 1
        else:
            j += 1
    return -1


def _loads(body: str, closed: bool) -> Any:
    """JSON, or JSON with the drift models write, repaired step by step; CallSyntaxError if neither."""
    try:
        return json.loads(body)
    except ValueError:
        pass
    if not body.strip():
        raise CallCutOff("nothing after the tool-call marker")
    out: list[str] = []
    stack: list[str] = []
    last = ""  # the last significant character written
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == '"':
            j = _json_string_end(body, i)
            if j < 0:
                raise CallCutOff("the text ends inside a string")
            out.append(body[i:j])
        elif c == "'" and last in ("", "{", "[", ",", ":"):
            # Drift: Python-style single-quoted strings, where a JSON string may start (not an apostrophe in
            # prose). Rewritten as JSON strings: \' unescaped, bare " escaped.
            j = _json_string_end(body, i)
            if j < 0:
                raise CallCutOff("the text ends inside a string")
            inner = body[i + 1 : j - 1].replace("\\'", "'")
            out.append('"' + _UNESCAPED_DQUOTE.sub('\\\\"', inner) + '"')
        elif c in "{[":
            stack.append(c)
            out.append(c)
            j = i + 1
        elif c in "}]":
            if not stack or stack.pop() != "{["["}]".index(c)]:
                raise CallSyntaxError(f"unbalanced {c!r} in the tool call")
            out.append(c)
            j = i + 1
        elif c == ",":
            # Drift: a trailing comma before a closing brace or bracket is dropped.
            j = i + 1
            k = j
            while k < n and body[k].isspace():
                k += 1
            if k == n or body[k] not in "}]":
                out.append(c)
        elif m := _WORD.match(body, i):
            # Drift: Python's True/False/None for JSON's true/false/null. Other words are kept (and fail).
            out.append(_PYTHON_LITERALS.get(m.group(), m.group()))
            j = m.end()
        else:
            out.append(c)
            j = i + 1
        if not c.isspace():
            last = body[j - 1]
        i = j
    if stack:
        # Drift: the call's own closing brace (and Mistral's closing bracket) left out, once the arguments
        # object is complete. Only these outer closers: an open arguments object could have had more keys.
        if closed and last in "}]" and "".join(stack) in ("{", "[", "[{"):
            out.extend("}" if s == "{" else "]" for s in reversed(stack))
        else:
            raise CallCutOff("the text ends inside an object or list")
    try:
        return json.loads("".join(out))
    except ValueError as e:
        raise CallSyntaxError(f"tool call is not JSON ({e})") from None


def parse_json_call(body: str, closed: bool = False) -> list[ToolCall]:
    """Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` body."""
    return [_json_call(_loads(body.strip(), closed))]


def parse_json_calls(body: str, closed: bool = False) -> list[ToolCall]:
    """Llama 3's bare reply `{"name": ..., "parameters": {...}}` (several joined by ';') or Mistral's
    `[TOOL_CALLS][{...}, ...]` list."""
    body = body.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].strip()
    try:
        value = _loads(body, closed)
    except CallCutOff:
        raise
    except CallSyntaxError:
        parts = [part for part in body.split(";") if part.strip()]
        if len(parts) < 2:
            raise
        value = [_loads(part, closed) for part in parts]
    return [_json_call(v) for v in (value if isinstance(value, list) else [value])]


# -- Gemma 4: call:NAME{key:value,...} with <|"|> as the string quote -----------------------------
QUOTE = '<|"|>'
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
# Drift: `call:NAME(...)`, the arguments in parentheses (a Python call's shell) instead of braces.
_HEAD = re.compile(r"call:([^{(\s]*)\s*([{(])")
# A key written bare: Gemma's template writes keys unquoted, so anything up to the ':' (or '=', see _sep).
_BARE_KEY = re.compile(r"""[^:=,{}\[\]()"'<>\n]+""")
_CLOSER = {"{": "}", "(": ")", "[": "]"}


def parse_gemma4_call(body: str, closed: bool = False) -> list[ToolCall]:
    """The body of `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,flag:true,xs:[1,2],obj:{a:1}}<tool_call|>`."""
    body = body.strip()
    if not body:
        raise CallCutOff("an empty tool call")
    reader = _Gemma4Reader(body, 0, closed)
    calls = []
    while True:
        m = _HEAD.match(body, reader.pos)
        if not m:
            raise CallSyntaxError(f"expected call:NAME{{...}}, got {reader.rest()[:80]!r}")
        name = _named(m.group(1))
        reader.pos = m.end() - 1
        calls.append(ToolCall(name, reader.object(top=True)))
        reader.skip()
        if reader.pos == len(body):
            return calls
        # Drift: two calls back to back inside one marker pair, `call:a{...}call:b{...}`: both are returned.
        if not body.startswith("call:", reader.pos):
            raise CallSyntaxError(f"text after the call's arguments: {reader.rest()[:80]!r}")


class _Gemma4Reader:
    """Recursive descent over Gemma 4's argument syntax: JSON-like, bare keys, <|"|>-quoted strings."""

    def __init__(self, text: str, pos: int, closed: bool = False):
        self.text, self.pos, self.closed = text, pos, closed

    def rest(self) -> str:
        return self.text[self.pos :]

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _fail(self, what: str):
        if self.pos >= len(self.text):
            raise CallCutOff(f"tool call arguments: the text ends where {what} was expected")
        raise CallSyntaxError(f"tool call arguments: expected {what} at {self.text[self.pos : self.pos + 40]!r}")

    def _ends_value(self, pos: int, stops: str) -> bool:
        while pos < len(self.text) and self.text[pos].isspace():
            pos += 1
        return pos == len(self.text) or self.text[pos] in stops

    def value(self, stops: str) -> Any:
        """One value; `stops`: the characters that may follow it (',' and the enclosing closer)."""
        self.skip()
        t, p = self.text, self.pos
        if t.startswith(QUOTE, p):
            return self._string()
        if p < len(t) and t[p] in "\"'":
            return self._quoted()
        if t.startswith("{", p):
            return self.object()
        if t.startswith("[", p):
            return self._array()
        for word, v in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, p) and self._ends_value(p + len(word), stops):
                self.pos += len(word)
                return v
        m = _NUMBER.match(t, p)
        if m and self._ends_value(m.end(), stops):
            self.pos = m.end()
            return float(m.group()) if m.group(1) or m.group(2) else int(m.group())
        # Drift: an unquoted string, up to the next ',' or closer (`city:Paris`, `q:weather in Paris`, or an
        # enum value). A word with a ',' in it cannot be told from the next key, so it fails there.
        end = p
        while end < len(t) and t[end] not in stops:
            end += 1
        word = t[p:end].strip()
        if word.endswith(QUOTE) and word.count(QUOTE) == 1:
            word = word[: -len(QUOTE)]  # drift: the opening <|"|> left out, the closing one written
        if not word or QUOTE in word or any(ch in word for ch in "{}[]"):
            self._fail("a value")
        self.pos = end
        return word

    def _string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            self._fail('a closing <|"|>')
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def _quoted(self) -> str:
        """Drift: a JSON string in ordinary double quotes (or single quotes) instead of <|"|>."""
        end = _json_string_end(self.text, self.pos)
        if end < 0:
            self.pos = len(self.text)
            self._fail("a closing quote")
        raw = self.text[self.pos : end]
        if raw[0] == "'":
            raw = '"' + _UNESCAPED_DQUOTE.sub('\\\\"', raw[1:-1].replace("\\'", "'")) + '"'
        try:
            value = json.loads(raw, strict=False)
        except ValueError:
            self._fail("a string")
        self.pos = end
        return value

    def _key(self) -> str:
        self.skip()
        if self.text.startswith(QUOTE, self.pos):
            return self._string()
        if self.text[self.pos : self.pos + 1] in ('"', "'"):
            return self._quoted()
        m = _BARE_KEY.match(self.text, self.pos)
        if not m or not m.group().strip():
            self._fail("key:")
        self.pos = m.end()
        return m.group().strip()

    def _sep(self) -> None:
        self.skip()
        # Drift: `key=value` (Python keyword-argument style) for `key:value`.
        if self.text[self.pos : self.pos + 1] not in (":", "="):
            self._fail("':'")
        self.pos += 1

    def _expect(self, ch: str) -> None:
        self.skip()
        if not self.text.startswith(ch, self.pos):
            self._fail(repr(ch))
        self.pos += 1

    def object(self, top: bool = False) -> dict[str, Any]:
        self.skip()
        opener = self.text[self.pos : self.pos + 1]
        if opener not in ("{", "(") or (opener == "(" and not top):
            self._fail("'{'")
        closer = _CLOSER[opener]
        self.pos += 1
        out: dict[str, Any] = {}
        self.skip()
        if self.text.startswith(closer, self.pos):
            self.pos += 1
            return out
        while True:
            key = self._key()
            self._sep()
            out[key] = self.value("," + closer)
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            if top and self.closed and self.pos == len(self.text):
                # Drift: the call's final '}' left out, yet its end marker came: the arguments are complete.
                return out
            self._expect(closer)
            return out

    def _array(self) -> list[Any]:
        self._expect("[")
        out: list[Any] = []
        self.skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return out
        while True:
            out.append(self.value(",]"))
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self._expect("]")
            return out
