"""A tool call's arguments while the model is still writing them: the part of their final JSON text that is
already certain.

The final arguments string is `ToolCall.arguments_json`: json.dumps of the parsed arguments. A streamed call
must send pieces whose concatenation is exactly that string, so the readers here re-write the call's text
token by token in json.dumps' form, and stop for good at the first thing they cannot vouch for (a drift the
parsers in calls.py repair, a repeated key). What they have written is then a prefix of the final string;
the rest comes when the call is complete and parsed.

`CallFollower(fmt).update(body)` follows the first call of a call body as the body grows: its name and the
certain prefix of its arguments, or None while the name or the opening of the arguments has not come yet.
Each update reads only the new text, so a long call costs linear time."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .calls import QUOTE, parse_gemma4_call, parse_json_calls

if TYPE_CHECKING:
    from . import ChatFormat


class _Odd(Exception):
    """The text turns to something only the full parser reads: nothing more is written."""


_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)(")?', re.S)
_JSON_CHARS = re.compile(r'(?:[^"\\]|\\.)*', re.S)
_JSON_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
# What a number or a word may still grow into: the text ends here, so wait for more.
_SCALAR_START = re.compile(r"-?\d*(?:\.\d*)?(?:[eE][+-]?\d*)?|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?")
_GEMMA_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_GEMMA_HEAD = re.compile(r"\s*call:([^{(\s]*)\s*\{")
_BARE_KEY = re.compile(r"""[^:=,{}\[\]()"'<>\n]+""")
_WORDS = {"true": True, "false": False, "null": None}


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass
class _Frame:
    """An open object or list; `state`: "open" (nothing in it yet), "value" (its next value is being read),
    "after" (a value was read), "next" (a ',' was read)."""

    closer: str
    state: str = "open"
    keys: set[str] = field(default_factory=set)


class _Echo:
    """Reads one value from `start` of a growing text, writing json.dumps' form of what is certain to `written`.
    Subclasses give the syntax: keys, strings and scalars."""

    def __init__(self, start: int):
        self.text, self.pos, self.written = "", start, ""
        self.stack: list[_Frame] = []
        self.in_string = self.stopped = self.done = False

    def feed(self, text: str) -> str:
        """The text so far (it only grows); returns everything written so far."""
        self.text = text
        try:
            while not (self.stopped or self.done) and self._step():
                pass
        except _Odd:
            self.stopped = True
        return self.written

    def _ws(self) -> bool:
        """Skip whitespace; whether text follows."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.pos < len(self.text)

    def _step(self) -> bool:
        """Read one token if it is all there; False to wait for more text."""
        if self.in_string:
            return self._string_more()
        if not self._ws():
            return False
        if not self.stack or self.stack[-1].state == "value":
            return self._value()
        f, c = self.stack[-1], self.text[self.pos]
        if f.state == "after" and c not in (",", f.closer):
            raise _Odd
        if c == f.closer:
            if f.state == "next":  # a trailing ',': a drift
                raise _Odd
            return self._close()
        if c == ",":
            if f.state != "after":
                raise _Odd
            self.pos, f.state = self.pos + 1, "next"
            return True
        sep = "" if f.state == "open" else ", "
        if f.closer == "]":
            self.written, f.state = self.written + sep, "value"
            return True
        key = self._key()
        if key is None:
            return False
        if key in f.keys:  # the last value would win, at the first key's place: only the parser knows
            raise _Odd
        f.keys.add(key)
        self.written, f.state = self.written + sep + _dumps(key) + ": ", "value"
        return True

    def _value(self) -> bool:
        c = self.text[self.pos]
        if c in "{[":
            self.stack.append(_Frame("}" if c == "{" else "]"))
            self.pos, self.written = self.pos + 1, self.written + c
            return True
        opened = self._string_start()
        if opened:
            self.in_string, self.written = True, self.written + '"'
        return self._scalar() if opened is False else bool(opened)

    def _close(self) -> bool:
        self.written += self.stack.pop().closer
        self.pos += 1
        self._after_value()
        return True

    def _after_value(self) -> None:
        if self.stack:
            self.stack[-1].state = "after"
        else:
            self.done = True

    def _end_string(self, skip: int) -> bool:
        self.pos, self.in_string, self.written = self.pos + skip, False, self.written + '"'
        self._after_value()
        return True

    def _key_sep(self, end: int) -> int | None:
        """The position after the ':' that follows a key ending at `end`; None while it has not come."""
        while end < len(self.text) and self.text[end].isspace():
            end += 1
        if end == len(self.text):
            return None
        if self.text[end] != ":":
            raise _Odd
        return end + 1


class _JsonEcho(_Echo):
    """Standard JSON: what json.loads reads as it is."""

    def _key(self) -> str | None:
        m = _JSON_STRING.match(self.text, self.pos)
        if not m:
            raise _Odd
        after = self._key_sep(m.end()) if m.group(2) else None
        if after is None:
            return None
        key = _decode(m.group())
        self.pos = after
        return key

    def _string_start(self) -> bool | None:
        if self.text[self.pos] != '"':
            return False
        self.pos += 1
        return True

    def _string_more(self) -> bool:
        raw = _JSON_CHARS.match(self.text, self.pos).group()
        closed = self.pos + len(raw) < len(self.text) and self.text[self.pos + len(raw)] == '"'
        if closed:
            self.written += _dumps(_decode('"' + raw + '"'))[1:-1]
            self.pos += len(raw)
            return self._end_string(1)
        # The text may end inside an escape (or between the halves of a surrogate pair): decode up to it.
        for cut in range(len(raw), max(len(raw) - 12, -1), -1):
            try:
                decoded = json.loads('"' + raw[:cut] + '"')
            except ValueError:
                continue
            if decoded and "\ud800" <= decoded[-1] <= "\udbff":
                decoded, cut = decoded[:-1], cut - 6
            # json.dumps writes a string character by character: the text of a prefix is a prefix of the text.
            self.written += _dumps(decoded)[1:-1]
            self.pos += cut
            return False
        raise _Odd

    def _scalar(self) -> bool:
        if _SCALAR_START.fullmatch(self.text, self.pos):
            return False  # the number or word may go on
        m = _JSON_SCALAR.match(self.text, self.pos)
        if not m or self.text[m.end()] not in " \t\r\n,]}":
            raise _Odd  # not JSON (True, NaN, a bare word...): the parser's drift repairs
        self.pos, self.written = m.end(), self.written + _dumps(json.loads(m.group()))
        self._after_value()
        return True


def _decode(quoted: str) -> str:
    try:
        return json.loads(quoted)
    except ValueError:  # a raw control character, a bad escape: the parser decides
        raise _Odd from None


class _Gemma4Echo(_Echo):
    """Gemma 4's argument syntax as trained: bare or <|"|>-quoted keys, <|"|>-quoted strings, bare scalars."""

    def _key(self) -> str | None:
        head = self.text[self.pos : self.pos + len(QUOTE)]
        if len(head) < len(QUOTE) and QUOTE.startswith(head):
            return None  # maybe a <|"|> cut short
        if head == QUOTE:
            end = self.text.find(QUOTE, self.pos + len(QUOTE))
            if end < 0:
                return None
            key, end = self.text[self.pos + len(QUOTE) : end], end + len(QUOTE)
        else:
            m = _BARE_KEY.match(self.text, self.pos)
            if not m or not m.group().strip():
                raise _Odd
            key, end = m.group().strip(), m.end()
        after = self._key_sep(end)
        if after is None:
            return None
        self.pos = after
        return key

    def _string_start(self) -> bool | None:
        """Whether a string opens here (None: maybe, the text ends inside a <|"|>)."""
        head = self.text[self.pos : self.pos + len(QUOTE)]
        if head == QUOTE:
            self.pos += len(QUOTE)
            return True
        return None if QUOTE.startswith(head) else False

    def _string_more(self) -> bool:
        end = self.text.find(QUOTE, self.pos)
        if end >= 0:
            self.written += _dumps(self.text[self.pos : end])[1:-1]
            self.pos = end
            return self._end_string(len(QUOTE))
        text = self.text[self.pos :]
        held = next((n for n in range(len(QUOTE) - 1, 0, -1) if text.endswith(QUOTE[:n])), 0)  # part of a <|"|>
        self.written += _dumps(text[: len(text) - held])[1:-1]
        self.pos += len(text) - held
        return False

    def _scalar(self) -> bool:
        t, p = self.text, self.pos
        if _SCALAR_START.fullmatch(t, p):
            return False  # the number or word may go on
        m = _GEMMA_NUMBER.match(t, p)
        word = next((w for w in _WORDS if t.startswith(w, p)), None)
        end = m.end() if m else p + len(word) if word else -1
        if end < 0:
            raise _Odd  # a bare or double-quoted string: a drift the parser reads
        rest = t[end:].lstrip()
        if not rest:
            return False
        if rest[0] not in "," + self.stack[-1].closer:
            raise _Odd
        value = _WORDS[word] if word else float(m.group()) if m.group(1) or m.group(2) else int(m.group())
        self.pos, self.written = end, self.written + _dumps(value)
        self._after_value()
        return True


class CallFollower:
    """Follows the first call of one call body as it grows (see the module's docstring)."""

    def __init__(self, fmt: ChatFormat):
        self.fmt, self.name, self.echo = fmt, None, None

    def update(self, body: str) -> tuple[str, str] | None:
        if self.echo is None:
            try:
                head = self._head(body)
            except _Odd:
                head = None
            if head is None:
                return None
            self.name, start = head
            self.echo = _Gemma4Echo(start) if self.fmt.parse_calls is parse_gemma4_call else _JsonEcho(start)
        return self.name, self.echo.feed(body)

    def _head(self, body: str) -> tuple[str, int] | None:
        """The call's name and where its arguments object opens, once both are there."""
        if self.fmt.parse_calls is parse_gemma4_call:
            m = _GEMMA_HEAD.match(body)
            return (m.group(1).strip(), m.end() - 1) if m and m.group(1).strip() else None
        if self.fmt.parse_calls is None:
            return None
        return _json_head(body, many=self.fmt.parse_calls is parse_json_calls)


def _json_head(body: str, many: bool) -> tuple[str, int] | None:
    """For `{"name": ..., "arguments": {...}}` (for `many` also a list of them, or several joined by ';', after an
    optional <|python_tag|>): the name and the position of the arguments' '{', once both came in this order
    (another order, or other keys, and the call is sent whole when it is complete)."""

    def ws(i: int) -> int:
        while i < len(body) and body[i].isspace():
            i += 1
        return i

    def string(i: int) -> tuple[str, int] | None:
        m = _JSON_STRING.match(body, i)
        return (_decode(m.group()), ws(m.end())) if m and m.group(2) else None

    pos = ws(0)
    if many and body.startswith("<|python_tag|>", pos):
        pos = ws(pos + len("<|python_tag|>"))
    if many and body.startswith("[", pos):
        pos = ws(pos + 1)
    if not body.startswith("{", pos):
        return None
    pos, name = ws(pos + 1), None
    while (key := string(pos)) and body.startswith(":", key[1]):
        pos = ws(key[1] + 1)
        if key[0] in ("arguments", "parameters"):
            return (name, pos) if name and body.startswith("{", pos) else None
        value = string(pos) if key[0] == "name" else None
        if value is None or not body.startswith(",", value[1]):
            return None
        name, pos = value[0].strip() or None, ws(value[1] + 1)
    return None
