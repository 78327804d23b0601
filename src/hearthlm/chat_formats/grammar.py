"""Tool calls as grammars: each family's call syntax, with every call's arguments held to its tool's JSON schema,
written in llguidance's Lark dialect for the engine's constrained decoding (engine/guided.py).

`tool_grammar(fmt, tools, literal, required=...)`:
- required: the reply is one or more calls (OpenAI's tool_choice "required", or a named function);
- not required ("auto"): free text, and once the model opens a call (its opening marker is a token of its own),
  the call is held to the declared tools and their schemas. Families whose calls have no such marker (Llama 3's
  bare JSON) get no grammar in that mode.
`literal(text)` turns a marker into a Lark atom for the model's tokenizer (a special token by id).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from . import ChatFormat

__all__ = ["tool_grammar"]

_FREE_TEXT = "/(?s:.*)/"
_COMPACT = {"whitespace_flexible": False}  # JSON without runs of whitespace for a sampler to wander into


def tool_grammar(
    fmt: ChatFormat, tools: list[dict[str, Any]], literal: Callable[[str], str], *, required: bool, parallel: bool
) -> str | None:
    """The Lark grammar of `fmt`'s replies that call `tools` (OpenAI tool dicts); None where there is none.
    `parallel` False: one call at most (OpenAI's parallel_tool_calls)."""
    functions = [t["function"] for t in tools]
    if not functions:
        return None
    if fmt.name == "gemma4":
        rules = _Gemma4Args(literal('<|"|>'))
        calls = [f'"call:" {json.dumps(f["name"])} {rules.value(_params(f))}' for f in functions]
        call = f"call: {literal(fmt.call[0])} ({' | '.join(calls)}) {literal(fmt.call[1])}"
        return _top(call, "call+" if parallel else "call", required) + rules.text()
    calls = _json_calls(functions, "parameters" if fmt.name == "llama3" else "arguments")
    schema = json.dumps({**calls, "x-guidance": _COMPACT})
    if fmt.name in ("qwen", "qwen3"):
        call = f'call: {literal(fmt.call[0])} "\\n" %json {schema} "\\n" {literal(fmt.call[1])}'
        return _top(call, 'call ("\\n" call)*' if parallel else "call", required)
    if fmt.name == "mistral":
        many = {"type": "array", "items": calls, "minItems": 1, "x-guidance": _COMPACT}
        many = json.dumps(many if parallel else {**many, "maxItems": 1})
        return _top(f"call: {literal(fmt.call[0])} %json {many}", "call", required)
    if fmt.name == "llama3" and required:
        return f"start: %json {schema}\n"
    return None


def _top(call_rule: str, calls: str, required: bool) -> str:
    head = calls if required else f"{_FREE_TEXT} ({calls})?"
    return f"start: {head}\n{call_rule}\n"


def _params(function: dict[str, Any]) -> dict[str, Any]:
    return _closed(function.get("parameters") or {"type": "object", "properties": {}})


def _closed(schema: Any) -> Any:
    """A call's arguments hold what the tool declares: objects that list properties and say nothing of others
    get additionalProperties false (as OpenAI's strict function calling has it), at every depth."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    literal = ("const", "enum", "default", "examples", "properties")  # values, not schemas (properties: below)
    out = {k: (v if k in literal else _closed(v)) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def _json_calls(functions: list[dict[str, Any]], args_key: str) -> dict[str, Any]:
    """One JSON call {"name": ..., args_key: {...}} to any of `functions`, each with its own arguments schema."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, args_key: _params(f)},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


class _Gemma4Args:
    """Lark rules for Gemma 4's argument syntax, built from a JSON schema: objects with bare keys in sorted order
    (as its chat template writes them), strings between <|"|> tokens, JSON numbers, booleans and null. Held to
    the schema: types, required and optional properties (undeclared ones are never written), enums and consts,
    string lengths, numeric bounds, array items, anyOf / oneOf. Not held (the value's syntax only): string
    patterns and $ref."""

    def __init__(self, quote: str):
        self.quote = quote
        self.rules: dict[str, str] = {}

    def text(self) -> str:
        base = {
            "g_str": f"{self.quote} /(?s:.*)/ {self.quote}",  # any text: the quote is a token of its own
            "g_any": 'g_str | G_NUM | "true" | "false" | "null" | g_list | g_obj',
            "g_list": '"[" (g_any ("," g_any)*)? "]"',
            "g_obj": '"{" (G_KEY ":" g_any ("," G_KEY ":" g_any)*)? "}"',
        }
        lines = [f"{name}: {body}" for name, body in {**base, **self.rules}.items()]
        lines += [
            r"G_NUM: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
            r"G_KEY: /[A-Za-z_][A-Za-z0-9_.\-]*/",
        ]
        return "\n".join(lines) + "\n"

    def _rule(self, body: str) -> str:
        name = f"g_{len(self.rules)}"
        self.rules[name] = body
        return name

    def value(self, schema: Any) -> str:
        """The Lark expression for one value of `schema`."""
        if not isinstance(schema, dict):
            return "g_any"
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self._rule(" | ".join(self.value(s) for s in schema[key]))
        if "const" in schema:
            return self._literal(schema["const"])
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self._rule(" | ".join(self._literal(v) for v in schema["enum"]))
        kind = schema.get("type") or ("object" if "properties" in schema else None)
        if isinstance(kind, list):
            return self._rule(" | ".join(self.value({**schema, "type": k}) for k in kind))
        return self._typed(kind, schema)

    def _typed(self, kind: str | None, schema: dict[str, Any]) -> str:
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number", "boolean", "null"):  # written as in JSON: llguidance's JSON holds bounds
            return self._rule(f"%json {json.dumps(schema)}")
        if kind == "array":
            item = self.value(schema.get("items", {}))
            return self._rule(f'"[" ({item} ("," {item})*)? "]"')
        if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
            return self._object(schema)
        if kind == "object":
            return "g_obj"
        return "g_any"

    def _string(self, schema: dict[str, Any]) -> str:
        low, high = schema.get("minLength"), schema.get("maxLength")
        if not isinstance(low, int) and not isinstance(high, int):
            return "g_str"
        bounds = f"{low if isinstance(low, int) else 0},{high if isinstance(high, int) else ''}"
        return self._rule(f"{self.quote} /(?s:.{{{bounds}}})/ {self.quote}")

    def _literal(self, value: Any) -> str:
        if isinstance(value, str):
            return f"{self.quote} {json.dumps(value)} {self.quote}" if value else f"{self.quote} {self.quote}"
        if isinstance(value, bool) or value is None:
            return json.dumps(json.dumps(value))
        if isinstance(value, (int, float)):
            return json.dumps(str(value))
        return "g_any"

    def _object(self, schema: dict[str, Any]) -> str:
        """{k1:v1,k2:v2} in sorted key order; required keys always, the others optional, commas only between.

        Built from the last property back: after[i] is what may follow once an earlier property was written
        (",k_i:v_i" then after[i+1], or, k_i being optional, after[i+1] alone); first[i] is what may start the
        object (k_i:v_i then after[i+1], or, k_i being optional, first[i+1]). No rule matches the empty text:
        where a part may be left out, its use is marked optional instead."""
        required = set(schema.get("required") or [])
        after: tuple[str, bool] = ("", True)  # (rule, may be empty)
        first: tuple[str, bool] = ("", True)
        for key, sub in sorted(schema["properties"].items(), reverse=True):
            pair, tail = f"{json.dumps(key + ':')} {self.value(sub)}", _use(*after)
            step, lead = _seq('","', pair, tail), _seq(pair, tail)
            if key in required:
                after, first = (self._rule(step), False), (self._rule(lead), False)
            else:
                after = (self._rule(" | ".join(x for x in (step, after[0]) if x)), True)
                first = (self._rule(" | ".join(x for x in (lead, first[0]) if x)), True)
        return self._rule(_seq('"{"', _use(*first), '"}"'))


def _use(rule: str, may_be_empty: bool) -> str:
    return f"({rule})?" if rule and may_be_empty else rule


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)
