"""Hostile files (issue 22, item 1): handcrafted bad GGUF, safetensors, config.json and pickle checkpoints, each
built here byte by byte. Every one must be refused with a typed error whose message names the problem: never a
crash, a hang, a read outside the file, or an allocation larger than the file justifies.

Memory is measured two ways: tracemalloc's peak around each refusal (every Python and numpy allocation; the
readers use no others before they refuse), bounded by MEMORY_SLACK + MEMORY_PER_BYTE x the file's size; and a
subprocess that opens the whole GGUF and safetensors corpus and reports the growth of its peak RSS
(ru_maxrss), which would also show torch allocations or touched mappings.
"""

from __future__ import annotations

import json
import pickle
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hearthlm import LLM, load_tokenizer
from hearthlm.config import ConfigError
from hearthlm.gguf_tokenizer import GGUFTokenizerError
from hearthlm.tokenizer import ChatTemplateError, Tokenizer
from hearthlm.weights.gguf import GGUFError, GGUFFile
from hearthlm.weights.loader import load_model
from hearthlm.weights.safetensors import Checkpoint, CheckpointError, SafetensorsFile

MEMORY_SLACK = 1 << 20  # bytes: the reader's own bookkeeping, error messages, a traceback
MEMORY_PER_BYTE = 40  # metadata arrays become Python lists: an int8 array costs up to ~36 bytes per file byte
SECONDS = 20  # a refusal that takes longer is a hang


@contextmanager
def deadline(seconds: int = SECONDS) -> Iterator[None]:
    def stop(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(call: Callable[[], object], error: type[Exception], match: str, size: int) -> Exception:
    """Run `call`, expect `error` matching `match`, within SECONDS and the memory bound for a file of `size`."""
    tracemalloc.start()
    try:
        with deadline(), pytest.raises(error, match=match) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_SLACK + MEMORY_PER_BYTE * size, f"peak {peak} bytes for a file of {size}"
    assert "Traceback" not in str(info.value)
    return info.value


# -- GGUF, byte by byte ---------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_Q8_0 = 0, 8


def s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def text(key: str, value: str) -> bytes:
    return kv(key, STR, s(value))


def array(key: str, etype: int, items: list[bytes], count: int | None = None) -> bytes:
    return kv(key, ARR, struct.pack("<IQ", etype, len(items) if count is None else count) + b"".join(items))


def info(name: str, dims: list[int], ggml_type: int = T_F32, offset: int = 0) -> bytes:
    """A tensor info; `dims` innermost first, as GGUF lists them."""
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf(kvs=(), infos=(), data=b"", version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    counts = (len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = b"GGUF" + struct.pack("<IQQ", version, *counts) + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % alignment) + data


ARCH = text("general.architecture", "llama")
ONE = info("t", [4])  # a float32 tensor of 4 elements at data offset 0
GOOD = gguf([ARCH, u32("x.n", 7), array("x.list", U32, [struct.pack("<I", 1)] * 3),
             array("x.words", STR, [s("a"), s("bc")])], [ONE], bytes(16))  # fmt: skip


def open_gguf(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> tuple[Callable[[], object], int]:
    path = tmp_path / name
    path.write_bytes(data)
    return (lambda: GGUFFile(path)), len(data)


def test_the_good_file_reads(tmp_path):
    f = open_gguf(tmp_path, GOOD)[0]()
    assert f.metadata["x.list"] == [1, 1, 1] and f.metadata["x.words"] == ["a", "bc"]
    assert f.tensors["t"].shape == (4,) and f.tensors["t"].nbytes == 16


def test_truncation_at_every_byte(tmp_path):
    """Every prefix of a file, so every field boundary: the magic, the counts, each key, type, value, array
    count and element, the tensor info's name, dims, type and offset, and the data."""
    for n in range(len(GOOD)):
        call, size = open_gguf(tmp_path, GOOD[:n])
        refused(call, GGUFError, "truncated|too short|corrupt|beyond the end", size)


HEADER_CASES = {
    "bad magic": (b"GGUX" + GOOD[4:], "not a GGUF file"),
    "version 1": (gguf([ARCH], version=1), "version 1 is not supported"),
    "version 4": (gguf([ARCH], version=4), "version 4 is not supported"),
    "version 2**32-1": (gguf([ARCH], version=2**32 - 1), "is not supported"),
    "n_tensors 2**64-1": (gguf([ARCH], n_tensors=2**64 - 1), "corrupt header"),
    "n_kv 2**64-1": (gguf([ARCH], n_kv=2**64 - 1), "corrupt header"),
    "n_kv past the bytes": (gguf([ARCH], n_kv=3, alignment=1) + bytes(16), "truncated"),
    "n_tensors past the bytes": (gguf([ARCH], [ONE], n_tensors=3, alignment=1), "truncated"),
    "key length past the end": (gguf([s("k", 1000) + b"k"]), "truncated"),
    "key length 2**63": (gguf([s("k", 2**63)]), "truncated"),
    "key length 2**64-1": (gguf([s("k", 2**64 - 1)]), "truncated"),
    "string past the end": (gguf([kv("k", STR, s("abc", 500))]), "truncated"),
    "string length 2**63": (gguf([kv("k", STR, s("abc", 2**63))]), "truncated"),
    "u32 array past the end": (gguf([array("k", U32, [], count=2**62)]), "truncated"),
    "u64 array count x size overflows": (gguf([array("k", U64, [], count=2**61 + 1)]), "truncated"),
    "string array past the end": (gguf([array("k", STR, [s("a")], count=2**40)]), "more than the file holds"),
    "nested arrays": (gguf([kv("k", ARR, struct.pack("<IQ", ARR, 1) * 20_000)]), "array of arrays"),
    "unknown value type": (gguf([kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "unknown value type 2**32-1": (gguf([kv("k", 2**32 - 1, b"")]), "unknown value type"),
    "unknown array type": (gguf([array("k", 99, [b"\0"])]), "unknown value type 99"),
    "duplicate key": (gguf([ARCH, ARCH]), "appears twice"),
    "alignment 0": (gguf([ARCH, u32("general.alignment", 0)]), "alignment = 0 is not a power of two"),
    "alignment 13": (gguf([ARCH, u32("general.alignment", 13)]), "alignment = 13 is not a power of two"),
    "alignment a string": (gguf([text("general.alignment", "32")]), "alignment = '32'"),
    "alignment a float": (gguf([kv("general.alignment", F32, struct.pack("<f", 32))]), "alignment = 32.0"),
    "alignment a bool": (gguf([kv("general.alignment", BOOL, b"\1")]), "alignment = True"),
    "alignment 2**40": (gguf([ARCH, kv("general.alignment", U64, struct.pack("<Q", 2**40))], [ONE], bytes(16)),
                        "beyond the end"),
}  # fmt: skip


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_gguf_header(tmp_path, case):
    data, match = HEADER_CASES[case]
    call, size = open_gguf(tmp_path, data)
    refused(call, GGUFError, match, size)


TENSOR_CASES = {
    "5 dimensions": ([info("t", [1, 1, 1, 1, 4])], "claims 5 dimensions"),
    "0 dimensions": ([info("t", [])], "claims 0 dimensions"),
    "a zero size": ([info("t", [4, 0])], "impossible shape"),
    "a negative size (as int64)": ([info("t", [4, 2**64 - 4])], "impossible shape"),
    "an overflowing size": ([info("t", [2**32, 2**32])], "impossible shape"),
    "an unknown type": ([info("t", [4], ggml_type=99)], "not supported"),
    "a known type we do not read": ([info("t", [256], ggml_type=16)], "IQ2_XXS is not supported"),
    "rows not a multiple of the block": ([info("t", [33], ggml_type=T_Q8_0)], "not a multiple of the Q8_0 block"),
    "misaligned offset": ([info("t", [2], offset=4)], "not a multiple of the alignment"),
    "overlapping tensors": ([info("t", [4]), info("u", [4])], "overlap"),
    "overlapping tail": ([info("t", [16]), info("u", [4], offset=32)], "overlap"),
    "ending past the data": ([info("t", [4], offset=64)], "beyond the end"),
    "offset 2**64-32": ([info("t", [4], offset=2**64 - 32)], "beyond the end"),
    "duplicate names": ([info("t", [4]), info("t", [4], offset=32)], "listed twice"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_gguf_tensor(tmp_path, case):
    infos, match = TENSOR_CASES[case]
    call, size = open_gguf(tmp_path, gguf([ARCH], infos, bytes(64)))
    refused(call, GGUFError, match, size)


# -- GGUF models: a tiny Llama and a tiny Qwen3-MoE, written with the builder above -----------------------------
H, F, V, HEADS, KV_HEADS = 8, 16, 32, 2, 1


def vocab(n: int = V, types: list[int] | None = None, tokens: list[str] | None = None) -> list[bytes]:
    tokens = tokens or ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(n - 3)]
    types = types or [2, 3, 3] + [1] * (len(tokens) - 3)
    return [
        text("tokenizer.ggml.model", "llama"),
        array("tokenizer.ggml.tokens", STR, [s(t) for t in tokens]),
        array("tokenizer.ggml.scores", F32, [struct.pack("<f", -i) for i in range(len(tokens))]),
        array("tokenizer.ggml.token_type", I32, [struct.pack("<i", t) for t in types]),
    ]


def model_tensors(arch: str, experts: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    t = {"token_embd.weight": w(V, H), "output_norm.weight": np.ones(H, np.float32)}
    head = H // HEADS
    t |= {f"blk.0.{k}": v for k, v in {
        "attn_norm.weight": np.ones(H, np.float32), "ffn_norm.weight": np.ones(H, np.float32),
        "attn_q.weight": w(H, H), "attn_k.weight": w(KV_HEADS * head, H), "attn_v.weight": w(KV_HEADS * head, H),
        "attn_output.weight": w(H, H)}.items()}  # fmt: skip
    if arch == "qwen3moe":
        t |= {
            "blk.0.attn_q_norm.weight": np.ones(head, np.float32),
            "blk.0.attn_k_norm.weight": np.ones(head, np.float32),
        }
        t |= {"blk.0.ffn_gate_inp.weight": w(experts, H), "blk.0.ffn_gate_exps.weight": w(experts, F, H),
              "blk.0.ffn_up_exps.weight": w(experts, F, H), "blk.0.ffn_down_exps.weight": w(experts, H, F)}  # fmt: skip
    else:
        t |= {"blk.0.ffn_gate.weight": w(F, H), "blk.0.ffn_up.weight": w(F, H), "blk.0.ffn_down.weight": w(H, F)}
    return t


def model_gguf(arch: str = "llama", extra=(), tokens=None, experts: int = 0, used: int = 0) -> bytes:
    meta = [text("general.architecture", arch), u32(f"{arch}.embedding_length", H), u32(f"{arch}.block_count", 1),
            u32(f"{arch}.feed_forward_length", F), u32(f"{arch}.attention.head_count", HEADS),
            u32(f"{arch}.attention.head_count_kv", KV_HEADS), u32(f"{arch}.context_length", 64)]  # fmt: skip
    if arch == "qwen3moe":
        meta += [u32("qwen3moe.expert_count", experts), u32("qwen3moe.expert_used_count", used),
                 u32("qwen3moe.expert_feed_forward_length", F)]  # fmt: skip
    tensors = model_tensors(arch, experts if arch == "qwen3moe" else 0)
    infos, data = [], b""
    for name, value in tensors.items():
        infos.append(info(name, list(reversed(value.shape)), offset=len(data)))
        raw = value.tobytes()
        data += raw + bytes(-len(raw) % 32)
    return gguf(meta + list(tokens if tokens is not None else vocab()) + list(extra), infos, data)


def test_the_tiny_models_load(tmp_path):
    (tmp_path / "l.gguf").write_bytes(model_gguf())
    llm = LLM(tmp_path / "l.gguf", dtype="float32")
    assert llm.logits(llm.tokenizer.encode("ab"))[-1].isfinite().all()
    (tmp_path / "m.gguf").write_bytes(model_gguf("qwen3moe", experts=4, used=2))
    llm = LLM(tmp_path / "m.gguf", dtype="float32", expert_budget=0.5)
    assert llm.logits([1, 5, 6])[-1].isfinite().all()


def test_vocabulary_larger_than_the_embedding(tmp_path):
    call, size = open_gguf(tmp_path, model_gguf(tokens=vocab(V + 8)))
    refused(lambda: LLM(tmp_path / "bad.gguf"), GGUFError, f"vocabulary has {V + 8} tokens but token_embd", size)


def test_vocabulary_arrays_of_the_wrong_size_or_type(tmp_path):
    short_scores = [*vocab()[:2], array("tokenizer.ggml.scores", F32, [struct.pack("<f", 0)] * 5)]
    call, size = open_gguf(tmp_path, model_gguf(tokens=short_scores))
    refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "scores has 5 entries for 32", size)
    wrong_type = [*vocab()[:3], array("tokenizer.ggml.token_type", STR, [s("x")] * V)]
    open_gguf(tmp_path, model_gguf(tokens=wrong_type))
    refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "token_type is not a list of int", size)
    numbers = [text("tokenizer.ggml.model", "llama"), array("tokenizer.ggml.tokens", U32, [struct.pack("<I", 1)] * V)]
    open_gguf(tmp_path, model_gguf(tokens=numbers))
    refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "tokens is not a list of strings", size)


def test_special_token_ids_outside_the_vocabulary(tmp_path):
    """Ignored with a warning, as llama.cpp does; an error where the id is needed (add_bos) or not an integer."""
    out = [u32("tokenizer.ggml.padding_token_id", 10**6)]
    open_gguf(tmp_path, model_gguf(extra=out))
    with pytest.warns(UserWarning, match="padding_token_id = 1000000 is outside the vocabulary"):
        tok = load_tokenizer(tmp_path / "bad.gguf")
    assert "pad_token" not in tok.special_tokens
    bos = [u32("tokenizer.ggml.bos_token_id", V)]  # one past the end: llama.cpp's default (1) stays
    open_gguf(tmp_path, model_gguf(extra=bos))
    with pytest.warns(UserWarning, match=f"bos_token_id = {V} is outside"):
        assert load_tokenizer(tmp_path / "bad.gguf").bos_token == "<s>"
    gpt2 = [text("tokenizer.ggml.model", "gpt2"), text("tokenizer.ggml.pre", "qwen2"),
            array("tokenizer.ggml.tokens", STR, [s(t) for t in "abcdefgh"]),  # llama.cpp's default bos, 11, is past them
            array("tokenizer.ggml.merges", STR, []), u32("tokenizer.ggml.bos_token_id", 2**31),
            kv("tokenizer.ggml.add_bos_token", BOOL, b"\1")]  # fmt: skip
    call, size = open_gguf(tmp_path, model_gguf(tokens=gpt2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "add_bos_token is true", size)
    text_id = [text("tokenizer.ggml.eos_token_id", "2")]
    open_gguf(tmp_path, model_gguf(extra=text_id))
    refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "'2' is not a token id", size)


@pytest.mark.parametrize("token", ["<0xZZ>", "<0x1>", "abc", "<0x4142>", ""])
def test_malformed_byte_tokens(tmp_path, token):
    tokens = ["<unk>", "<s>", "</s>", "<0x41>", token] + [f"w{i}" for i in range(V - 5)]
    types = [2, 3, 3, 6, 6] + [1] * (V - 5)
    call, size = open_gguf(tmp_path, model_gguf(tokens=vocab(tokens=tokens, types=types)))
    refused(lambda: load_tokenizer(tmp_path / "bad.gguf"), GGUFTokenizerError, "has type BYTE but is not", size)


def test_expert_count_disagreeing_with_the_tensors_fails_at_load(tmp_path):
    """4 experts in the metadata, 2 in the tensors: under a budget, refused at load, not at the first miss."""
    data = model_gguf("qwen3moe", experts=2, used=2)
    data = data.replace(u32("qwen3moe.expert_count", 2), u32("qwen3moe.expert_count", 4))
    call, size = open_gguf(tmp_path, data)
    refused(lambda: LLM(tmp_path / "bad.gguf", expert_budget=0.5), CheckpointError, "expert tensor", size)
    refused(lambda: LLM(tmp_path / "bad.gguf"), CheckpointError, "missing|disagree", size)


def test_top_k_larger_than_the_experts(tmp_path):
    call, size = open_gguf(tmp_path, model_gguf("qwen3moe", experts=2, used=8))
    refused(
        lambda: LLM(tmp_path / "bad.gguf", expert_budget=0.5),
        ConfigError,
        "8 experts per token, but the model has 2",
        size,
    )


def test_absurd_sizes_in_gguf_metadata(tmp_path):
    data = model_gguf().replace(u32("llama.block_count", 1), u32("llama.block_count", 2**31))
    call, size = open_gguf(tmp_path, data)
    refused(lambda: LLM(tmp_path / "bad.gguf"), ConfigError, "num_hidden_layers = 2147483648", size)
    data = model_gguf().replace(u32("llama.embedding_length", H), text("llama.embedding_length", "8"))
    open_gguf(tmp_path, data)
    refused(lambda: LLM(tmp_path / "bad.gguf"), ConfigError, "hidden_size = '8' is not an integer", len(data))


# -- safetensors --------------------------------------------------------------------------------------------------
def st_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str = "F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ST_CASES = {
    "header length past the file": (st_bytes({}, length=10**6), "exceeds the file size"),
    "header length 2**64-1": (st_bytes({}, length=2**64 - 1), "exceeds the file size"),
    "header length 0": (st_bytes(b"", b"{}" * 4), "not between 2 and"),
    "header length 1": (st_bytes(b"{", b"}" * 8), "not between 2 and"),
    "a JSON list": (st_bytes([1, 2]), "not a JSON object"),
    "a JSON number": (st_bytes(b"12"), "not a JSON object"),
    "not JSON": (st_bytes(b"{nope"), "not valid JSON"),
    "invalid UTF-8": (st_bytes(b'{"\xff\xfe": 1}'), "not valid JSON"),
    "deep nesting": (st_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "duplicate keys": (st_bytes(b'{"a": ' + json.dumps(entry()).encode() + b', "a": '
                                + json.dumps(entry()).encode() + b"}", bytes(8)), "'a' appears twice"),
    "entry not an object": (st_bytes({"a": [1, 2]}, bytes(8)), "not a JSON object"),
    "negative offset": (st_bytes({"a": entry(offsets=(-8, 0))}, bytes(8)), "negative or reversed"),
    "reversed offsets": (st_bytes({"a": entry(offsets=(8, 0))}, bytes(8)), "negative or reversed"),
    "float offsets": (st_bytes({"a": entry(offsets=(0.0, 8.0))}, bytes(8)), "is not \\[start, end\\]"),
    "overlapping": (st_bytes({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)), "overlaps"),
    "a gap": (st_bytes({"a": entry(), "b": entry(offsets=(12, 20))}, bytes(20)), "gap of 4 bytes"),
    "trailing bytes": (st_bytes({"a": entry()}, bytes(16)), "belong to none"),
    "offsets past the data": (st_bytes({"a": entry(shape=(4,), offsets=(0, 16))}, bytes(8)), "ends at byte 16"),
    "shape x dtype disagree": (st_bytes({"a": entry(shape=(3,))}, bytes(8)), "needs 12 bytes"),
    "overflowing shape": (st_bytes({"a": entry(shape=(2**62, 2**62))}, bytes(8)), "needs"),
    "negative shape": (st_bytes({"a": entry(shape=(-2,))}, bytes(8)), "non-negative integers"),
    "unknown dtype": (st_bytes({"a": entry(dtype="F7")}, bytes(8)), "unknown dtype 'F7'"),
    "dtype not a string": (st_bytes({"a": entry(dtype=[1])}, bytes(8)), "unknown dtype \\[1\\]"),  # found by fuzzing
}  # fmt: skip


@pytest.mark.parametrize("case", ST_CASES)
def test_bad_safetensors(tmp_path, case):
    data, match = ST_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    refused(lambda: SafetensorsFile(path), CheckpointError, match, len(data))


def test_safetensors_header_over_100mb(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:  # sparse: 100 MB on paper, nothing on disk
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(100_000_100)
    refused(lambda: SafetensorsFile(path), CheckpointError, "not between 2 and 100000000", 4096)


def test_unsupported_but_known_dtype_is_refused_on_read(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_bytes({"a": entry(dtype="F8_E4M3", shape=(8,))}, bytes(8)))
    with pytest.raises(CheckpointError, match="unsupported dtype F8_E4M3"):
        SafetensorsFile(path).get("a")


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", "a\\..\\b"])
def test_sharded_index_paths_stay_in_the_folder(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "x.safetensors").write_bytes(st_bytes({"a": entry()}, bytes(8)))
    index = {"metadata": {}, "weight_map": {"a": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(lambda: Checkpoint(folder), CheckpointError, "is not a file name in the checkpoint folder", 100)


@pytest.mark.parametrize("index", ["[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 5}}', "{", '"x"'])
def test_malformed_sharded_index(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    refused(lambda: Checkpoint(tmp_path), CheckpointError, "index|weight_map", 100)


# -- config.json against a tiny Llama checkpoint ------------------------------------------------------------------
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": F,
         "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "vocab_size": V,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": True}  # fmt: skip


def llama_folder(folder: Path, **config) -> Path:
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    w = lambda *shape: torch.randn(*shape, generator=gen) * 0.1  # noqa: E731
    p, kvd = "model.layers.0.", KV_HEADS * H // HEADS
    tensors = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": torch.ones(H),
               p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
               p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(kvd, H),
               p + "self_attn.v_proj.weight": w(kvd, H), p + "self_attn.o_proj.weight": w(H, H),
               p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
               p + "mlp.down_proj.weight": w(H, F)}  # fmt: skip
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({k: v for k, v in (LLAMA | config).items() if v is not None}))
    return folder


def load(folder: Path) -> object:
    return load_model(folder, torch.float32, torch.device("cpu"))


def test_the_tiny_checkpoint_loads(tmp_path):
    assert load(llama_folder(tmp_path / "ok")) is not None


CONFIG_CASES = {
    "vocab_size disagrees": ({"vocab_size": 2 * V}, CheckpointError, "the config and the weights disagree"),
    "hidden_size disagrees": ({"hidden_size": 2 * H}, CheckpointError, "the config and the weights disagree"),
    "more layers than tensors": ({"num_hidden_layers": 2}, CheckpointError, "layers.1.*missing"),
    "10**9 layers": ({"num_hidden_layers": 10**9}, ConfigError, "num_hidden_layers = 1000000000"),
    "hidden 2**40": ({"hidden_size": 2**40}, ConfigError, "hidden_size = 1099511627776"),
    "vocab -1": ({"vocab_size": -1}, ConfigError, "vocab_size = -1"),
    "zero heads": ({"num_attention_heads": 0}, ConfigError, "num_attention_heads = 0"),
    "layers as text": ({"num_hidden_layers": "1"}, ConfigError, "num_hidden_layers = '1'"),
    "layers as a float": ({"num_hidden_layers": 1.0}, ConfigError, "num_hidden_layers = 1.0"),
    "layers as a bool": ({"num_hidden_layers": True}, ConfigError, "num_hidden_layers = True"),
    "context 2**62": ({"max_position_embeddings": 2**62}, ConfigError, "max_position_embeddings"),
    "KV heads not dividing": ({"num_attention_heads": 2, "num_key_value_heads": 3}, ConfigError,
                              "3 KV heads for 2 attention heads"),
    "unknown architecture": ({"architectures": ["EvilForCausalLM"], "model_type": "evil"}, ConfigError,
                             "unsupported architecture"),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(tmp_path, case):
    changes, error, match = CONFIG_CASES[case]
    folder = llama_folder(tmp_path / "m", **changes)
    refused(lambda: load(folder), error, match, 64 * 1024)


def test_config_not_an_object(tmp_path):
    folder = llama_folder(tmp_path / "m")
    (folder / "config.json").write_text("[1, 2, 3]")
    refused(lambda: load(folder), ConfigError, "not a JSON object", 100)


# -- pickles and remote code ----------------------------------------------------------------------------------------
class _Trap:
    """Unpickling this creates the file `path`: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, name):
    folder, ran = tmp_path / "m", tmp_path / "pickle-ran"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Trap(ran)}))
    (folder / "config.json").write_text(json.dumps(LLAMA))
    err = refused(lambda: load(folder), CheckpointError, "pickled PyTorch checkpoint", 4096)
    assert "convert it to safetensors" in str(err) and name in str(err)
    refused(lambda: load(folder / name), CheckpointError, "convert it to safetensors", 4096)
    assert not ran.exists()


EVIL = "import pathlib\npathlib.Path({path!r}).touch()\nclass EvilForCausalLM: pass\nclass EvilTokenizer: pass\n"


def test_auto_map_and_remote_code_are_never_run(tmp_path):
    ran = tmp_path / "remote-code-ran"
    folder = llama_folder(tmp_path / "m")
    (folder / "modeling_evil.py").write_text(EVIL.format(path=str(ran)))
    (folder / "tokenization_evil.py").write_text(EVIL.format(path=str(ran)))
    auto = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoConfig": "modeling_evil.EvilConfig"}
    config = LLAMA | {"auto_map": auto, "trust_remote_code": True}
    (folder / "config.json").write_text(json.dumps(config))
    assert load(folder) is not None  # a supported architecture: loaded by our code, auto_map ignored
    (folder / "config.json").write_text(
        json.dumps(config | {"architectures": ["EvilForCausalLM"], "model_type": "evil"})
    )
    refused(lambda: load(folder), ConfigError, "unsupported architecture", 4096)
    tokenizer_json = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                      "post_processor": None, "decoder": None,
                      "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tok_config = {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "tokenizer_class": "Evil"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert Tokenizer(folder).encode("a") == [1]
    assert not ran.exists()


# -- peak RSS, in a fresh process ---------------------------------------------------------------------------------
RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from hearthlm.weights.gguf import GGUFFile
from hearthlm.weights.safetensors import CheckpointError, SafetensorsFile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sorted(Path(sys.argv[1]).iterdir()):
    try:
        (GGUFFile if path.suffix == ".gguf" else SafetensorsFile)(path)
        raise SystemExit(f"{path.name} was accepted")
    except CheckpointError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_peak_rss_over_the_whole_corpus(tmp_path):
    """ru_maxrss (KiB on Linux) grows by less than 16 MiB over every bad GGUF and safetensors file above, whatever
    sizes and counts they claim (2**64-1 tensors, 2**62-element arrays, 100 MB headers...)."""
    for i, (data, _) in enumerate(HEADER_CASES.values()):
        (tmp_path / f"h{i}.gguf").write_bytes(data)
    for i, (infos, _) in enumerate(TENSOR_CASES.values()):
        (tmp_path / f"t{i}.gguf").write_bytes(gguf([ARCH], infos, bytes(64)))
    for i, (data, _) in enumerate(ST_CASES.values()):
        (tmp_path / f"s{i}.safetensors").write_bytes(data)
    with deadline(120):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout
    assert int(out.stdout.strip()) < 16 * 1024, f"peak RSS grew by {out.stdout.strip()} KiB"


# -- chat templates: escapes and bombs, from a GGUF, from tokenizer_config.json, and through keywords -------------
ESCAPES = {
    "cycler globals": "{{ cycler.__init__.__globals__.os.system('touch ' ~ sentinel) }}",
    "joiner globals": "{{ joiner.__init__.__globals__['os'].popen('touch ' ~ sentinel).read() }}",
    "namespace globals": "{{ namespace.__init__.__globals__ }}",
    "str mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "raise_exception globals": "{{ raise_exception.__globals__['__builtins__']['open'](sentinel, 'w') }}",
    "attr filter": "{{ (messages|attr('__class__')).__base__.__subclasses__() }}",
    "format string": "{{ '{0.__class__.__base__.__subclasses__}'.format(messages) }}",
    "list mutation": "{{ messages.append({'role': 'system', 'content': 'owned'}) }}",
    "namespace underscore": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "self": "{{ self._TemplateReference__context.environment }}",
}
BOMBS = {
    "range 10**9": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "nested ranges": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "ran for more"),
    "recursion": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                  "ran for more"),
    "string * 10**10": ("{{ 'a' * 10**10 }}", "repeated string"),
    "list * 10**10": ("{{ ([1] * 10**10)|length }}", "repeated string or list"),
    "doubling by ~": ("{% set ns = namespace(s='ab') %}{% for i in range(99) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}", "concatenation"),
    "doubling by +": ("{% set ns = namespace(s=[1]) %}{% for i in range(99) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "joined string or list"),
    "power": ("{{ 2 ** (10**9) }}", "bits"),
    "center": ("{{ 'a'|center(10**10) }}", "center"),
    "ljust": ("{{ 'a'.ljust(10**10) }}", "ljust"),
    "%-width": ("{{ '%999999999999s' % 'a' }}", "width"),
    "format width": ("{{ '{:>999999999}'.format('a') }}", "width"),
    "replace": ("{{ ('a' * 1000000)|replace('a', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb') }}", "replace"),
    "join": ("{{ (['x'] * 100000)|join('y' * 1000) }}", "join"),
    "indent": ("{{ ('a\n' * 1000)|indent(10**8) }}", "indent"),
    "batch fill": ("{{ [1]|batch(10**10, 0)|list }}", "batch"),
    "tojson indent": ("{{ messages|tojson(indent=10**9) }}", "indent"),
    "lipsum": ("{{ lipsum(10**9) }}", "lipsum' is undefined"),
    "output": ("{% for i in range(3) %}{{ 'x' * 7999999 }}{% endfor %}", "rendered text"),
    "deep syntax": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "compiled|nested|recursion"),
}  # fmt: skip
SECONDS_PER_RENDER = 0.5  # MAX_SECONDS in these tests: the time bombs stop after it


@pytest.fixture
def short_renders(monkeypatch):
    from hearthlm import chat_sandbox

    monkeypatch.setattr(chat_sandbox, "MAX_SECONDS", SECONDS_PER_RENDER)


def gguf_template(tmp_path: Path, template: str) -> Tokenizer:
    path = tmp_path / "t.gguf"
    path.write_bytes(gguf([*vocab(), text("tokenizer.chat_template", template)]))
    return load_tokenizer(path)


def config_template(tmp_path: Path, template: str) -> Tokenizer:
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    model = {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<unk>"}))
    return Tokenizer(folder)


SOURCES = {"gguf": gguf_template, "tokenizer_config": config_template}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("probe", ESCAPES)
def test_template_escapes_are_refused(tmp_path, source, probe):
    sentinel = tmp_path / "escaped"
    tok = SOURCES[source](tmp_path, ESCAPES[probe])
    with deadline(), pytest.raises(ChatTemplateError, match="cannot render|SecurityError|unsafe|undefined"):
        out = tok.apply_chat_template(CHAT, sentinel=str(sentinel))
        assert "<module" not in out and "<class" not in out and "owned" not in out  # rendered, but learnt nothing
        raise ChatTemplateError(f"cannot render: rendered harmlessly as {out[:80]!r}")
    assert not sentinel.exists()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("probe", BOMBS)
def test_template_bombs_are_stopped(tmp_path, short_renders, source, probe):
    template, match = BOMBS[probe]
    tok = SOURCES[source](tmp_path, template)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with deadline(), pytest.raises(ChatTemplateError, match=match) as info:
            tok.apply_chat_template(CHAT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < SECONDS_PER_RENDER + 5
    assert peak < 200 * 1024 * 1024, f"peak {peak} bytes"  # the output cap: 8M characters, up to 4 bytes each
    assert str(info.value).startswith(str(tmp_path))  # names the file the template came from


def test_template_keywords_are_data_not_code(tmp_path, short_renders):
    """chat_template_kwargs reach a template as variables: a value is never rendered as a template, cannot replace
    the messages, and a hostile value runs into the same limits."""
    tok = config_template(tmp_path, "{{ greeting }}|{{ messages[0].content }}|{% for i in range(n) %}.{% endfor %}")
    escape = "{{ cycler.__init__.__globals__ }}"
    assert tok.apply_chat_template(CHAT, greeting=escape, n=3) == f"{escape}|hi|..."
    with pytest.raises(ChatTemplateError, match="Range too big"):
        tok.apply_chat_template(CHAT, greeting="", n=10**9)
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(ValueError, match="nested too deeply"):
        tok.apply_chat_template(CHAT, greeting=nested, n=0)
    tok = config_template(tmp_path, "{{ x * n }}{{ range(3)|list }}")
    with pytest.raises(ChatTemplateError, match="repeated string"):
        tok.apply_chat_template(CHAT, x="ab", n=10**10)
    assert tok.apply_chat_template(CHAT, x="ab", n=2) == "abab[0, 1, 2]"
    with pytest.raises(ChatTemplateError, match="'str' object is not callable"):  # a keyword shadows, as data
        tok.apply_chat_template(CHAT, x="ab", n=2, range="shadowed")


def test_templates_render_in_the_immutable_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from hearthlm.chat_sandbox import _environment

    assert isinstance(_environment(), ImmutableSandboxedEnvironment)
