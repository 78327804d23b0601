"""Fuzz target: the safetensors reader (weights/safetensors.py) on arbitrary bytes. Allowed: CheckpointError.
Every tensor of an accepted file is read in full."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402, F401  (imported before instrumentation: only hearthlm is instrumented)
from harness import main  # noqa: E402
from seeds import safetensors_file  # noqa: E402

with atheris.instrument_imports(include=["hearthlm"]):
    from hearthlm.weights.safetensors import CheckpointError, SafetensorsFile

PATH = Path(tempfile.mkdtemp(prefix="fuzz-st-")) / "model.safetensors"


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    try:
        f = SafetensorsFile(PATH)
        tensors = [f.get(name) for name in f.keys()]
    except CheckpointError:
        return
    for t in tensors:
        t.view(-1).view(torch.uint8).sum() if t.numel() else None  # touches every byte


def seeds():
    return [safetensors_file()]


if __name__ == "__main__":
    main(test_one_input, seeds)
