"""Fuzz target: the GGUF reader (weights/gguf.py) on arbitrary bytes. Allowed: GGUFError. Every tensor that a
file declares and the reader accepts must be readable in full from the mapping."""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(__file__))
import numpy  # noqa: E402, F401  (imported before instrumentation: only hearthlm is instrumented)
import torch  # noqa: E402, F401
from harness import main  # noqa: E402
from seeds import gguf_file  # noqa: E402

with atheris.instrument_imports(include=["hearthlm"]):
    from hearthlm.weights.gguf import GGUFError, GGUFFile

PATH = os.path.join(tempfile.mkdtemp(prefix="fuzz-gguf-"), "input.gguf")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        gguf = GGUFFile(PATH)
    except GGUFError:
        return
    for name, info in gguf.tensors.items():
        raw = gguf.raw(name)
        assert raw.numel() == info.nbytes and info.offset + info.nbytes <= len(data), name
        raw.sum()  # touches every byte: a view past the file would fault here


def seeds():
    return [gguf_file(), gguf_file(tokens=1, alignment=8), gguf_file(tokens=40, alignment=64)]


if __name__ == "__main__":
    main(test_one_input, seeds)
