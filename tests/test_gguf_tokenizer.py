"""Tokenizers built from GGUF tokenizer metadata: llama.cpp's own test vectors (SentencePiece-style vocabularies),
byte-level BPE against the tokenizers.Tokenizer a GGUF vocabulary was converted from (also through a real GGUF
file), special tokens as llama.cpp treats them, and the errors for vocabularies we cannot rebuild."""

from __future__ import annotations

import functools
import json
import lzma
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from hearthlm import load_tokenizer
from hearthlm.gguf_tokenizer import PRE_TOKENIZERS, GGUFTokenizerError, build_hf_tokenizer, tokenizer_from_gguf
from hearthlm.weights.gguf import GGUFFile

SHIPPED = Path(__file__).parent / "data" / "llama_cpp"  # llama.cpp's vocabulary files, xz-compressed, and vectors
DEMO = Path(__file__).parents[1] / "src" / "hearthlm" / "demo" / "hearth-demo"
# Every vocabulary llama.cpp ships test vectors for (its models/ggml-vocab-NAME.gguf + .inp / .out).
LLAMA_CPP_VOCABS = sorted(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.xz") for p in SHIPPED.glob("*.xz"))
SPM_VOCABS = ["llama-spm", "phi-3"]
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata as plain Python values (the header's GGUF.* fields left out)."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@functools.cache
def _unpacked() -> Path:
    return Path(tempfile.mkdtemp(prefix="hearthlm-vocab-"))


@functools.cache
def vocab_file(name: str) -> Path:
    """llama.cpp's ggml-vocab-NAME.gguf, decompressed from tests/data once per run, beside its .inp / .out."""
    path = _unpacked() / f"ggml-vocab-{name}.gguf"
    path.write_bytes(lzma.decompress((SHIPPED / f"{path.name}.xz").read_bytes()))
    for ext in (".inp", ".out"):
        shutil.copy(SHIPPED / f"{path.name}{ext}", _unpacked() / f"{path.name}{ext}")
    return path


@functools.cache
def _vocab(name: str) -> tuple[dict[str, Any], Any]:
    path = vocab_file(name)
    metadata = dict(GGUFFile(path).metadata)  # the loader's reader: the gguf package's takes 30 s on Gemma 4's
    return metadata, tokenizer_from_gguf(metadata, str(path))


def vocab_metadata(name: str) -> dict[str, Any]:
    return dict(_vocab(name)[0])


def vocab_tokenizer(name: str):
    return _vocab(name)[1]


def llama_cpp_vectors(name: str) -> list[tuple[str, list[int]]]:
    """NAME.gguf.inp / .out as llama.cpp's test-tokenizer-0 reads them: inputs separated by
    "\\n__ggml_vocab_test__\\n", one line of expected ids per input."""
    base = vocab_file(name)
    raw = Path(f"{base}.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw.split(sep)
    if raw.endswith(sep):
        inputs.pop()
    lines = Path(f"{base}.out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(inputs)
    return [(text, [int(i) for i in line.split()]) for text, line in zip(inputs, lines)]


def test_testdata_is_found():
    assert len(LLAMA_CPP_VOCABS) == 15 and {"deepseek-llm", "deepseek-coder", *SPM_VOCABS} <= set(LLAMA_CPP_VOCABS)
    for name in LLAMA_CPP_VOCABS:
        for suffix in (".xz", ".inp", ".out"):
            assert (SHIPPED / f"ggml-vocab-{name}.gguf{suffix}").is_file(), f"missing {name}{suffix} in {SHIPPED}"


# -- llama.cpp's own vectors, for every vocabulary it ships them with ------------------------------------
@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vectors(name):
    """test-tokenizer-0 tokenizes with add_special=false (no BOS in the .out files) and parse_special=false;
    no input holds a control token's text, so our parse_special=true encode must give the same ids. Decoding
    gives the text back (SentencePiece's decoder drops the prefix space it added, byte tokens fuse into
    characters), except where the vocabulary itself loses information (WordPiece lowercases and drops accents
    and whitespace: there llama.cpp's detokenizer is the reference, see the WordPiece tests)."""
    tok = vocab_tokenizer(name)
    vectors = llama_cpp_vectors(name)
    assert len(vectors) >= 46
    specials = [tok.token(i) for i in tok.special_ids]
    assert not any(s and s in text for text, _ in vectors for s in specials)
    failed = [(text, ids, got) for text, ids in vectors if (got := tok.encode(text, add_special_tokens=False)) != ids]
    assert not failed, f"{len(failed)} of {len(vectors)} vectors differ: {failed[:3]}"
    if vocab_metadata(name)["tokenizer.ggml.model"] != "bert":
        assert [tok.decode(ids) for _, ids in vectors] == [text for text, _ in vectors]


def test_spm_special_tokens_bos_and_decode():
    tok = vocab_tokenizer("llama-spm")
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    # control tokens in the text are single ids, and the text after each gets the prefix space again
    assert tok.encode("<s>Hello</s> world", add_special_tokens=False) == [1, 15043, 2, 29871, 3186]
    assert tok.encode("Hello world") == [1, 15043, 3186]  # add_bos_token: true
    assert tok.encode("") == [1]
    assert tok.decode([1, 15043, 2, 3186]) == "Hello world"
    assert tok.decode([1, 15043, 2], skip_special_tokens=False) == "<s> Hello</s>"
    assert tok.stop_token_ids() == {2}
    assert len(tok.byte_ids) == 256  # <0x00>..<0xFF>: the streaming detokenizer holds byte runs
    detok = tok.detokenizer()
    ids = tok.encode(" this is 🦙.cpp", add_special_tokens=False)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == tok.decode(ids) == " this is 🦙.cpp"


def test_spm_parse_special_false_tokenizes_control_tokens_as_text():
    path = vocab_file("llama-spm")
    hf = build_hf_tokenizer(vocab_metadata("llama-spm"), str(path))
    hf.encode_special_tokens = True  # llama.cpp's parse_special=false
    ids = hf.encode("<s>Hello", add_special_tokens=False).ids
    assert 1 not in ids and hf.decode(ids) == "<s>Hello"


def test_spm_add_bos_and_add_space_prefix_follow_the_metadata():
    metadata = vocab_metadata("llama-spm") | {
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    tok = tokenizer_from_gguf(metadata, "no-bos.gguf")
    assert tok.encode("Hello") == [10994, 2]  # "Hello" without "▁", then eos
    assert tok.decode(tok.encode(" Hello world")) == " Hello world"  # no prefix space to strip


def test_phi3_special_tokens_chat_template_and_stops():
    """llama.cpp strips the whitespace after Phi-3's special tokens (general.name says phi3) and stops on
    <|end|> and <|endoftext|> (eos)."""
    tok = vocab_tokenizer("phi-3")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert rendered == "<s><|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert tok.encode_chat(rendered) == [1, 32010, 6324, 727, 32007, 32001]  # one <s>: the template wrote it
    assert {32000, 32007} <= tok.stop_token_ids()
    assert tok.decode([1, 32010, 6324, 727, 32007, 32001]) == "Hi there"


# -- byte-level BPE: converted as llama.cpp's convert_hf_to_gguf.py does, checked against the original ------
def _looks_special(text: str) -> bool:  # convert_hf_to_gguf.py's does_token_look_special
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def gguf_metadata_from_hf(hf: HFTokenizer, pre: str, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.ggml.* metadata for a byte-level BPE tokenizers.Tokenizer, as convert_hf_to_gguf.py writes it
    (get_vocab_base, gguf-py's SpecialVocab): every id in order, holes as UNUSED [PADn], added tokens as
    CONTROL (special, or looking special) or USER_DEFINED, spelled as text; merges as "left right"."""
    spec = json.loads(hf.to_str())
    vocab = hf.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    added = hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(reverse) + 1):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            text = added[i].content
            if not added[i].normalized:
                text = hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            tokens.append(text)
            types.append(CONTROL if added[i].special or _looks_special(text) else USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(NORMAL)
    single = (spec.get("post_processor") or {}).get("single", [])
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
        "tokenizer.ggml.add_bos_token": bool(single) and "SpecialToken" in single[0],
        "tokenizer.chat_template": config["chat_template"],
    }
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        metadata[f"tokenizer.ggml.{name}_token_id"] = vocab[config[key]]
    return metadata


def demo_tokenizer(pre: str = "gpt-2") -> HFTokenizer:
    """The demo model's byte-level BPE tokenizer, plus one user-defined (non-special) added token; for
    `pre` other than "gpt-2", split as that family's tokenizer.json does (regex as transformers has it)."""
    spec = json.loads((DEMO / "tokenizer.json").read_text(encoding="utf-8"))
    if pre != "gpt-2":
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS[pre]},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
        spec["model"]["ignore_merges"] = pre == "llama-bpe"  # as in Llama 3's tokenizer.json
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.add_tokens([AddedToken("<note>", special=False, normalized=False)])
    return hf


def demo_config() -> dict[str, Any]:
    return json.loads((DEMO / "tokenizer_config.json").read_text(encoding="utf-8"))


CORPUS = [
    "Hello world",
    " Hello world",
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "3 33 333 3333 33333 333333 3.14159 1,000,000 0x1F 42nd",
    "  two leading spaces, three trailing   ",
    "\t\ttabs\tand\nnew\n\nlines\r\n\r\n  \n",
    "a  b   c    d     e",
    "def square(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; } // "quoted" & <tags>',
    "Ünïcödé naïve café, Äpfel, нещо на Български, Ελληνικά, 日本語のテキスト, 한국어, कन्नड़",
    "emoji 🦙🚀👍🏽 family 👨\u200d👩\u200d👧 check ✅ flag 🇩🇪",
    "I'm, you're, he's, we'll, they'd, I've; 'S 'T 'RE 'VE 'M 'LL 'D; rock'n'roll",
    "<|turn>user\nHi there<turn|>\n<|turn>model\n",
    'x<bos>y<eos>z <|"|> <|think|>a<note>b <note> <|unknown|>',
    "",
    " ",
    "\n",
    "!!!!!!??????......-----=======",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "nbsp\u00a0em\u2003ideographic\u3000space, zero\u200bwidth",
]


@functools.cache
def _demo_pair(pre: str):
    hf = demo_tokenizer(pre)
    return hf, tokenizer_from_gguf(gguf_metadata_from_hf(hf, pre, demo_config()), f"demo-{pre}.gguf")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "qwen35"])
def test_byte_level_bpe_encodes_like_the_original(pre):
    hf, tok = _demo_pair(pre)
    for text in CORPUS:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add).ids, (text, add)
    ids = [i for text in CORPUS for i in hf.encode(text).ids]
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_byte_level_bpe_round_trip_through_a_gguf_file(tmp_path):
    hf = demo_tokenizer()
    metadata = gguf_metadata_from_hf(hf, "gpt-2", demo_config())
    path = tmp_path / "demo.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    read = gguf_metadata(path)
    assert {k: read[k] for k in metadata} == metadata
    tok = tokenizer_from_gguf(read, str(path))
    for text in CORPUS:
        assert tok.encode(text) == hf.encode(text).ids, text
    assert tok.bos_token == "<bos>" and tok.encode("hi")[0] == 2
    # generation_config.json lists [1, 6, 14]: eos, and the end-of-turn tokens llama.cpp and we recognise
    assert tok.stop_token_ids() == {1, 6, 14}
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    assert tok.encode_chat(rendered) == hf.encode(rendered, add_special_tokens=False).ids
    assert tok.encode_chat(rendered).count(2) == 1


def test_byte_level_special_and_user_defined_tokens():
    hf, tok = _demo_pair("gpt-2")
    note = tok.token_id("<note>")
    ids = tok.encode("<|turn>user\nsee<note>here<turn|>", add_special_tokens=False)
    assert ids[0] == 5 and ids[-1] == 6 and note in ids
    assert tok.decode(ids) == "user\nsee<note>here"  # control tokens dropped, user-defined ones kept
    assert tok.decode(ids, skip_special_tokens=False) == "<|turn>user\nsee<note>here<turn|>"
    # parse_special=false: control tokens are text, user-defined ones still whole
    raw = build_hf_tokenizer(gguf_metadata_from_hf(hf, "gpt-2", demo_config()), "demo.gguf")
    raw.encode_special_tokens = True
    ids = raw.encode("<|turn>user\nsee<note>here", add_special_tokens=False).ids
    assert 5 not in ids and note in ids
    assert raw.decode(ids) == "<|turn>user\nsee<note>here"


def test_byte_level_add_bos_token_false():
    hf = demo_tokenizer()
    metadata = gguf_metadata_from_hf(hf, "gpt-2", demo_config()) | {"tokenizer.ggml.add_bos_token": False}
    tok = tokenizer_from_gguf(metadata, "demo.gguf")
    assert tok.encode("hi") == hf.encode("hi", add_special_tokens=False).ids


def test_missing_pre_uses_llama_cpps_default_with_a_warning():
    hf = demo_tokenizer()
    metadata = gguf_metadata_from_hf(hf, "gpt-2", demo_config())
    del metadata["tokenizer.ggml.pre"]
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre"):
        tok = tokenizer_from_gguf(metadata, "old.gguf")
    text = "x = 12345; y += 7!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # llama.cpp's 'default' splits punctuation runs, then the GPT-2 pattern, digit runs, three digits
    raw = build_hf_tokenizer(metadata | {"tokenizer.ggml.pre": "default"}, "old.gguf")
    pieces = [piece for piece, _ in raw.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == ["x", "Ġ", "=", "Ġ", "123", "45", ";", "Ġy", "Ġ", "+=", "Ġ", "7", "!"]


def test_supported_pre_tokenizers_compile():
    hf = demo_tokenizer()
    base = gguf_metadata_from_hf(hf, "gpt-2", demo_config())
    for pre in PRE_TOKENIZERS:
        tok = tokenizer_from_gguf(base | {"tokenizer.ggml.pre": pre}, f"{pre}.gguf")
        assert tok.decode(tok.encode(CORPUS[2], add_special_tokens=False)) == CORPUS[2], pre


# -- WordPiece ("bert": llama.cpp's WPM tokenizer, bge's vocabulary) -------------------------------------------
def test_bert_adds_cls_and_sep_and_normalises_case_and_accents():
    """llama.cpp's WPM tokenize with add_special: [CLS] first, [SEP] last (the .out vectors are without);
    lowercasing and accent stripping are on by default (tokenizer.ggml.normalizer.* absent in bge's file)."""
    tok = vocab_tokenizer("bert-bge")
    vectors = dict(llama_cpp_vectors("bert-bge"))
    cls, sep, unk = tok.token_id("[CLS]"), tok.token_id("[SEP]"), tok.token_id("[UNK]")
    assert (cls, sep, unk) == (101, 102, 100)  # llama.cpp's bert defaults; the file sets the same
    assert tok.encode("Hello, world!") == [cls, *vectors["Hello, world!"], sep]
    assert tok.encode("") == [cls, sep]
    assert (tok.bos_token, tok.special_tokens["sep_token"]) == ("[CLS]", "[SEP]")
    # "Äpfel": NFD, accent mark dropped, lowercased, so "apfel"; "HELLO" is "hello"
    assert tok.encode("apfel", add_special_tokens=False) == vectors["Äpfel"]
    assert tok.encode("HELLO wOrLd", add_special_tokens=False) == vectors["Hello world"]
    assert tok.encode("Hello,world!", add_special_tokens=False) == vectors["Hello, world!"]  # punctuation: own words


def test_bert_unknown_words_and_normaliser_options():
    """A word with any position no vocabulary piece matches is one [UNK] as a whole, its spelt pieces
    dropped; words around it are untouched. With tokenizer.ggml.normalizer.lowercase false (and so, unless
    the file says otherwise, no accent stripping) "Hello" has no "▁H..." piece to start with."""
    tok = vocab_tokenizer("bert-bge")
    hello, world, unk = tok.token_id("▁hello"), tok.token_id("▁world"), tok.token_id("[UNK]")
    assert tok.encode("hello abc🦙def world", add_special_tokens=False) == [hello, unk, world]
    assert tok.encode("\x00hel\u200blo\ufffd", add_special_tokens=False) == [hello]  # control chars dropped
    cased = tokenizer_from_gguf(vocab_metadata("bert-bge") | {"tokenizer.ggml.normalizer.lowercase": False}, "cased")
    assert tok.token_id("▁H") is None and cased.encode("Hello world", add_special_tokens=False) == [unk, world]
    assert cased.encode("café", add_special_tokens=False) != tok.encode("café", add_special_tokens=False)


def test_bert_decode_is_llama_cpps_detokenize():
    """llama.cpp's WPM detokenize: each word-start "▁" is a space, continuation pieces join, control tokens
    are dropped (or written with skip_special_tokens=False), then its clean-up (" ," -> ",", " !" -> "!",
    " 's" -> "'s"). The text's one leading space, which llama_detokenize keeps, is dropped."""
    tok = vocab_tokenizer("bert-bge")
    vectors = dict(llama_cpp_vectors("bert-bge"))
    ids = [101, *vectors["Hello, world!"], 102]
    assert tok.decode(ids) == "hello, world!"
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] hello, world![SEP]"
    assert tok.decode(vectors["w048 7tuijk dsdfhu"]) == "w048 7tuijk dsdfhu"  # continuation pieces
    assert tok.decode(vectors["Äpfel"]) == "apfel"
    # " it 's don 't a ' b": " 's" loses its space, " 't" keeps it, " ' " loses both
    spelled = [tok.token_id(t) for t in ("▁it", "▁'", "s", "▁don", "▁'", "t", "▁a", "▁'", "▁b")]
    assert None not in spelled and tok.decode(spelled) == "it's don 't a'b"


def test_bert_tokenizes_as_llama_cpp():
    """Against llama.cpp itself on random text mixing case, accents, Hangul, CJK, punctuation, control and
    whitespace characters, a literal "▁", emoji and special tokens' text (parse_special=true)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional peer")
    path = vocab_file("bert-bge")
    ll = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tok = vocab_tokenizer("bert-bge")
    rng = random.Random(0)
    alphabet = [*"aAbÉéİßǅ ,.!?'$+<=>^`|~_-\t\n\x00\x85\u3000\u200b\ufffd▁½ñ我가각ᄀ\u0301Σς🦙", "hello", "[SEP]"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    for text in texts:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == ll.tokenize(text.encode(), add_bos=add, special=True)


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["t5", "rwkv", "plamo2", "no_vocab"])
def test_unknown_tokenizer_model_is_a_clear_error(model):
    metadata = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(GGUFTokenizerError, match=rf"model\.gguf: tokenizer\.ggml\.model '{model}'") as e:
        tokenizer_from_gguf(metadata, "model.gguf")
    assert isinstance(e.value, ValueError) and "'gpt2', 'llama'" in str(e.value)


def test_missing_keys_are_clear_errors():
    with pytest.raises(GGUFTokenizerError, match=r"x\.gguf: no tokenizer\.ggml\.model"):
        tokenizer_from_gguf({"general.architecture": "llama"}, "x.gguf")
    with pytest.raises(GGUFTokenizerError, match=r"x\.gguf: no tokenizer\.ggml\.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"}, "x.gguf")
    with pytest.raises(GGUFTokenizerError, match=r"x\.gguf: no tokenizer\.ggml\.merges"):
        tokenizer_from_gguf(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a"]}, "x.gguf"
        )
    with pytest.raises(GGUFTokenizerError, match=r"x\.gguf: tokenizer\.ggml\.scores has 1 entries for 2 tokens"):
        tokenizer_from_gguf(
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]},
            "x.gguf",
        )
    with pytest.raises(GGUFTokenizerError, match=r"duplicate token .*'a' has ids 0 and 1"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "a"]}, "x.gguf")


def test_unknown_pre_tokenizer_names_it_and_the_supported_ones():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(GGUFTokenizerError, match=r"x\.gguf: tokenizer\.ggml\.pre 'mystery' is not supported") as e:
        tokenizer_from_gguf(metadata | {"tokenizer.ggml.merges": []}, "x.gguf")
    assert all(name in str(e.value) for name in ("qwen2", "llama-bpe", "gpt-2", "default"))


# -- Gemma 4 ("gemma4": BPE over characters, "▁" for spaces, <0xXX> byte tokens) ------------------------------
def _gemma4_file(path: Path, vocab_size: int) -> Path:
    """A Gemma 4 GGUF with no tensors (llama.cpp loads its vocabulary alone) and a small vocabulary of Gemma 4's
    kind with the byte tokens."""
    import transformers as tf
    from checkpoints import FAMILIES
    from gguf_files import gemma4_vocab, write_gguf

    cfg = tf.Gemma4TextConfig(**FAMILIES["gemma4_plain"][2]).to_dict()
    vocab = gemma4_vocab(vocab_size, byte_tokens=True)
    return write_gguf(path, "Gemma4ForCausalLM", cfg, [], gguf.GGMLQuantizationType.F32, vocab)


GEMMA4_TEXTS = [
    "the dog runs away",
    " the  dog\n\n\nruns   away!\n",
    "\n" * 7,
    "<|turn>user\nhello there<turn|>\n<|turn>model\n",
    "<bos>the fox",
    "Zoë 東京 🤖\tdone\r\n",
    "",
]


def _tokenizes_as_llama_cpp(path: Path, texts: list[str]):
    """Our tokenizer of the file `path` against llama.cpp's on `texts` and 300 random strings (encode, and decode
    back to the text); -> ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional peer")
    tok = tokenizer_from_gguf(gguf_metadata(path), str(path))
    ll = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    rng = random.Random(0)
    alphabet = "the dog fox runs away\n\n  !?,.Zë東🤖\t<>|"
    texts = texts + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        assert tok.encode(text) == ll.tokenize(text.encode(), add_bos=True, special=True), repr(text)
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text, repr(text)
    return tok


def test_gemma4_vocabulary_tokenizes_as_llama_cpp(tmp_path):
    _tokenizes_as_llama_cpp(_gemma4_file(tmp_path / "gemma4-vocab.gguf", 400), GEMMA4_TEXTS)


def test_gemma4_bos_spaces_bytes_and_stops(tmp_path):
    path = _gemma4_file(tmp_path / "gemma4-vocab.gguf", 400)
    metadata = gguf_metadata(path) | {"tokenizer.ggml.add_bos_token": False}
    tok = tokenizer_from_gguf(metadata, str(path))
    assert tok.encode("the")[0] == 2  # llama.cpp adds BOS to Gemma 4 prompts whatever the file says
    assert tok.encode_chat("<bos><|turn>user\nhi<turn|>\n").count(2) == 1
    ids = tok.encode(" the dog", add_special_tokens=False)
    assert [tok.token(i) for i in ids][0].startswith("▁")  # spaces are "▁", no prefix space added
    assert tok.encode("東", add_special_tokens=False) == [tok.token_id(f"<0x{b:02X}>") for b in "東".encode()]
    assert {1, tok.token_id("<turn|>")} <= tok.stop_token_ids()


# -- Gemma 3 ("llama": SentencePiece, "▁" for spaces, no prefix space, byte tokens) --------------------------------
GEMMA3_TEXTS = [t.replace("<|turn>", "<start_of_turn>").replace("<turn|>", "<end_of_turn>") for t in GEMMA4_TEXTS]


def test_gemma3_vocabulary_tokenizes_as_llama_cpp(tmp_path):
    """Gemma 3 files carry a SentencePiece vocabulary without the prefix space (llama.cpp's converter sets
    add_space_prefix false for it): ours tokenizes one as llama.cpp does, and stops on <end_of_turn>."""
    import transformers as tf
    from checkpoints import FAMILIES
    from gguf_files import gemma3_vocab, write_gguf

    cfg = tf.Gemma3TextConfig(**FAMILIES["gemma3_hub"][2]).to_dict()
    path, f32 = tmp_path / "gemma3-vocab.gguf", gguf.GGMLQuantizationType.F32
    write_gguf(path, "Gemma3ForCausalLM", cfg, [], f32, gemma3_vocab(400, byte_tokens=True))  # no tensors
    tok = _tokenizes_as_llama_cpp(path, GEMMA3_TEXTS)
    assert {1, tok.token_id("<end_of_turn>")} <= tok.stop_token_ids()


@pytest.mark.parametrize("name", ["llama-spm", "deepseek-llm", "gemma-4"])
def test_load_tokenizer_reads_a_vocabulary_only_gguf(name, tmp_path):
    """hearthlm.load_tokenizer takes a .gguf as it takes a folder: the vocabulary-only files have no tensors."""
    tok = load_tokenizer(vocab_file(name))
    text, ids = llama_cpp_vectors(name)[7]
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode(text, add_special_tokens=False) == vocab_tokenizer(name).encode(text, add_special_tokens=False)
    renamed = tmp_path / "vocab.bin"  # the GGUF magic decides, not the suffix
    shutil.copy(vocab_file(name), renamed)
    assert load_tokenizer(renamed).encode(text, add_special_tokens=False) == ids


def test_load_tokenizer_gguf_errors_name_the_problem(tmp_path):
    no_vocab = tmp_path / "weights.gguf"
    writer = gguf.GGUFWriter(no_vocab, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GGUFTokenizerError, match="holds no vocabulary"):
        load_tokenizer(no_vocab)
    fake = tmp_path / "fake.gguf"
    fake.write_text('{"model": {}}' * 4)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(fake)
