"""Request pieces both APIs share: chat messages for the template, sampling parameters, token text."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..engine.sampler import SamplingParams
from .errors import APIError
from .media import message_content

_ROLES = {"system", "developer", "user", "assistant", "tool"}

# Bounds on request numbers, checked by the request models before anything is sized from them.
MAX_COUNT = 2**31 - 1  # tokens, top_k, dimensions, context: more is a 400
SEED = {"ge": -(2**63), "le": 2**63 - 1 - 16}  # torch's generator takes 64 bits; OpenAI adds the choice index
PENALTY = {"ge": 0.01, "le": 100.0}  # repetition penalty: past these, logits overflow float32
MAX_STOPS, MAX_STOP_CHARS = 16, 1024
# A chat message as /openapi.json states it (chat_messages reads it and checks the rest): a role and its content.
MESSAGE_SCHEMA = {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": sorted(_ROLES)}, "content": {"anyOf": [{"type": "string"}, {"type": "null"},
                                                                           {"type": "array", "items": {"type": "object"}}]}},
}  # fmt: skip
_GREEDY_BELOW = 1e-4  # a temperature under this samples as greedy does (logits / t would overflow float32)
_TOP_P_FLOOR = 1e-6  # a top_p under float32's reach keeps only the best token, as this does


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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise APIError(400, f"{where}: role must be one of {', '.join(sorted(_ROLES))}", f"{where}.role")
        msg = {k: v for k, v in m.items() if v is not None and k != "images"}
        msg["role"] = "system" if m["role"] == "developer" else m["role"]
        msg["content"] = message_content(m, where)  # text, or parts with images / audio
        calls = []
        if not isinstance(m.get("tool_calls") or [], list):
            raise APIError(400, f"{where}.tool_calls: must be a list of calls", f"{where}.tool_calls")
        for k, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, f"{where}.tool_calls.{k}: function.name is missing", f"{where}.tool_calls")
            call = {
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments(fn.get("arguments", {}), f"{where}.tool_calls.{k}.function"),
                },
            }
            if isinstance(c.get("id"), str) and c["id"]:
                call["id"] = c["id"]
                names[c["id"]] = fn["name"]
            calls.append(call)
        if calls:
            msg["tool_calls"] = calls
        if msg["role"] == "tool":
            name = m.get("tool_name") or m.get("name") or names.get(str(m.get("tool_call_id")))
            if isinstance(name, str) and name:
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
    if 0 < values.get("temperature", 1.0) < _GREEDY_BELOW:
        values["temperature"] = 0.0
    if 0 < values.get("top_p", 1.0) < _TOP_P_FLOOR:
        values["top_p"] = _TOP_P_FLOOR
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
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"at most {MAX_STOPS} stop strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s] or None


def token_text(model, token_id: int) -> str:
    """One token's text as logprobs report it (special tokens written out)."""
    return model.tokenizer.decode([token_id], skip_special_tokens=False)
