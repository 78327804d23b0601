"""Valid files for the fuzzers to start from: small GGUF files (metadata of every value type, tensors of float
and block types) and safetensors files, written byte by byte."""

from __future__ import annotations

import json
import struct

STRING, ARRAY = 8, 9


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def gguf_file(tokens: int = 8, alignment: int = 32) -> bytes:
    """A GGUF v3 file: scalars of every type, a string, numeric and string arrays, a llama vocabulary, and
    tensors of types F32, F16 and Q8_0."""
    words = [f"t{i}" for i in range(tokens)]
    kvs = [
        _kv("general.architecture", STRING, _s("llama")),
        _kv("general.alignment", 4, struct.pack("<I", alignment)),
        *(_kv(f"x.{t}", t, struct.pack(f, v)) for t, f, v in [(0, "<B", 1), (1, "<b", -1), (2, "<H", 2), (3, "<h", -2),
          (5, "<i", -3), (6, "<f", 0.5), (7, "<?", True), (10, "<Q", 4), (11, "<q", -4), (12, "<d", 0.25)]),
        _kv("tokenizer.ggml.model", STRING, _s("llama")),
        _kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, tokens) + b"".join(_s(w) for w in words)),
        _kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, tokens) + struct.pack(f"<{tokens}f", *range(tokens))),
    ]  # fmt: skip
    tensors = [("a", [4, 2], 0, 32), ("b", [8], 1, 16), ("c", [32], 8, 34)]  # name, dims, type, bytes
    infos, data = [], b""
    for name, dims, ggml_type, nbytes in tensors:
        infos.append(_s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, len(data)))
        data += bytes(range(nbytes)) + bytes(-nbytes % alignment)
    body = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % alignment) + data


def safetensors_file() -> bytes:
    """Three tensors of different dtypes and a __metadata__ entry."""
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        "c": {"dtype": "I64", "shape": [1], "data_offsets": [22, 30]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(30))
