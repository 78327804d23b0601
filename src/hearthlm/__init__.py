"""hearthlm: a local LLM runtime in Python on PyTorch."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

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
