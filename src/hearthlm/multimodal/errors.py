"""Errors for bad media input: each a ValueError whose message names the problem and the way out (the server
turns ValueErrors into 400 responses)."""

from __future__ import annotations


class MediaError(ValueError):
    """An image or audio input that hearthlm cannot use."""


class MediaDecodeError(MediaError):
    """The bytes are not an image / audio file in a supported format."""


class MediaSizeError(MediaError):
    """Empty, or over a configured limit (pixels, seconds, bytes)."""


class ModalityError(MediaError):
    """The model does not take this kind of input (an image sent to a text-only model)."""
