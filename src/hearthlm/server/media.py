"""Image and audio content in requests, as the model's chat template and LLM.media_prompt read them: OpenAI's
`image_url` (data URLs) and `input_audio` parts, Ollama's `images` (which also carry audio, as Ollama sends it),
and parts other APIs have already turned into `{"type": "image" | "audio", ...}`."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import APIError

_MEDIA = {"image_url", "input_audio", "image", "audio"}


def message_content(m: dict[str, Any], where: str) -> str:
    """A message's content: text as one string, or a list of parts when it holds images or audio."""
    content, images = m.get("content"), m.get("images") or []
    if content is not None and not isinstance(content, (str, list)):
        raise APIError(400, f"{where}.content: content must be a string or a list of parts", f"{where}.content")
    parts = content if isinstance(content, list) else ([{"type": "text", "text": content}] if content else [])
    if not isinstance(images, list):
        raise APIError(400, f"{where}.images: a list of base64 strings", f"{where}.images")
    parts = [_part(p, f"{where}.content.{k}") for k, p in enumerate(parts)]
    parts += [_ollama_media(b, f"{where}.images.{k}") for k, b in enumerate(images)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def has_media(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": str(part.get("text") or "")}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            raise APIError(400, f"{where}: image URLs are not fetched (the server does not reach out to the "
                           "network for a request): send the image as a data URL (data:image/png;base64,...)",
                           where)  # fmt: skip
        return {"type": "image_url", "image_url": {"url": url}}
    if isinstance(kind, str) and kind in _MEDIA:
        return part
    raise APIError(400, f"{where}: content parts of type {kind!r} are not supported (text, image_url, input_audio)",
                   where)  # fmt: skip


def _ollama_media(data: Any, where: str) -> dict[str, Any]:
    """One of Ollama's `images`: base64 bytes of an image, or of audio (WAV, FLAC, MP3, OGG) as Ollama takes it."""
    if not isinstance(data, str):
        raise APIError(400, f"{where}: an image is a base64 string", where)
    try:
        raw = base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not valid base64", where) from None
    audio = raw[:4] in (b"RIFF", b"fLaC", b"OggS", b"ID3\x03", b"ID3\x04") or raw[:2] in (b"\xff\xfb", b"\xff\xf3")
    return {"type": "audio", "audio": raw} if audio else {"type": "image", "image": raw}
