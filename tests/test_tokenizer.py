"""Tokenizer: end-of-turn stop ids and incremental detokenization, property-tested on tokenizers trained here
(byte-level BPE; SentencePiece-style Metaspace and Llama-2-style byte-fallback BPE) over real and random ids."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from hearthlm import load_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, ça va? Ünïcödé naïve café résumé, façade.",
    "日本語のテキストと中文文本，混合在一起。東京は大きい。",
    "Emoji: 🙂🚀👍🏽 and a family 👨\u200d👩\u200d👧 in a row.",
    "Tabs\tand  double  spaces,\nnew lines\n\n and a trailing space ",
    "def square(x):\n    return x ** 2  # code, with 'quotes' and \"more\"",
    "Ελληνικά και русский текст, ünd ëmojî 🎉.",
]
UNSEEN = [
    " leading space, then ＦＵＬＬＷＩＤＴＨ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "Rare: ğ ş ı ŋ ŧ, CJK 鬱 龘, emoji 🦜🪐🫠 ✔︎",
    "a  b   c    d",
    "    ",
    "é",
    "🙂",
]


def _train(tok: HFTokenizer, **trainer_kw) -> HFTokenizer:
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False, **trainer_kw)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens(["<x>"])  # an added token that is not special: never skipped
    return tok


def _with_byte_tokens(tok: HFTokenizer) -> HFTokenizer:
    """Add the 256 <0xHH> tokens that byte_fallback needs to the trained model's vocabulary."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data["added_tokens"]}
    free = (i for i in range(10**6) if i not in taken)
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", next(free))
    data["model"]["byte_fallback"] = True
    return HFTokenizer.from_str(json.dumps(data))


def byte_level() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _train(tok, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def metaspace() -> HFTokenizer:
    """SentencePiece style: ▁ for spaces (prefixed to the text), rare characters as byte tokens."""
    tok = HFTokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return _with_byte_tokens(_train(tok, limit_alphabet=40))


def llama2() -> HFTokenizer:
    """Llama 2 / Gemma style: normalizer writes ▁, decoder Replace + ByteFallback + Fuse + Strip."""
    tok = HFTokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _with_byte_tokens(_train(tok, limit_alphabet=40))


def _saved(make, tmp_path_factory):
    folder = tmp_path_factory.mktemp(make.__name__)
    make().save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=[byte_level, metaspace, llama2], ids=lambda f: f.__name__)
def tok(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=[metaspace, llama2], ids=lambda f: f.__name__)
def fallback_tok(request, tmp_path_factory):
    """The tokenizers with byte-fallback tokens (<0xE4>)."""
    return _saved(request.param, tmp_path_factory)


def stream(tok, ids: list[int], skip: bool = True) -> list[str]:
    d = tok.detokenizer(skip_special_tokens=skip)
    return [d.push(i) for i in ids] + [d.flush()]


def check(tok, ids: list[int], skip: bool = True) -> None:
    pieces = stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full, (ids, pieces, full)
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces), (ids, pieces)


def real_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    joined = "\n".join(CORPUS + UNSEEN)
    out = CORPUS + UNSEEN
    for _ in range(n):
        a = rng.randrange(len(joined))
        out.append(joined[a : a + rng.randint(1, 60)])
    return out


def test_fixture_tokenizers_split_characters_into_several_tokens(tok):
    # Otherwise the streaming tests would not exercise held-back bytes.
    split = [c for c in "日本語🙂🚀ğ鬱🦜" if len(tok.encode(c, add_special_tokens=False)) > 1]
    assert len(split) >= 3


def test_real_text_streams_exactly(tok):
    for text in real_texts(0, 200):
        ids = tok.encode(text, add_special_tokens=False)
        check(tok, ids)


def test_first_piece_keeps_spacing(tok):
    ids = tok.encode("Hello world, ça va", add_special_tokens=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == "Hello world, ça va"
    assert next(p for p in pieces if p).startswith("H")  # SentencePiece: no space before the first word


def random_ids(tok, rng: random.Random) -> list[int]:
    """Uniform ids, ids mixed with special tokens, or long runs of byte tokens (valid UTF-8 or not); ids
    past the vocabulary too, as models often pad their embedding rows."""
    vocab = tok.vocab_size + 3
    specials = [tok.token_id(t) for t in [*SPECIALS, "<x>"]]
    byte_ids = sorted(tok.byte_ids)
    n, mode = rng.randint(1, 60), rng.random()
    if byte_ids and mode < 0.4:
        other = specials + [rng.randrange(vocab)]
        return [rng.choice(byte_ids) if rng.random() < 0.8 else rng.choice(other) for _ in range(n)]
    if mode < 0.6:
        return [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(n)]
    return [rng.randrange(vocab) for _ in range(n)]


def test_random_ids_stream_exactly(tok):
    rng = random.Random(1)
    for _ in range(1500):
        ids = random_ids(tok, rng)
        check(tok, ids)
        check(tok, ids, skip=False)


def test_special_tokens_interleaved(tok):
    rng = random.Random(2)
    specials = [tok.token_id(t) for t in [*SPECIALS, "<x>"]]
    for text in real_texts(3, 100):
        ids = tok.encode(text, add_special_tokens=False)
        for _ in range(rng.randint(1, 4)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        check(tok, ids)
        check(tok, ids, skip=False)
        assert "<turn|>" not in "".join(stream(tok, ids))


def test_invalid_byte_run_after_a_valid_character(fallback_tok):
    tok = fallback_tok
    assert tok.byte_ids
    b = [tok.token_id(f"<0x{x:02X}>") for x in (0xE4, 0xB8, 0x80, 0xE4)]
    a = tok.encode("a", add_special_tokens=False)
    # 一 then a lone lead byte: the decoder turns the whole run into U+FFFDs once "a" ends it.
    for ids in (b + a, b[:3] + a, b + b[1:3] + a, b, b[:3] + [tok.token_id("<eos>")] + b[:3] + a):
        check(tok, ids)


def test_window_stays_short(tok, monkeypatch):
    longest = 0
    decode = tok.decode

    def counting(ids, skip_special_tokens=True):
        nonlocal longest
        longest = max(longest, len(ids))
        return decode(ids, skip_special_tokens)

    ids = tok.encode("\n".join(CORPUS * 5), add_special_tokens=False)
    monkeypatch.setattr(tok, "decode", counting)
    assert "".join(stream(tok, ids)) == decode(ids)
    run = max((len(r) for r in "".join("b" if i in tok.byte_ids else " " for i in ids).split()), default=0)
    assert len(ids) > 500 and longest <= 2 * run + 8


# -- stop tokens ---------------------------------------------------------------------------------------
def vocab_folder(folder: Path, tokens: dict[int, str], specials: set[str], config: dict) -> Path:
    size = max(tokens) + 1
    vocab = {tokens.get(i, f"w{i}"): i for i in range(size)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=tokens[3] if 3 in tokens else "w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(sorted(specials))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_gemma4_stops_on_end_of_turn(tmp_path):
    tokens = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 50: "<|tool_response>", 105: "<|turn>", 106: "<turn|>"}
    tok = load_tokenizer(vocab_folder(tmp_path / "g", tokens, set(tokens.values()), {"eos_token": "<eos>"}))
    assert tok.stop_token_ids([1, 106, 50]) == {1, 50, 106}  # generation_config.json of Gemma 4
    assert tok.stop_token_ids([1]) == {1, 50, 106}  # a config that lists only <eos>
    assert tok.stop_token_ids() == {1, 50, 106}


def test_qwen_and_llama_end_of_turn(tmp_path):
    qwen = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}
    tok = load_tokenizer(vocab_folder(tmp_path / "q", qwen, set(qwen.values()), {"eos_token": "<|im_end|>"}))
    assert tok.stop_token_ids([0]) == {0, 2}
    llama = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|eot_id|>", 5: "<|start_header_id|>"}
    tok = load_tokenizer(vocab_folder(tmp_path / "l", llama, set(llama.values()), {}))
    assert tok.stop_token_ids([1]) == {1, 2}


def test_only_special_tokens_count_as_end_of_turn(tmp_path):
    # A vocabulary word spelled like an end-of-turn token (not registered as special) must not stop generation.
    tokens = {0: "<eos>", 4: "<|im_end|>", 5: "<turn|>"}
    tok = load_tokenizer(vocab_folder(tmp_path / "p", tokens, {"<eos>"}, {}))
    assert tok.stop_token_ids([0]) == {0}
