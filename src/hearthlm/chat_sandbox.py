"""The sandbox chat templates render in.

A chat template is code from whoever made the model file (a GGUF's `tokenizer.chat_template`, a
checkpoint's tokenizer_config.json), so it runs in Jinja's immutable sandbox: no attributes that start
with an underscore (no walk to `__globals__` or `__mro__`), no unsafe callables, no mutation of what it is
given. The sandbox stops code from getting out; it does not stop a template from using up the machine, so
this module adds the limits:

- size: no string or list a template builds (by `*`, `+`, `~`, `%`, str methods and filters that pad or
  repeat) may exceed MAX_CHARS, checked before it is built; nor may the rendered text;
- time: the render stops after MAX_SECONDS (a trace function counts the template's steps and calls and looks
  at the clock; it stays off when a debugger or coverage tool already traces the thread);
- `**` on integers is refused when the result would exceed MAX_POWER_BITS bits.

A limit hit raises TemplateLimitError; tokenizer.py turns every failure into a ChatTemplateError.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_CHARS = 8_000_000  # characters (or items) of any string or list a template builds, and of its output
MAX_SECONDS = 2.0  # wall-clock time of one render
MAX_POWER_BITS = 4096  # the size of an integer `**` may make
_PADDING_METHODS = {"center", "ljust", "rjust", "zfill"}  # str methods whose first argument is a width
_WIDTHS = re.compile(r"(\d+)")  # widths and precisions in %-formats and {:...} specs


class TemplateLimitError(Exception):
    """A chat template went over a size or time limit (MAX_CHARS, MAX_SECONDS, MAX_POWER_BITS)."""


class TemplateRaised(Exception):
    """A template called raise_exception(message): it refuses the conversation."""


def render(template: jinja2.Template, variables: dict[str, Any], seconds: float | None = None) -> str:
    """The template's text for these variables, within the limits (`seconds`: MAX_SECONDS unless given); raises
    what the template raised."""
    out: list[str] = []
    size = 0
    with _deadline(MAX_SECONDS if seconds is None else seconds):
        for chunk in template.generate(**variables):
            size += len(chunk)
            _bounded(size, "the rendered text")
            out.append(chunk)
    return "".join(out)


def compile_template(text: str) -> jinja2.Template:
    """Compile a template in the sandbox (jinja2.TemplateSyntaxError for broken syntax)."""
    return _environment().from_string(text)


# -- limits ---------------------------------------------------------------------------------------
def _bounded(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateLimitError(f"{what} would have {n:,} characters or items, more than the limit of {MAX_CHARS:,}")


def _check_widths(fmt: str, what: str) -> None:
    """Refuse a format string whose widths or precisions would pad past the limit ('%9999999999s')."""
    for digits in _WIDTHS.findall(fmt):
        if len(digits) > 12 or int(digits) > MAX_CHARS:
            raise TemplateLimitError(f"{what}: a width of {digits} is more than the limit of {MAX_CHARS:,}")


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) is not None and isinstance(n, int):
                _bounded(_size(seq) * max(n, 0), "a repeated string or list")
    elif operator == "+" and _size(left) is not None and _size(right) is not None:
        _bounded(_size(left) + _size(right), "a joined string or list")
    elif operator == "%" and isinstance(left, str):
        _check_widths(left, "a %-format")
        args = right if isinstance(right, tuple) else (right,)
        if "*" in left and any(isinstance(a, int) and a > MAX_CHARS for a in args):
            raise TemplateLimitError(f"a %-format's * width is more than the limit of {MAX_CHARS:,}")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * abs(left).bit_length() > MAX_POWER_BITS:
            raise TemplateLimitError(f"{left} ** {right} would have more than {MAX_POWER_BITS} bits")


def _check_str_call(method: Callable, args: tuple, kwargs: dict) -> None:
    """The str methods that can build far more text than their inputs hold."""
    text, name = method.__self__, getattr(method, "__name__", "")
    width = args[0] if args else kwargs.get("width")
    if name in _PADDING_METHODS and isinstance(width, int):
        _bounded(width, f"str.{name}()")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _bounded(len(text) * max(tab, 1) if isinstance(tab, int) else len(text), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _bounded(_replaced_size(text, args[0], args[1]), "str.replace()")
    elif name == "join" and args:
        _bounded(_joined_size(text, args[0]), "str.join()")


def _replaced_size(text: str, old: str, new: str) -> int:
    count = text.count(old) if old else len(text) + 1
    return len(text) + count * max(len(new) - len(old), 0)


def _joined_size(sep: str, items: Any) -> int:
    if not isinstance(items, list | tuple):
        return 0  # an iterator: counted as it is built, by the deadline
    return len(sep) * max(len(items) - 1, 0) + sum(len(i) if isinstance(i, str) else 0 for i in items)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Stop the render after `seconds`: a trace function looks at the clock every 256 calls and steps (lines)
    of the template's own code (its macros included), so loops and recursion both run into it."""
    if sys.gettrace() is not None:  # a debugger or coverage tool: leave its tracing alone
        yield
        return
    end = time.monotonic() + seconds
    steps = 0

    def tick() -> None:
        nonlocal steps
        steps += 1
        if steps & 255 == 0 and time.monotonic() > end:
            raise TemplateLimitError(f"the chat template ran for more than {seconds:g} s (a loop or recursion bomb?)")

    def line(frame: Any, event: str, arg: Any) -> Any:
        tick()
        return line

    def call(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != "<template>":
            return None  # Jinja's and Python's own code: bounded by the size limits
        tick()
        return line

    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(None)


# -- the environment (the one transformers builds, written anew, with the limits) ------------------
class _LimitedCodeGenerator(CodeGenerator):
    """`a ~ b` calls environment.concat, which checks the size before it joins."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _LimitedCodeGenerator

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if isinstance(getattr(__obj, "__self__", None), str):
            _check_str_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_widths(value.__self__, "str.format()")
        return wrapped

    def concat(self, parts: tuple) -> str:
        texts = [p if isinstance(p, str) else str(p) for p in parts]
        _bounded(sum(len(t) for t in texts), "a ~ concatenation")
        return "".join(texts)


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which chat prompts must keep as they are.
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimitError(f"tojson(indent={indent}): an indent over 64 is refused")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    _bounded(len(text), "tojson()")
    return text


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Namespace(Namespace):
    """namespace() that refuses underscore names, so a template cannot reach interpreter internals, and values
    over the size limit."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        if _size(value) is not None:
            _bounded(_size(value), f"namespace value {name!r}")
        super().__setitem__(name, value)


class _Dict:
    """`dict` for templates: calls and fromkeys, without the type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _limited_filters(filters: dict[str, Callable]) -> dict[str, Callable]:
    """Jinja's filters that pad, repeat or fill, with their sizes checked first."""
    center, indent, replace, join = filters["center"], filters["indent"], filters["replace"], filters["join"]
    batch, slice_, fmt = filters["batch"], filters["slice"], filters["format"]

    def checked_center(value: Any, width: int = 80) -> str:
        _bounded(width, "center()")
        return center(value, width)

    def checked_indent(s: str, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        n = width if isinstance(width, int) else len(str(width))
        _bounded(n * (str(s).count("\n") + 1) + len(str(s)), "indent()")
        return indent(s, width, *args, **kwargs)

    def checked_replace(ctx: Any, s: Any, old: str, new: str, count: int | None = None) -> str:
        _bounded(_replaced_size(str(s), str(old), str(new)), "replace()")
        return replace(ctx, s, old, new, count)

    def checked_join(ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
        items = list(value)
        _bounded(len(str(d)) * max(len(items) - 1, 0) + sum(len(str(i)) for i in items), "join()")
        return join(ctx, items, d, attribute)

    def checked_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
        _bounded(linecount, "batch()")
        return batch(value, linecount, fill_with)

    def checked_slice(value: Any, slices: int, fill_with: Any = None) -> Any:
        _bounded(slices, "slice()")
        return slice_(value, slices, fill_with)

    def checked_format(value: str, *args: Any, **kwargs: Any) -> str:
        _check_binop("%", str(value), args or kwargs)
        return fmt(value, *args, **kwargs)

    for new, old in ((checked_replace, replace), (checked_join, join)):
        new.jinja_pass_arg = old.jinja_pass_arg  # these take the evaluation context first, as Jinja's do
    return dict(center=checked_center, indent=checked_indent, replace=checked_replace, join=checked_join,
                batch=checked_batch, slice=checked_slice, format=checked_format)  # fmt: skip


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters.update(_limited_filters(env.filters), tojson=_tojson)
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) writes n paragraphs; no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict())
    env.globals["namespace"] = _Namespace
    return env
