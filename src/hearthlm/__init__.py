"""hearthlm: a local LLM runtime in Python on PyTorch."""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# PyTorch's OpenMP threads (libgomp) spin 300,000 rounds after each parallel region before they sleep: ~10 ms of a
# core on Zen 4, which hearthlm's own kernel threads (kernels/threadpool.cpp) then wait for. A short spin keeps
# back-to-back PyTorch ops fast and frees the core within ~0.3 ms (docs/cpu-kernels.md, "Threads"). libgomp reads
# this once, when torch loads, so it holds where hearthlm is imported first; a user's own setting wins.
if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "10000"

# Public names, imported on first use: `hearth list`, `pull` and `rm` then start without loading torch.
_EXPORTS = {
    "LLM": "api",
    "Completion": "api",
    "ContextLengthError": "api",
    "SamplingParams": "api",
    "Usage": "api",
    "ChatTemplateError": "tokenizer",
    "Detokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hearthlm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
