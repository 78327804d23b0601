"""Model reply formats: where a family's chat template puts reasoning and tool calls, picked from the template.

`detect(template_text)` names the format; `ReplyParser(fmt, tools=..., in_reasoning=...)` splits a streamed
reply into answer text, reasoning and ToolCalls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .calls import ToolCall, parse_gemma4_call, parse_json_call, parse_json_calls, short_call_id
from .parser import CallDelta, Delta, ReplyParser, parse_reply

__all__ = ["CallDelta", "ChatFormat", "Delta", "ReplyParser", "ToolCall", "detect", "parse_reply", "FORMATS"]


@dataclass(frozen=True)
class ChatFormat:
    """The markers of one family's replies. `think`: (open, close) of the reasoning block; `call`: (open,
    close) around one tool call, close None meaning "to the end of the reply"; `bare_json`: the reply itself
    may be a JSON call (Llama 3); `markers`: every marker, so that decoding keeps them when they are
    special tokens."""

    name: str
    think: tuple[str, str] | None = None
    call: tuple[str, str | None] | None = None
    parse_calls: Callable[[str], list[ToolCall]] | None = None
    bare_json: bool = False
    new_call_id: Callable[[], str] | None = None

    @property
    def markers(self) -> tuple[str, ...]:
        pairs = [*(self.think or ()), *(self.call or ())]
        extra = ['<|"|>'] if self.name == "gemma4" else (["<|python_tag|>"] if self.bare_json else [])
        return tuple(m for m in [*pairs, *extra] if m)

    def opens_reasoning(self, prompt: str) -> bool:
        """Whether the rendered prompt ends inside an open reasoning block (the reply starts in it)."""
        if not self.think:
            return False
        return prompt.rfind(self.think[0]) > prompt.rfind(self.think[1])


FORMATS: dict[str, ChatFormat] = {
    "plain": ChatFormat("plain"),
    "gemma4": ChatFormat(
        "gemma4", think=("<|channel>thought", "<channel|>"), call=("<|tool_call>", "<tool_call|>"),
        parse_calls=parse_gemma4_call,
    ),
    "qwen": ChatFormat("qwen", call=("<tool_call>", "</tool_call>"), parse_calls=parse_json_call),
    "qwen3": ChatFormat(
        "qwen3", think=("<think>", "</think>"), call=("<tool_call>", "</tool_call>"), parse_calls=parse_json_call
    ),
    "llama3": ChatFormat("llama3", parse_calls=parse_json_calls, bare_json=True),
    "mistral": ChatFormat(
        "mistral", call=("[TOOL_CALLS]", None), parse_calls=parse_json_calls, new_call_id=short_call_id
    ),
}  # fmt: skip


def detect(template: str | None) -> ChatFormat:
    """The reply format a chat template teaches its model; "plain" (no reasoning, no tool calls) if unknown."""
    t = template or ""
    if "<|tool_call>" in t:
        return FORMATS["gemma4"]
    if "<tool_call>" in t:
        return FORMATS["qwen3" if "</think>" in t else "qwen"]
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if "<|start_header_id|>" in t and '"parameters"' in t:
        return FORMATS["llama3"]
    return FORMATS["plain"]
