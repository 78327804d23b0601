"""Request pieces both APIs share: chat messages for the template, sampling parameters, token text."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..engine.sampler import SamplingParams
from .errors import APIError

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or OpenAI's list of parts of which only text is supported."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append(str(part.get("text", "")))
            else:
                raise APIError(400, f"{where}: content parts of type {kind!r} are not supported (text only)", where)
        return "".join(out)
    raise APIError(400, f"{where}: content must be a string or a list of text parts", where)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):  # OpenAI sends arguments as a JSON string; templates need the object
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise APIError(400, f"{where}: arguments are not valid JSON", where) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object", where)
    return value


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages of either API as the chat template reads them (transformers' conventions): text content,
    tool-call arguments as objects, a tool result's function name under "name"."""
    out, names = [], {}
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise APIError(400, f"{where}: role must be one of {', '.join(sorted(_ROLES))}", f"{where}.role")
        if m.get("images"):
            raise APIError(400, f"{where}: images are not supported", f"{where}.images")
        msg = {k: v for k, v in m.items() if v is not None and k != "images"}
        msg["role"] = "system" if m["role"] == "developer" else m["role"]
        msg["content"] = _text(m.get("content"), f"{where}.content") or ""
        calls = []
        for k, c in enumerate(m.get("tool_calls") or []):
            fn = (c or {}).get("function") or {}
            if not isinstance(fn.get("name"), str):
                raise APIError(400, f"{where}.tool_calls.{k}: function.name is missing", f"{where}.tool_calls")
            call = {
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments(fn.get("arguments", {}), f"{where}.tool_calls.{k}.function"),
                },
            }
            if c.get("id"):
                call["id"] = c["id"]
                names[c["id"]] = fn["name"]
            calls.append(call)
        if calls:
            msg["tool_calls"] = calls
        if msg["role"] == "tool":
            name = m.get("tool_name") or m.get("name") or names.get(m.get("tool_call_id"))
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def one_constraint(asked: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """The constraint a request asks for, as SamplingParams fields: `asked` lists (request field, kind, value)
    for every constraining field the request set, kind one of json_schema, regex, choice, grammar. Two are a
    400 naming both fields."""
    if len(asked) > 1:
        fields = " and ".join(f for f, _, _ in asked)
        raise APIError(400, f"{fields} each constrain the reply: give only one", asked[1][0])
    return {kind: value for _, kind, value in asked}


_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


def make_params(**kw: Any) -> SamplingParams:
    """SamplingParams from the given values (None: the default); its checks become 400s."""
    values = {k: v for k, v in kw.items() if v is not None}
    missing = sorted(k for k in values if k not in _PARAM_NAMES)
    if missing:
        raise APIError(400, f"not supported by this engine: {', '.join(missing)}", missing[0])
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), None, "invalid_value") from None


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise APIError(400, "at most 16 stop strings", "stop")
    return [s for s in stops if s] or None


def token_text(model, token_id: int) -> str:
    """One token's text as logprobs report it (special tokens written out)."""
    return model.tokenizer.decode([token_id], skip_special_tokens=False)
