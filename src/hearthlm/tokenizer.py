"""Tokenizer: a checkpoint's tokenizer.json through the `tokenizers` library, its Jinja chat template
(rendered the way Hugging Face renders it), the tokens that end a turn, and incremental detokenization
for streaming."""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as _HFTokenizer

from .chat_sandbox import TemplateLimitError, TemplateRaised, compile_template, render

# The named special tokens a template sees (bos_token, eos_token, ...), as transformers passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Special tokens that end a model's turn. generation_config.json lists them for most checkpoints, but not
# all (base-model configs, GGUF conversions), so generation also stops on any of these the vocabulary has.
END_OF_TURN_TOKENS = (
    "<turn|>",  # Gemma 4
    "<|tool_response>",  # Gemma 4: after a tool call the model hands the turn to the caller
    "<end_of_turn>",  # Gemma 2 / 3
    "<|im_end|>",  # ChatML: Qwen
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1+: end of a tool-calling message
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",  # Qwen / GPT-style end of document
    "<|end|>",  # Phi-3
)


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile, or refuses the conversation."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        super().__init__(message)
        self.source = source
        self.line = line


class Tokenizer:
    """Text <-> token ids, plus the chat template and stop tokens of one checkpoint."""

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: the model folder needs a tokenizer.json to encode text")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"{file}: cannot read tokenizer ({e})") from None
        folder = file.parent
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        self._setup(_special_tokens(config), _find_templates(folder, config, config_file), folder)

    @classmethod
    def from_parts(
        cls,
        tok: _HFTokenizer,
        special_tokens: Mapping[str, str],
        templates: Mapping[str, tuple[str, str]],
        source: str | Path,
        end_ids: Iterable[int] = (),
    ) -> Tokenizer:
        """A tokenizer built in memory rather than read from a folder (e.g. from a GGUF file's metadata):
        `special_tokens` as in tokenizer_config.json ({"bos_token": "<s>", ...}), `templates` name ->
        (template text, where it came from), `source` names the origin in error messages, `end_ids` are
        extra ids that end generation."""
        self = cls.__new__(cls)
        self._tok = tok
        self._setup(dict(special_tokens), dict(templates), source, end_ids)
        return self

    def _setup(self, special_tokens: dict[str, str], templates, folder, end_ids: Iterable[int] = ()) -> None:
        self.special_tokens: dict[str, str] = special_tokens
        self._templates = templates
        self._compiled: dict[str, jinja2.Template] = {}
        self._folder = folder
        added = self._tok.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.added_ids: frozenset[int] = frozenset(added)  # special or not: each is one id, never split
        # Byte-fallback tokens (<0xE4>): the decoder turns a whole run of them into text at once.
        byte_fallback = "ByteFallback" in repr(self._tok.decoder)
        byte_ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if byte_fallback else ()
        self.byte_ids: frozenset[int] = frozenset(i for i in byte_ids if i is not None)
        self._byte_level = "ByteLevel" in repr(self._tok.decoder)  # GPT-2 style: each byte is one character
        turn_ends = [t for t in END_OF_TURN_TOKENS if self._tok.token_to_id(t) in self.special_ids]
        eos = self.special_tokens.get("eos_token")
        self._end_ids = {self._tok.token_to_id(t) for t in [*turn_ends, eos] if t} - {None} | set(end_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token(self, token_id: int) -> str | None:
        """The token's string in the vocabulary; None for an id the tokenizer does not know."""
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, for byte-level vocabularies (GPT-2 style BPE) and byte-fallback tokens
        (<0xE4>); None for other tokens and unknown ids. (A token may hold part of a UTF-8 character.)"""
        token = self.token(token_id)
        if token is None:
            return None
        if token_id in self.byte_ids:
            return bytes([int(token[3:5], 16)])
        if self._byte_level and token_id not in self.added_ids:
            table = _byte_level_table()
            return bytes(table[c] for c in token) if all(c in table for c in token) else None
        return None

    def backend_json(self) -> str:
        """The whole tokenizer as `tokenizers` JSON (what grammar engines build their token tables from)."""
        return self._tok.to_str()

    def stop_token_ids(self, eos_token_ids: Iterable[int] = ()) -> set[int]:
        """The ids that end generation: the model's `eos_token_ids` (config.json / generation_config.json),
        the tokenizer's eos token, and the end-of-turn special tokens (END_OF_TURN_TOKENS) in its vocabulary."""
        return set(eos_token_ids) | self._end_ids

    def detokenizer(self, skip_special_tokens: bool = True) -> Detokenizer:
        """A fresh incremental decoder for one stream of generated ids."""
        return Detokenizer(self, skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def chat_template(self, with_tools: bool = False) -> str | None:
        """The text of the template apply_chat_template uses (None when there is none), e.g. to learn the
        model's reply format (hearthlm.chat_formats.detect)."""
        try:
            return self._templates[self._template_name(with_tools)][0]
        except ChatTemplateError:
            return None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kw: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers' `apply_chat_template(...,
        tokenize=False)` does. `tools` are JSON-schema dicts; extra keywords (enable_thinking, ...) reach the
        template as variables. Raises ChatTemplateError naming the template when it cannot render."""
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}})")
        name = self._template_name(tools is not None)
        template, source = self._compile(name), self._templates[name][1]
        try:
            variables = {
                "documents": None,
                **self.special_tokens,
                **_plain(kw),
                "messages": _chat_messages(messages),
                "tools": _plain(tools),
                "add_generation_prompt": add_generation_prompt,
            }
        except RecursionError:
            raise ValueError("chat messages, tools or template keywords are nested too deeply") from None
        try:
            return render(template, variables)
        except TemplateRaised as e:
            line = _template_line(e)
            raise ChatTemplateError(f"{_where(source, line)}: the chat template refused: {e}", source, line) from None
        except TemplateLimitError as e:
            line = _template_line(e)
            raise ChatTemplateError(
                f"{_where(source, line)}: the chat template was stopped: {e}", source, line
            ) from None
        except Exception as e:  # anything the template's code hits: undefined names, type errors, sandbox
            line = _template_line(e)
            message = f"{_where(source, line)}: cannot render the chat template ({type(e).__name__}: {e})"
            raise ChatTemplateError(message, source, line) from None

    def encode_chat(self, rendered: str) -> list[int]:
        """Encode a rendered chat. Templates write their own special tokens; the post-processor's (a
        leading bos) are added only when the text does not already start with the bos token."""
        bos = self.bos_token
        return self.encode(rendered, add_special_tokens=not (bos and rendered.startswith(bos)))

    def _template_name(self, with_tools: bool) -> str:
        if not self._templates:
            raise ChatTemplateError(
                f"{self._folder}: the model has no chat template (no chat_template.jinja, and no chat_template "
                "in tokenizer_config.json); give a plain prompt to generate() instead",
                str(self._folder),
            )
        if with_tools and "tool_use" in self._templates:
            return "tool_use"
        if "default" in self._templates:
            return "default"
        names = ", ".join(sorted(self._templates))
        raise ChatTemplateError(f"{self._folder}: several chat templates ({names}) and none named 'default'")

    def _compile(self, name: str) -> jinja2.Template:
        if name not in self._compiled:
            text, source = self._templates[name]
            try:
                self._compiled[name] = compile_template(text)
            except jinja2.TemplateSyntaxError as e:
                message = f"{_where(source, e.lineno)}: chat template syntax error: {e.message}"
                raise ChatTemplateError(message, source, e.lineno) from None
            except (RecursionError, MemoryError, SyntaxError, ValueError) as e:  # nesting too deep to compile
                message = f"{source}: the chat template cannot be compiled ({type(e).__name__}: {e})"
                raise ChatTemplateError(message, source) from None
        return self._compiled[name]


class Detokenizer:
    """Incremental decoding for streaming: `push(id)` returns the text the new token adds (possibly ""),
    `flush()` the rest. The pieces concatenate to exactly `tokenizer.decode(ids)`.

    Each step decodes a short window, `ids[prefix:]` against `ids[prefix:read]`: text up to `read` is out,
    and `prefix` lags one emission behind so that SentencePiece tokens keep their leading space. Text that
    ends in U+FFFD (an incomplete UTF-8 sequence) is held back until the character completes. A run of
    byte-fallback tokens (<0xE4><0xB8><0x80>) is held until a token ends it, because the decoder turns the
    whole run into U+FFFDs if any byte in it is invalid; held tokens cost nothing until then, so the work
    per token stays constant on average."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it completes ("" while text is held back)."""
        self.ids.append(token_id)
        tok = self.tokenizer
        if (self.skip_special_tokens and token_id in tok.special_ids) or tok.token(token_id) is None:
            return ""  # adds no text (decode skips ids past the vocabulary, e.g. a model's padded rows)
        if token_id in tok.byte_ids:
            return ""  # inside a byte-fallback run: decoded when the run ends
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character or byte run at the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=skip)
        text = decode(self.ids[self._prefix :], skip_special_tokens=skip)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + n): b for n, b in enumerate(moved)})
    return table


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, a tokenizer.json file, or a .gguf file (a whole model or a
    vocabulary-only file: only its tokenizer.ggml.* metadata is read)."""
    path = Path(path)
    if path.is_file() and (path.suffix.lower() == ".gguf" or _is_gguf(path)):
        from .gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf
        from .weights.gguf import GGUFFile

        metadata = GGUFFile(path).metadata
        if "tokenizer.ggml.model" not in metadata:
            raise GGUFTokenizerError(f"{path}: this GGUF file holds no vocabulary (no tokenizer.ggml.model key)")
        return tokenizer_from_gguf(metadata, str(path))
    return Tokenizer(path)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# -- reading the checkpoint --------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):  # a serialized AddedToken: {"content": "<bos>", "lstrip": false, ...}
        value = value.get("content")
    return None if value is None else str(value)


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    named = {k: config.get(k) for k in SPECIAL_TOKEN_NAMES}
    extra = config.get("extra_special_tokens")  # transformers 5: model-specific named tokens
    if isinstance(extra, Mapping):
        named.update(extra)
    return {k: text for k, v in named.items() if (text := _token_text(v)) is not None}


def _find_templates(folder: Path, config: dict[str, Any], config_file: Path) -> dict[str, tuple[str, str]]:
    """name -> (template text, where it came from). Template files take priority over tokenizer_config.json,
    as in transformers; a multimodal checkpoint may keep its template in chat_template.json."""
    templates = {}
    if (file := folder / "chat_template.jinja").exists():
        templates["default"] = (file.read_text(encoding="utf-8"), str(file))
    for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[file.stem] = (file.read_text(encoding="utf-8"), str(file))
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None and (file := folder / "chat_template.json").exists():
        value, config_file = _read_json(file).get("chat_template"), file
    if isinstance(value, str):
        return {"default": (value, f"{config_file} (chat_template)")}
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        return {t["name"]: (t["template"], f"{config_file} (chat_template '{t['name']}')") for t in value}
    return {}


# -- errors from the template ---------------------------------------------------------------------
def _template_line(error: BaseException) -> int | None:
    # Jinja rewrites tracebacks so that template code shows as frames of "<template>" at template lines.
    lines = [n for f, n in traceback.walk_tb(error.__traceback__) if f.f_code.co_filename == "<template>"]
    return lines[-1] if lines else None


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line else source


# -- template inputs -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Plain JSON-like data for the template (dicts, lists, scalars): pydantic models and dataclasses
    are converted, so the sandbox never sees their methods."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def _chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """As transformers does: drop keys whose value is None (OpenAI clients send content=None with tool
    calls) and give a message's reasoning under every name templates read it by."""
    out = []
    for m in _plain(list(messages)):
        if not isinstance(m, dict):
            raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out
