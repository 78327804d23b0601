"""Fuzz target: the GGUF tokenizer builder (gguf_tokenizer.py) on metadata a fuzzer assembles: a vocabulary
kind, tokens, scores, token types, merges, a pre-tokenizer name, special ids and flags, some of them of the
wrong type. Allowed: GGUFTokenizerError. A tokenizer that builds must encode and decode text, giving ids in
the vocabulary."""

from __future__ import annotations

import os
import sys
import warnings

import atheris

sys.path.insert(0, os.path.dirname(__file__))
import tokenizers  # noqa: E402, F401  (imported before instrumentation: only hearthlm is instrumented)
from harness import main  # noqa: E402

with atheris.instrument_imports(include=["hearthlm"]):
    from hearthlm.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

MODELS = ["llama", "gpt2", "gemma4", "bert", "no_vocab", "unknown"]
PRES = ["default", "llama3", "qwen2", "gpt-2", "tekken", "deepseek-llm", "nope"]
SPECIALS = ["bos", "eos", "unknown", "padding", "seperator", "eot", "mask"]
PIECES = ["<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "▁", "▁a", "a", "b", "ab", "<0x41>", "<0xZZ>", "\n", " ", ""]


def _token(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return fdp.PickValueInList(PIECES)
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4))


def _metadata(fdp: atheris.FuzzedDataProvider) -> dict:
    n = fdp.ConsumeIntInRange(0, 48)
    meta: dict = {"tokenizer.ggml.model": fdp.PickValueInList(MODELS)}
    meta["tokenizer.ggml.tokens"] = [_token(fdp) for _ in range(n)] if fdp.ConsumeProbability() > 0.05 else n
    if fdp.ConsumeBool():
        meta["tokenizer.ggml.scores"] = [fdp.ConsumeRegularFloat() for _ in range(fdp.ConsumeIntInRange(0, n + 1))]
    if fdp.ConsumeBool():
        meta["tokenizer.ggml.token_type"] = [
            fdp.ConsumeIntInRange(0, 7) for _ in range(fdp.ConsumeIntInRange(0, n + 1))
        ]
    if fdp.ConsumeBool():
        meta["tokenizer.ggml.merges"] = [f"{_token(fdp)} {_token(fdp)}" for _ in range(fdp.ConsumeIntInRange(0, 32))]
    if fdp.ConsumeBool():
        meta["tokenizer.ggml.pre"] = fdp.PickValueInList(PRES)
    for name in SPECIALS:
        if fdp.ConsumeBool():
            meta[f"tokenizer.ggml.{name}_token_id"] = fdp.ConsumeIntInRange(-2, n + 2)
    for flag in ("add_bos_token", "add_eos_token", "add_space_prefix", "normalizer.lowercase"):
        if fdp.ConsumeBool():
            meta[f"tokenizer.ggml.{flag}"] = fdp.ConsumeBool()
    if fdp.ConsumeBool():
        meta["tokenizer.chat_template"] = _token(fdp)
    return meta


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    meta = _metadata(fdp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = tokenizer_from_gguf(meta, "fuzz.gguf")
    except GGUFTokenizerError:
        return
    text = fdp.ConsumeUnicodeNoSurrogates(64)
    ids = tok.encode(text)
    assert all(0 <= i < len(meta["tokenizer.ggml.tokens"]) for i in ids), ids
    tok.decode(ids)
    detok = tok.detokenizer()
    for i in ids:
        detok.push(i)
    detok.flush()


def seeds():
    return [bytes(range(256)) * 4, b"\x01" * 512, b"\xff\x00" * 300]


if __name__ == "__main__":
    main(test_one_input, seeds)
