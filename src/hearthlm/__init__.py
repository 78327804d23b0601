"""hearthlm: a local LLM runtime in Python on PyTorch."""

from .api import LLM, Completion, SamplingParams, Usage
from .tokenizer import ChatTemplateError, Detokenizer, Tokenizer, load_tokenizer

__all__ = [
    "LLM",
    "ChatTemplateError",
    "Completion",
    "Detokenizer",
    "SamplingParams",
    "Tokenizer",
    "Usage",
    "load_tokenizer",
]
__version__ = "0.1.0"
