"""Image and audio input for Gemma 4: decoding and preprocessing as the reference processor does it
(image.py, audio.py), prompts with media placeholders expanded (prompt.py), the towers loaded on first use and
run batched (towers.py, encoder.py), and the splice of their outputs into a forward pass (splice.py).

Pillow, soundfile and soxr are imported only when an image or audio input arrives."""

from .errors import MediaDecodeError, MediaError, MediaSizeError, ModalityError

__all__ = ["MediaDecodeError", "MediaError", "MediaSizeError", "ModalityError"]
