"""Errors the engine raises at its boundary (re-exported by hearthlm.api)."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """A prompt that leaves no room to generate in the model's context."""
