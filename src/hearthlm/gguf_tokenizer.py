"""Tokenizer from a GGUF file's tokenizer metadata (the `tokenizer.ggml.*` keys), tokenizing as llama.cpp does.

A GGUF file carries no tokenizer.json: it stores the vocabulary, its scores or merges and the special token
ids, under llama.cpp's key names. `tokenizer_from_gguf` rebuilds from them a `tokenizers.Tokenizer` that
splits text into the ids llama.cpp's `llama_tokenize` gives for the same vocabulary (src/llama-vocab.cpp),
and wraps it in our `Tokenizer` with the chat template, the special tokens and the ids that end generation.

Four vocabulary kinds (`tokenizer.ggml.model`):

- "llama", SentencePiece-style BPE (Llama 2, Mistral, Gemma 1-3, Phi-3). llama.cpp starts from the text's
  characters, spaces written "▁" and, with `add_space_prefix`, a "▁" put in front of every piece of text
  that starts the input or follows a special token; it then merges the adjacent pair whose concatenation
  is the vocabulary token of highest score, again and again, and spells characters the vocabulary lacks
  as <0xXX> byte tokens. That is BPE whose merges are every split of a token into two tokens, ranked by
  the score of the token they make, which is what we build. Ties between different tokens of equal score
  are where the two can part: llama.cpp takes the leftmost pair, BPE the lower-ranked merge. We rank
  equal-score merges longer left piece first, which reproduces llama.cpp on the only ties real
  vocabularies have (the "▁▁", "▁▁▁", ... run tokens that share the score -1e9 in Llama 2's).
- "gpt2", byte-level BPE with the file's merges (Llama 3, Qwen 2/2.5/3, SmolLM, Mistral Nemo, ...): the
  text is split by the regular expressions llama.cpp picks by `tokenizer.ggml.pre` (PRE_TOKENIZERS; an
  unknown name is an error, as it is in llama.cpp: a wrong split silently degrades every prompt), its
  bytes written in GPT-2's byte alphabet, and each piece merged by merge rank. No Unicode normalization,
  as in llama.cpp (Qwen's tokenizer.json applies NFC, so transformers can differ on text not in NFC).
- "gemma4", BPE over characters with the file's merges (Gemma 4): spaces written "▁" (no prefix space),
  the text split only into runs of newlines and runs of other characters (`tokenizer.ggml.pre` is ignored,
  as llama.cpp ignores it), characters the vocabulary lacks spelled as <0xXX> byte tokens. A BOS is always
  added, as llama.cpp forces it (chat prompts rendered with their own <bos> get no second one).
- "bert", WordPiece (BERT-style embedding models such as bge; llama.cpp's WPM tokenizer, see `_wordpiece`):
  the text normalised as BertNormalizer does (control characters dropped; with the default options accents
  stripped and lowercased), split at whitespace, every punctuation character, ASCII symbol and CJK ideograph
  made a word of its own, "▁" put in front of every word, and each word taken apart greedily, longest
  vocabulary piece first (word-start pieces are stored "▁piece", continuations bare, not "##"); a word with
  a position no piece matches becomes the one unknown token. With add_special_tokens the ids are
  [CLS] ... [SEP], which llama.cpp adds whatever the file's add_bos / add_sep flags say.

Special tokens follow llama.cpp's token types (`tokenizer.ggml.token_type`): control and unknown tokens
are special (recognised in text by `encode`, as llama.cpp's parse_special=true does, and dropped by
`decode(skip_special_tokens=True)`); user-defined tokens are always recognised in text and decoded as
text; the rest are plain vocabulary. llama.cpp's adjustments by token text are applied too: end-of-turn
tokens such as <|im_end|> become control tokens, and generation stops on llama.cpp's end-of-generation
set (eos, eot, eom, the FIM pad/repo/separator tokens and the tokens it recognises by name).

What can differ from llama.cpp (corner cases that neither llama.cpp's test vectors nor ours reach):
- Equal-score merges between different tokens other than "▁" runs (see above); a merge in the file
  whose pieces or result are not in the vocabulary (llama.cpp applies it and then spells the unknown
  result in bytes; we drop it); a SentencePiece token containing a character that is not a token.
- Overlapping special tokens: llama.cpp matches them longest token first over the whole text, we
  leftmost-longest (different only when a shorter special token overlaps the start of a longer one).
- Characters whose Unicode category llama.cpp's tables and the Oniguruma regex engine disagree on
  (code points unassigned in one Unicode version, for instance). For WordPiece, checked code point by
  code point against a transcription of llama.cpp's preprocess: 64 code points new in Unicode 16 (U+0897,
  U+1B4E, U+10D69, ...), marks or punctuation to llama.cpp, unassigned to the regex engine, so kept in
  their word where llama.cpp drops them or splits there.
- Decoding follows tokenizer.json's decoders (as transformers decodes), not llama.cpp's detokenizer:
  one leading space of the decoded text is dropped for SentencePiece vocabularies even after a skipped
  <s>, and llama.cpp's `clean_up_tokenization_spaces` pass (" ," -> ",") is not applied; unused tokens
  (type 5) decode to their text, where llama.cpp writes nothing. WordPiece decodes as llama.cpp's
  detokenizer does, clean-up included, except that the text's leading space (the first word's "▁",
  which llama_detokenize keeps) is dropped; the streaming Detokenizer, which decodes a window of recent
  ids, can miss a clean-up whose text spans the window's start (BERT-style models do not generate).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from .tokenizer import Tokenizer

__all__ = ["GGUFTokenizerError", "PRE_TOKENIZERS", "build_hf_tokenizer", "tokenizer_from_gguf"]


class GGUFTokenizerError(ValueError):
    """GGUF tokenizer metadata we cannot build a tokenizer from: an unsupported `tokenizer.ggml.model` or
    `tokenizer.ggml.pre`, or missing or inconsistent keys."""


# llama.cpp's llama_token_type, the values of tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

MODELS = ("gpt2", "llama", "gemma4", "bert")

# -- pre-tokenizers (byte-level BPE) --------------------------------------------------------------
# The regular expressions of llama-vocab.cpp's llm_tokenizer_bpe, applied one after the other: each
# splits every piece the previous ones made, keeping both its matches and the text between them. Where
# llama.cpp rewrote a tokenizer.json pattern for its regex engine (case-insensitive groups spelled out,
# \p{Lu}-style classes as lookaheads over ASCII case) we use its rewrite, since that is what it runs.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_THEN_LOWER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_UPPER_RUN = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = _UPPER_THEN_LOWER + "|" + _UPPER_RUN + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    _UPPER_THEN_LOWER
    + _CONTRACTIONS
    + "?|"
    + _UPPER_RUN
    + _CONTRACTIONS
    + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CJK = "[一-龥ࠀ-一가-퟿]+"  # as llama.cpp writes it: CJK ideographs, a wide range below them, Hangul
# deepseek-llm's letters: tokenizer.json's cased-letter classes, spelled out as ranges as llama.cpp does.
_DEEPSEEK_LETTERS = "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"


@dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole, unmerged
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_DEFAULT = _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_GROUPS: list[tuple[tuple[str, ...], _Pre]] = [
    (("default",), _DEFAULT),
    (
        (
            *("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0"),
            *("mellum", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"),
        ),
        _Pre((_GPT2,)),
    ),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _Pre((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    (("dbrx", "smaug-bpe"), _Pre((_LLAMA3,))),
    (
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        _Pre((_QWEN2,)),
    ),
    (("qwen35",), _Pre((_QWEN35,))),
    (
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
        _Pre((r"\p{N}", _GPT2)),
    ),
    (("falcon",), _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))),
    (("tekken",), _Pre((_TEKKEN,), ignore_merges=True, add_bos=True)),
    (
        ("deepseek-llm",),
        _Pre(("[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK, r"\p{N}+")),
    ),
    (("deepseek-coder",), _Pre(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"))),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _Pre((_GPT4O,))),
]
# tokenizer.ggml.pre -> how llama.cpp splits text for that byte-level vocabulary.
PRE_TOKENIZERS: dict[str, _Pre] = {name: pre for names, pre in _GROUPS for name in names}

# -- llama.cpp's adjustments by token text (llama_vocab::impl::load) --------------------------------
_EOT_NAMES = {
    *("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"),
    *("_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
}
_FIM_NAMES = {
    "fim_pre": {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>"},
    "fim_suf": {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>"},
    "fim_mid": {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>"},
    "fim_pad": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"},
    "fim_rep": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
    "fim_sep": {"<|file_sep|>"},
}
_FIM_NAMES["fim_pre"] |= {"<|code_prefix|>", "<|prefix|>"}
_FIM_NAMES["fim_suf"] |= {"<|code_suffix|>", "<|suffix|>"}
_FIM_NAMES["fim_mid"] |= {"<|code_middle|>", "<|middle|>"}
_EOG_NAMES = {
    *("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>"),
    *("<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]"),
    *("<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"),
    *("<｜end▁of▁sentence｜>", "[e~["),
}
_ALWAYS_RENDERED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}  # gpt-oss: user-defined
# every token text _Vocab._adjust looks for
_NAMED = _EOT_NAMES | {"<|eom_id|>"} | set().union(*_FIM_NAMES.values()) | _EOG_NAMES | _ALWAYS_RENDERED

_SPECIAL_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
_SPECIAL_IDS |= {"unk": "unknown_token_id", "pad": "padding_token_id"}
_SPECIAL_IDS |= {"sep": "seperator_token_id", "mask": "mask_token_id"}  # "seperator": llama.cpp's spelling
_SPECIAL_IDS |= {f"fim_{k}": f"fim_{k}_token_id" for k in ("pre", "suf", "mid", "pad", "rep", "sep")}
_DEPRECATED_FIM = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id", "fim_mid": "middle_token_id"}


def tokenizer_from_gguf(metadata: Mapping[str, Any], where: str) -> Tokenizer:
    """Our Tokenizer for the vocabulary in a GGUF file's metadata (GGUF key -> plain Python value: str,
    int, float, bool or lists of them). `where` names the file in error messages. Raises
    GGUFTokenizerError for a vocabulary it cannot rebuild exactly (see the module docstring)."""
    vocab = _Vocab.read(metadata, where)
    special = {
        name: vocab.tokens[token_id]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unk"), ("pad_token", "pad"))
        + (("cls_token", "bos"), ("sep_token", "sep"), ("mask_token", "mask"))
        if (token_id := vocab.ids.get(key)) is not None
    }
    templates = {}
    for key, value in metadata.items():
        if isinstance(value, str) and (key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")):
            name = "default" if key == "tokenizer.chat_template" else key.removeprefix("tokenizer.chat_template.")
            templates[name] = (value, f"{where} ({key})")
    return Tokenizer.from_parts(_build(vocab), special, templates, where, end_ids=vocab.end_of_generation)


def build_hf_tokenizer(metadata: Mapping[str, Any], where: str) -> _HFTokenizer:
    """The `tokenizers.Tokenizer` alone. Its `encode(text, add_special_tokens)` is llama.cpp's
    `llama_tokenize(text, add_special, parse_special=True)`; set `encode_special_tokens = True` on it for
    parse_special=False (control tokens in the text are then tokenized as text)."""
    return _build(_Vocab.read(metadata, where))


# -- reading the metadata ------------------------------------------------------------------------
@dataclass
class _Vocab:
    where: str
    model: str
    tokens: list[str]
    index: dict[str, int]  # token -> id (tokens are unique)
    scores: list[float]
    types: list[int]  # llama.cpp's token attribute after its adjustments, as a token type
    merges: list[tuple[str, str]]
    pre: _Pre | None
    ids: dict[str, int | None]
    add_bos: bool
    add_eos: bool
    add_sep: bool
    lowercase: bool  # this and strip_accents: WordPiece only
    strip_accents: bool
    add_space_prefix: bool
    rstrip: set[int] = field(default_factory=set)
    end_of_generation: set[int] = field(default_factory=set)

    @classmethod
    def read(cls, metadata: Mapping[str, Any], where: str) -> _Vocab:
        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"tokenizer.ggml.{key}", default)

        model = get("model")
        if model is not None and not isinstance(model, str):
            raise GGUFTokenizerError(f"{where}: tokenizer.ggml.model is a {type(model).__name__}, not a name")
        if model is None:
            raise GGUFTokenizerError(f"{where}: no tokenizer.ggml.model: the file has no tokenizer")
        if model not in MODELS:
            what = "has no vocabulary" if model in ("no_vocab", "none") else "is not supported"
            raise GGUFTokenizerError(
                f"{where}: tokenizer.ggml.model {model!r} {what}; supported: "
                f"{', '.join(repr(m) for m in MODELS)} (SentencePiece-style, byte-level and Gemma 4 BPE vocabularies, "
                "WordPiece)"
            )
        pre = None
        if model == "gpt2":
            name = get("pre")
            if name is None:
                warnings.warn(
                    f"{where}: no tokenizer.ggml.pre; splitting text with llama.cpp's fallback 'default' "
                    "pre-tokenizer, which llama.cpp warns degrades generation (reconvert the model)",
                    stacklevel=3,
                )
                name = "default"
            if not isinstance(name, str) or name not in PRE_TOKENIZERS:
                raise GGUFTokenizerError(
                    f"{where}: tokenizer.ggml.pre {name!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}"
                )
            pre = PRE_TOKENIZERS[name]

        tokens = get("tokens")
        if not isinstance(tokens, Sequence) or isinstance(tokens, str) or not tokens:
            raise GGUFTokenizerError(f"{where}: no tokenizer.ggml.tokens: the file lists no vocabulary")
        if not all(map(isinstance, tokens, repeat(str))):
            raise GGUFTokenizerError(f"{where}: tokenizer.ggml.tokens is not a list of strings")
        n = len(tokens)
        tokens = [t if t != "" else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names them
        index = dict(zip(tokens, range(n)))
        if len(index) < n:
            _duplicate(tokens, where)
        scores = [float(s) for s in _array(get("scores"), n, "scores", where, [0.0] * n, (int, float))]
        types = [int(t) for t in _array(get("token_type"), n, "token_type", where, [NORMAL] * n, (int,))]
        _check_byte_tokens(tokens, types, where)

        merges: list[tuple[str, str]] = []
        if model in ("gpt2", "gemma4"):
            raw = get("merges")
            if raw is None:
                raise GGUFTokenizerError(f"{where}: no tokenizer.ggml.merges: a {model!r} vocabulary needs its merges")
            if not isinstance(raw, list) or not all(map(isinstance, raw, repeat(str))):
                raise GGUFTokenizerError(f"{where}: tokenizer.ggml.merges is not a list of strings")
            # as llama.cpp splits them: at the first space after the first character (a piece may start with one)
            merges = [(m[:cut], m[cut + 1 :]) for m in raw if (cut := m.find(" ", 1)) > 0]

        # Special token ids: llama.cpp's defaults per model, replaced by the file's when in range.
        spm = model == "llama"
        ids: dict[str, int | None] = dict.fromkeys(_SPECIAL_IDS)
        if spm:
            ids.update(bos=1, eos=2, unk=0)
        elif model == "gpt2":
            ids.update(bos=11, eos=11)
        elif model == "bert":
            ids.update(bos=101, unk=100, sep=102, pad=0, mask=103)  # BERT's [CLS], [UNK], [SEP], [PAD], [MASK]
        for name, key in _SPECIAL_IDS.items():
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
            value = get(key)
            if value is None and name in _DEPRECATED_FIM:
                value = get(_DEPRECATED_FIM[name])
            if _special_id(value, key, n, where) is not None:
                ids[name] = value
        add_bos = model in ("gemma4", "bert") or bool(get("add_bos_token", True if spm else pre.add_bos))
        add_eos = model != "bert" and bool(get("add_eos_token", False))
        add_sep = model == "bert"  # llama.cpp's WPM adds [CLS] and [SEP] ignoring add_bos / add_sep / add_eos
        if model == "bert":
            missing = [_SPECIAL_IDS[name] for name in ("bos", "sep", "unk") if ids[name] is None]
            if missing:  # llama.cpp asserts on them: [CLS], [SEP], and [UNK] for words it cannot spell
                raise GGUFTokenizerError(f"{where}: a 'bert' vocabulary needs {', '.join(missing)}, not set")
        for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids[name] is None:
                raise GGUFTokenizerError(
                    f"{where}: tokenizer.ggml.add_{name}_token is true, but {name}_token_id is not set"
                )
        # llama.cpp's BertNormalizer options: lowercase unless the file says not, strip accents when lowercasing.
        lowercase = bool(get("normalizer.lowercase", True))
        strip_accents = bool(get("normalizer.strip_accents", lowercase))

        vocab = cls(
            where=where,
            model=model,
            tokens=tokens,
            index=index,
            scores=scores,
            types=types,
            merges=merges,
            pre=pre,
            ids=ids,
            add_bos=add_bos,
            add_eos=add_eos,
            add_sep=add_sep,
            lowercase=lowercase,
            strip_accents=strip_accents,
            add_space_prefix=spm and bool(get("add_space_prefix", True)),  # only SentencePiece adds one
        )
        vocab._adjust(str(metadata.get("general.name", "")))
        return vocab

    def _adjust(self, model_name: str) -> None:
        """llama.cpp's corrections by token text: end-of-turn and FIM tokens become control tokens, the
        end-of-generation set, and the per-model exceptions it hard-codes."""
        types, tokens, ids = self.types, self.tokens, self.ids
        control = {i for i, t in enumerate(types) if t == CONTROL}
        # the tokens named below, in id order (each loop acts on these texts alone)
        named = sorted(i for text in _NAMED if (i := self.index.get(text)) is not None)
        for i in named:
            text = tokens[i]
            if text in _EOT_NAMES and ids["eot"] is None:
                ids["eot"] = i
                control.add(i)
            if text == "<|eom_id|>" and ids["eom"] is None:
                ids["eom"] = i
                control.add(i)
            for name, names in _FIM_NAMES.items():
                if text in names and ids[name] is None:
                    ids[name] = i
                    control.add(i)
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep")} - {None}
        for i in named:
            if tokens[i] in _EOG_NAMES:
                eog.add(i)
                control.add(i)
        user_defined = {i for i, t in enumerate(types) if t == USER_DEFINED}
        for i in named:
            if tokens[i] in _ALWAYS_RENDERED:
                control.discard(i)
                user_defined.add(i)
        eog |= {ids[k] for k in ("eos", "eot", "eom")} - {None}
        texts = {tokens[i]: i for i in eog}
        if "<|end|>" in texts and (
            ("<|return|>" in texts and "<|call|>" in texts)
            or ({"<|call|>", "<|calls|>"} & texts.keys() and "<|flush|>" in texts)
        ):
            end = texts["<|end|>"]  # o200k_harmony / solar-open: <|end|> ends a message, not generation
            eog.discard(end)
            control.discard(end)
            user_defined.add(end)
        if "<|tool_response>" in texts and "</s>" in texts:  # Gemma 4: </s> is ordinary text there
            s = texts["</s>"]
            eog.discard(s)
            control.discard(s)
            user_defined.discard(s)
            types[s] = NORMAL
        for i in control:
            types[i] = CONTROL if types[i] != UNKNOWN else UNKNOWN
        for i in user_defined:
            if i not in control:
                types[i] = USER_DEFINED
        self.end_of_generation = eog
        name = model_name.lower()
        if "phi-3" in name or "phi3" in name:  # llama.cpp strips the spaces after Phi-3's special tokens
            self.rstrip = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
            self.rstrip |= {i for i, t in enumerate(tokens) if t == "</s>"}
            self.rstrip -= {i for i, t in enumerate(tokens) if t in ("<unk>", "<s>", "<|endoftext|>")}


def _duplicate(tokens: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if (j := seen.setdefault(t, i)) != i:
            raise GGUFTokenizerError(f"{where}: duplicate token in the vocabulary: {t!r} has ids {j} and {i}")


def _array(value: Any, n: int, key: str, where: str, default: list, kinds: tuple[type, ...]) -> list:
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, kinds) for v in value):
        kind = " or ".join(k.__name__ for k in kinds)
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.{key} is not a list of {kind} values")
    if len(value) < n:
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.{key} has {len(value)} entries for {n} tokens")
    return list(value[:n])


def _special_id(value: Any, key: str, n: int, where: str) -> int | None:
    """A special token id from the file: an integer (else GGUFTokenizerError); one outside the vocabulary is
    ignored with a warning, as llama.cpp ignores it (converted files in the wild name a pad id past the end)."""
    if value is None:
        return None
    if type(value) is not int:
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.{key} = {value!r} is not a token id")
    if not 0 <= value < n:
        warnings.warn(
            f"{where}: tokenizer.ggml.{key} = {value} is outside the vocabulary ({n} tokens); ignored", stacklevel=4
        )
        return None
    return value


def _check_byte_tokens(tokens: list[str], types: list[int], where: str) -> None:
    """Tokens of type BYTE must be <0xXX>: each stands for that byte, and the decoder reads it from the text."""
    for i, t in enumerate(types):
        text = tokens[i]
        if t == BYTE and not (len(text) == 6 and text.startswith("<0x") and text.endswith(">") and _is_hex(text[3:5])):
            raise GGUFTokenizerError(
                f"{where}: token {i} {text[:20]!r} has type BYTE but is not written <0xXX>: the vocabulary is corrupt"
            )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# -- building the tokenizers.Tokenizer --------------------------------------------------------------
def _build(vocab: _Vocab) -> _HFTokenizer:
    tokens, index = vocab.tokens, vocab.index
    special = [i for i, t in enumerate(vocab.types) if t in (CONTROL, UNKNOWN, USER_DEFINED)]
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": i in vocab.rstrip,
            "normalized": False,
            "special": vocab.types[i] != USER_DEFINED,
        }
        for i in special
    ]
    unk = vocab.ids["unk"]
    model: dict[str, Any] = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": index,
    }
    if vocab.model == "llama":
        space = "▁"
        model.update(
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
            merges=_score_merges(tokens, vocab.scores, index),
        )
        steps = [{"type": "Replace", "pattern": {"String": " "}, "content": space}]
        if vocab.add_space_prefix:  # before every piece of text that starts the input or follows a token
            steps.insert(0, {"type": "Prepend", "prepend": space})
        normalizer: dict[str, Any] | None = {"type": "Sequence", "normalizers": steps}
        pre_tokenizer = None
        decoders = [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]
        if vocab.add_space_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder: dict[str, Any] = {"type": "Sequence", "decoders": decoders}
    elif vocab.model == "bert":
        model, normalizer, pre_tokenizer, decoder = _wordpiece(vocab)
    elif vocab.model == "gemma4":
        space = "▁"
        model.update(byte_fallback=True, merges=_valid_merges(vocab.merges, index))
        normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": space}
        split = {"type": "Split", "pattern": {"Regex": r"[^\n]+|\n+"}, "behavior": "Isolated", "invert": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split]}
        decoder = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": space}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        }
    else:
        assert vocab.pre is not None
        model.update(ignore_merges=vocab.pre.ignore_merges, merges=_valid_merges(vocab.merges, index))
        normalizer = None
        splits = [
            {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
            for r in vocab.pre.regexes
        ]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [*splits, byte_level]}
        decoder = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(vocab),
        "decoder": decoder,
        "model": model,
    }
    try:
        return _from_spec(spec)
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise GGUFTokenizerError(f"{vocab.where}: cannot build the tokenizer ({e})") from None


def _from_spec(spec: dict[str, Any]) -> _HFTokenizer:
    """The tokenizer a tokenizer.json `spec` describes. A BPE model's merges are given to it directly, not
    through JSON, which cost Gemma 4's 515k merges about 2 s more to write and parse. The vocabulary still goes
    through JSON, so that the added tokens are read against it as before (with an empty vocabulary there, they
    took the ids of other tokens)."""
    model = spec["model"]
    merges = model.get("merges")
    if model["type"] != "BPE" or not merges:
        return _HFTokenizer.from_str(json.dumps(spec))
    tok = _HFTokenizer.from_str(json.dumps({**spec, "model": {**model, "merges": []}}))
    options = {k: v for k, v in model.items() if k not in ("type", "vocab", "merges") and v is not None}
    tok.model = BPE(model["vocab"], merges, **options)
    return tok


# -- WordPiece (llama.cpp's WPM tokenizer, llm_tokenizer_wpm_session) ------------------------------------
# llama.cpp's character classes, as sets of code points: its whitespace (Unicode's White_Space), the
# control characters it drops (\p{Cc} less that whitespace, \p{Cf}, \p{Co}, NUL and U+FFFD; unassigned
# code points are kept, as llama.cpp keeps them), and the characters that are always a word of their own.
_WPM_SPACE = r"\t-\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"
_WPM_DROPPED = r"[\x00-\x08\x0E-\x1F\x7F-\x{84}\x{86}-\x{9F}\p{Cf}\p{Co}\x{FFFD}]"
# \p{P}, the ASCII symbols, and the CJK ideograph blocks of llama.cpp's is_chinese_char (which, as
# Hugging Face's BertNormalizer does, starts its fifth extension block at U+2B920, not U+2B820).
_WPM_CJK = (
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B920}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
_WPM_ALONE = rf"[\p{{P}}$+<=>^`|~{_WPM_CJK}]"
_WPM_WORD_START = "▁"  # in front of every word, and of word-start pieces in the vocabulary
# llama.cpp's clean_up_tokenization_spaces passes over the detokenized text, as literal replacements.
_WPM_CLEAN_UP = [(f" {c}", c) for c in "?!.,"] + [(" ' ", "'")] + [(f" '{s}", f"'{s}") for s in ("s", "m", "re", "ve")]


def _wordpiece(vocab: _Vocab) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """model, normalizer, pre-tokenizer and decoder reproducing llama.cpp's WPM tokenizer: its preprocess
    (normalise, split into words), then per word "▁" + word spelt greedily longest piece first."""
    space = _WPM_WORD_START
    model = {
        "type": "WordPiece",
        "unk_token": vocab.tokens[vocab.ids["unk"]],
        "continuing_subword_prefix": "",  # continuation pieces are stored bare; word starts carry the "▁"
        "max_input_chars_per_word": 1 << 62,  # llama.cpp has no such limit (tokenizers' default is 100)
        "vocab": {t: i for i, t in enumerate(vocab.tokens)},
    }
    split = {"type": "Split", "pattern": {"Regex": f"[{_WPM_SPACE}]+"}, "behavior": "Removed", "invert": False}
    alone = {"type": "Split", "pattern": {"Regex": _WPM_ALONE}, "behavior": "Isolated", "invert": False}
    # Metaspace puts "▁" in front of every word that does not start with one already; the normalizer
    # doubled a "▁" that starts a word, so such a word gets one more too, as llama.cpp gives it.
    meta = {"type": "Metaspace", "replacement": space, "prepend_scheme": "always", "split": False}
    pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, alone, meta]}
    # llama.cpp's detokenizer: "▁" is a space, then its clean_up_tokenization_spaces passes (" ," -> ",",
    # " ' " -> "'", " 's" -> "'s", ...); these are literal replacements over the whole text, as its loops are.
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": space}, "content": " "},
        {"type": "Fuse"},
        *({"type": "Replace", "pattern": {"String": old}, "content": new} for old, new in _WPM_CLEAN_UP),
        # The one leading space (the first word's "▁") is dropped, as transformers and llama-cpp-python's
        # Llama.detokenize after [CLS] drop it; llama.cpp's llama_detokenize itself keeps it for WPM.
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]
    return model, _wpm_normalizer(vocab), pre_tokenizer, {"type": "Sequence", "decoders": decoders}


def _wpm_normalizer(vocab: _Vocab) -> dict[str, Any]:
    """llama.cpp's WPM preprocess up to the split into words, which it does one code point at a time."""

    def replace(pattern: str, content: str = "") -> dict[str, Any]:
        return {"type": "Replace", "pattern": {"Regex": pattern}, "content": content}

    steps = []
    if vocab.strip_accents:
        # llama.cpp maps each code point to the first of its NFD decomposition and then drops accent marks
        # (\p{M}). Full NFD and dropping marks agree except for Hangul syllables, whose decomposition is all
        # letters: llama.cpp keeps only the leading consonant, so we map each syllable to it beforehand.
        steps += [
            replace(f"[{chr(0xAC00 + 588 * i)}-{chr(0xAC00 + 588 * i + 587)}]", chr(0x1100 + i)) for i in range(19)
        ]
        steps.append({"type": "NFD"})
    steps.append(replace(_WPM_DROPPED))
    if vocab.strip_accents:
        steps.append(replace(r"\p{M}"))
    if vocab.lowercase:
        if not vocab.strip_accents:  # llama.cpp lowercases one code point to one: "İ" to "i", not "i̇"
            steps.append(replace("İ", "i"))
        steps.append({"type": "Lowercase"})
    # A word that starts with "▁" itself: llama.cpp still puts one in front, Metaspace would not.
    steps.append(replace(f"(?:^|(?<=[{_WPM_SPACE}]|{_WPM_ALONE})){_WPM_WORD_START}", _WPM_WORD_START * 2))
    return {"type": "Sequence", "normalizers": steps}


def _score_merges(tokens: list[str], scores: list[float], index: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every way to cut a token into two tokens (`index`: token -> id), best score of the token they make first
    (ties: longer left piece, then longer right piece, then token order)."""
    found = []
    for i, t in enumerate(tokens):
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in index and right in index:
                found.append((-scores[i], -cut, cut - len(t), i, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _valid_merges(merges: list[tuple[str, str]], index: Mapping[str, int]) -> list[tuple[str, str]]:
    """The merges whose pieces and result are tokens, each at its first rank (llama.cpp keeps the first of a
    repeated merge)."""
    seen: set[tuple[str, str]] = set()
    first = seen.add  # returns None: `not first(p)` is true and records p
    return [
        p for p in merges if p[0] in index and p[1] in index and p[0] + p[1] in index and p not in seen and not first(p)
    ]


def _post_processor(vocab: _Vocab) -> dict[str, Any] | None:
    pieces: list[tuple[str, int]] = []
    if vocab.add_bos:
        pieces.append(("bos", vocab.ids["bos"]))
    pieces.append(("A", -1))
    if vocab.add_eos:
        pieces.append(("eos", vocab.ids["eos"]))
    if vocab.add_sep:
        pieces.append(("sep", vocab.ids["sep"]))
    if len(pieces) == 1:
        return None

    def sequence(seq: str, type_id: int) -> list[dict[str, Any]]:
        return [
            {"Sequence": {"id": seq, "type_id": type_id}}
            if name == "A"
            else {"SpecialToken": {"id": vocab.tokens[token_id], "type_id": type_id}}
            for name, token_id in pieces
        ]

    special = {
        vocab.tokens[token_id]: {"id": vocab.tokens[token_id], "ids": [token_id], "tokens": [vocab.tokens[token_id]]}
        for name, token_id in pieces
        if name != "A"
    }
    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": special,
    }
