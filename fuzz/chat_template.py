"""Fuzz target: the chat-template renderer (tokenizer.py in chat_sandbox.py's sandbox) on templates a fuzzer
assembles from Jinja fragments, escape attempts and plain text, with fuzzed messages and keywords. Allowed:
ChatTemplateError. Every render must end within the time limit (0.5 s here) and never print interpreter
internals (a module or builtins that the template text did not contain)."""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(__file__))
from harness import main  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models  # noqa: E402

with atheris.instrument_imports(include=["hearthlm", "jinja2"]):
    from hearthlm import chat_sandbox
    from hearthlm.tokenizer import ChatTemplateError, Tokenizer

chat_sandbox.MAX_SECONDS = 0.5
FRAGMENTS = [
    "{{ ", " }}", "{% ", " %}", "{% for m in messages %}", "{% endfor %}", "{% if ", "{% else %}", "{% endif %}",
    "{% set ns = namespace(x=", "{% set ns.x = ", "{% macro f(n) %}", "{% endmacro %}", "{% raw %}", "{% endraw %}",
    "{% generation %}", "{% endgeneration %}", "{% break %}", "{% continue %}", "{#", "#}",
    "m.content", "m['role']", "messages", "messages[0]", "loop.index", "loop.last", "loop(", "ns.x", "f(", "n",
    "add_generation_prompt", "bos_token", "eos_token", "tools", "documents", "extra",
    "|length", "|tojson", "|join(", "|center(", "|replace(", "|indent(", "|batch(", "|format(", "|list", "|trim",
    "|attr(", "|map(", "|selectattr(", "|first", "|string", "|int", "|sum", "|items",
    "range(", "namespace(", "dict(", "cycler(", "joiner(", "raise_exception(", "strftime_now(", "lipsum(",
    ".__class__", ".__globals__", ".__init__", ".__mro__", ".__subclasses__()", ".format(", ".center(", ".join(",
    "'a'", '"%s"', "'{:>9}'", "0", "1", "10", "99999", "10**9", "2", "-1", "True", "None", "[", "]", "(", ")",
    ",", ".", "*", "**", "+", "~", "%", "-", " and ", " or ", " not ", " in ", " is defined", "=", "==",
]  # fmt: skip
HF = HFTokenizer(models.WordLevel({"<s>": 0, "a": 1}, unk_token="<s>"))
LEAKS = ("<built-in function", "<module '", "'__builtins__':")  # what printing a function's globals shows


def _template(fdp: atheris.FuzzedDataProvider) -> str:
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 40)):
        parts.append(fdp.PickValueInList(FRAGMENTS) if fdp.ConsumeProbability() < 0.85 else fdp.ConsumeUnicode(4))
    return "".join(parts)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 5 if depth < 3 else 3)
    if kind == 0:
        return fdp.ConsumeUnicodeNoSurrogates(8)
    if kind == 1:
        return fdp.ConsumeInt(4)
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return None
    if kind == 4:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.ConsumeUnicodeNoSurrogates(4): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    template = _template(fdp)
    roles = ["system", "user", "assistant", "tool"]
    messages = [
        {"role": fdp.PickValueInList(roles), "content": _value(fdp)} for _ in range(fdp.ConsumeIntInRange(0, 4))
    ]
    tok = Tokenizer.from_parts(HF, {"bos_token": "<s>", "eos_token": "<s>"}, {"default": (template, "fuzz")}, "fuzz")
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=fdp.ConsumeBool(), extra=_value(fdp))
    except ChatTemplateError:
        return
    assert not any(leak in out and leak not in template for leak in LEAKS), out[:300]


def seeds():
    return [bytes(range(256)), b"\x00" * 64 + b"\x05" * 64, bytes(reversed(range(256))) * 2]


if __name__ == "__main__":
    main(test_one_input, seeds)
