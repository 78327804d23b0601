"""Splits a streamed reply into answer text, reasoning and tool calls, holding back partial markers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .calls import CallCutOff, CallSyntaxError, ToolCall, call_id
from .streaming import CallFollower

if TYPE_CHECKING:
    from . import ChatFormat


@dataclass
class CallDelta:
    """A piece of one tool call as it streams. The first piece of call `index` (its number in the reply) has its
    `id` and `name`; each piece adds `arguments`, a piece of the arguments' JSON text; the last has `done` and
    `call`, the parsed ToolCall (None if the call's text did not parse in the end). The pieces of a call that
    parsed concatenate to exactly `call.arguments_json`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    done: bool = False
    call: ToolCall | None = None


@dataclass
class Delta:
    """What one piece of reply text adds: answer text, reasoning text, complete tool calls (`tool_calls`) and
    the same calls as they stream (`calls`)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.calls)

    def add(self, other: Delta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        for d in other.calls:
            self.add_call(d)

    def continued_calls(self) -> list[CallDelta]:
        """Pieces of a call that an earlier Delta started: they come before this Delta's text (which may follow
        the call's end); the calls it starts come after its text."""
        return [d for d in self.calls if d.name is None]

    def new_calls(self) -> list[CallDelta]:
        return [d for d in self.calls if d.name is not None]

    def add_call(self, d: CallDelta) -> None:
        """Append `d`, merged into the last piece when both belong to the same call."""
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == d.index and not last.done:
            last.arguments += d.arguments
            last.done, last.call = d.done, d.call
        else:
            self.calls.append(replace(d))


@dataclass
class _Live:
    """The call being streamed: its number in the reply, id, and the arguments text sent so far."""

    index: int
    id: str
    sent: str = ""


def held_back(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that starts one of `markers`: held back, as the marker may follow."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class ReplyParser:
    """Feed text pieces with `feed()`, then `finish()`; each returns the Delta they complete.

    States: "content" (answer text), "reasoning" (inside the thinking block), "call" (inside a tool-call
    marker pair), "json" (a Llama 3 reply that is a bare JSON call: held to the end). A call whose body does
    not parse is returned as answer text, markers included, so nothing the model wrote is lost.

    After `finish()`, `unfinished_call` says whether the reply ended inside a tool call it never finished
    (its end marker never came, or the call that runs to the end of the reply stops inside a string, object
    or list): that call's text came back as answer text, and a reply cut by max_tokens can say so."""

    def __init__(self, fmt: ChatFormat, tools: bool = False, in_reasoning: bool = False):
        self.fmt = fmt
        self.tools = tools and fmt.parse_calls is not None
        self.state = "reasoning" if in_reasoning else "content"
        self.buf = ""
        self._lstrip = in_reasoning  # strip whitespace at the start of the next block
        self._started = False  # any answer text out yet (a bare JSON call must open the reply)
        self._last_call: tuple[str, str] | None = None  # the call just returned, while nothing else followed it
        self._last_args: tuple[str, str] | None = None  # its name and arguments_json
        self._live: _Live | None = None  # the call streaming now
        self._follower: CallFollower | None = None  # reads the call's text so far
        self._count = 0  # calls streamed so far
        self.unfinished_call = False

    def feed(self, text: str) -> Delta:
        self.buf += text
        out = Delta()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> Delta:
        out = Delta()
        while self._step(out, final=True):
            pass
        return out

    # -- states ----------------------------------------------------------------------------------
    def _step(self, out: Delta, final: bool) -> bool:
        return getattr(self, "_" + self.state)(out, final)

    def _openers(self) -> list[str]:
        found = [self.fmt.think[0]] if self.fmt.think else []
        return found + ([self.fmt.call[0]] if self.tools and self.fmt.call else [])

    def _content(self, out: Delta, final: bool) -> bool:
        if self.tools and self.fmt.bare_json and not self._started:
            head = self.buf.lstrip()
            if head.startswith(("{", "[", "<|python_tag|>")):
                self.state = "json"
                return True
            if "<|python_tag|>".startswith(head) and not final:  # nothing yet, or maybe the tag
                return False
        openers = self._openers()
        hits = [(i, m) for m in openers if (i := self.buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            self._emit_content(out, self.buf[:i])
            self.buf = self.buf[i + len(marker) :]
            self.state = "reasoning" if self.fmt.think and marker == self.fmt.think[0] else "call"
            self._lstrip = True
            return True
        keep = 0 if final else held_back(self.buf, openers)
        self._emit_content(out, self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep :]
        return False

    def _emit_content(self, out: Delta, text: str) -> None:
        if self._lstrip:
            text = text.lstrip()
            self._lstrip = not text
        if text:
            self._started, self._last_call, self._last_args = True, None, None
            out.content += text

    def _reasoning(self, out: Delta, final: bool) -> bool:
        end = self.fmt.think[1]
        i = self.buf.find(end)
        if i >= 0:
            self._emit_reasoning(out, self.buf[:i].rstrip())
            self.buf = self.buf[i + len(end) :]
            self.state, self._lstrip = "content", True
            return True
        if final:
            self._emit_reasoning(out, self.buf.rstrip())
            self.buf = ""
            return False
        # Hold back a partial end marker and trailing whitespace (dropped if the block ends there).
        n = len(self.buf) - held_back(self.buf, [end])
        n = len(self.buf[:n].rstrip())
        self._emit_reasoning(out, self.buf[:n])
        self.buf = self.buf[n:]
        return False

    def _emit_reasoning(self, out: Delta, text: str) -> None:
        if self._lstrip:
            text = text.lstrip()
            self._lstrip = not text
        if text:
            self._last_call = self._last_args = None
        out.reasoning += text

    def _call(self, out: Delta, final: bool) -> bool:
        start, end = self.fmt.call
        i = self.buf.find(end) if end else -1
        if i < 0 and not final:
            self._stream(out, self.buf[: len(self.buf) - held_back(self.buf, [end])] if end else self.buf)
            return False
        body = self.buf[:i] if i >= 0 else self.buf
        self.buf = self.buf[i + len(end) :] if i >= 0 else ""
        cut = end is not None and i < 0  # the reply ended before the call's end marker
        self._take_calls(out, body, start + body + (end if i >= 0 else ""), cut=cut, to_end=end is None)
        self.state, self._lstrip = "content", True
        return True

    def _json(self, out: Delta, final: bool) -> bool:
        if not final:
            self._stream(out, self.buf)
            return False
        body, self.buf = self.buf, ""
        self._take_calls(out, body, body, cut=False, to_end=True)
        self.state = "content"
        return False

    def _stream(self, out: Delta, body: str) -> None:
        """Send what is certain of the first call in `body`, the text of a call so far (later calls in the same
        body are sent whole when it is complete)."""
        self._follower = self._follower or CallFollower(self.fmt)
        found = self._follower.update(body)
        if found is None:
            return
        name, args = found
        live = self._live
        if live is None:
            last = self._last_args
            if last is not None and last[0] == name and last[1].startswith(args):
                return  # may be the same call again (a repetition loop, dropped once complete): wait
            new_id = self.fmt.new_call_id() if self.fmt.new_call_id else call_id()
            live = self._live = _Live(self._count, new_id)
            self._count += 1
            out.add_call(CallDelta(live.index, id=live.id, name=name))
        if len(args) > len(live.sent) and args.startswith(live.sent):
            out.add_call(CallDelta(live.index, arguments=args[len(live.sent) :]))
            live.sent = args

    def _take_calls(self, out: Delta, body: str, raw: str, cut: bool, to_end: bool) -> None:
        """`cut`: the reply ended before the call's end marker; `to_end`: the call runs to the end of the reply
        by design (Mistral, Llama 3), so the reply's end is its end."""
        live, self._live, self._follower = self._live, None, None
        try:
            calls = self.fmt.parse_calls(body, closed=not cut)
        except CallSyntaxError as e:
            if live is not None:  # its start was sent: it ends, unparsed
                out.add_call(CallDelta(live.index, done=True))
            # Never dropped, never an empty call: the text as written. A call that runs to the end of the
            # reply is unfinished when its text stops inside it (CallCutOff), not when it is just malformed.
            self.unfinished_call = cut or (to_end and isinstance(e, CallCutOff))
            self._lstrip = False
            self._emit_content(out, raw)
            return
        for k, c in enumerate(calls):
            # A model in a repetition loop writes the same call (name and arguments) again and again, in one
            # marker pair or in consecutive ones, until max_tokens: it is returned once. An identical call
            # directly after the same one is taken as that loop, never as a second request (text or
            # reasoning in between makes it a new call).
            key = (c.name, json.dumps(c.arguments, sort_keys=True))
            streamed = live if k == 0 else None
            if key == self._last_call:
                if streamed is not None:  # the loop's call, in another key order: it ends, as an unparsed one
                    out.add_call(CallDelta(streamed.index, done=True))
                continue
            self._last_call, self._last_args = key, (c.name, c.arguments_json)
            c.id = self.fmt.new_call_id() if self.fmt.new_call_id else c.id
            out.add_call(self._ending(c, streamed))
            out.tool_calls.append(c)

    def _ending(self, c: ToolCall, live: _Live | None) -> CallDelta:
        """The last piece of call `c`, or the whole of it when none was sent yet."""
        if live is None:
            self._count += 1
            return CallDelta(self._count - 1, c.id, c.name, c.arguments_json, done=True, call=c)
        c.id = live.id
        final = c.arguments_json
        # The readers in streaming.py only write what json.dumps writes, so `sent` is a prefix of `final`.
        rest = final[len(live.sent) :] if final.startswith(live.sent) else ""
        return CallDelta(live.index, arguments=rest, done=True, call=c)


def parse_reply(fmt: ChatFormat, text: str, tools: bool = False, in_reasoning: bool = False) -> Delta:
    """A whole reply at once."""
    p = ReplyParser(fmt, tools, in_reasoning)
    out = p.feed(text)
    out.add(p.finish())
    return out
