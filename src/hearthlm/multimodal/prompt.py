"""Chat messages with image and audio parts -> a prompt: token ids with each placeholder expanded to
`<|image>` + `<|image|>` x N + `<image|>` (audio alike), and where each item's soft tokens sit.

Content parts accepted (in any message, several per prompt):
- {"type": "image", "image": path | bytes | PIL.Image}
- {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (or the URL as a plain string)
- {"type": "audio", "audio": path | bytes | (samples, rate)}
- {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}} (OpenAI's form)
The chat template writes one placeholder per part, in order; the n-th placeholder is the n-th part.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from .audio import AudioClip, audio_features, load_audio
from .errors import MediaDecodeError, ModalityError
from .image import DEFAULT_BUDGET, MAX_PIXELS, ImagePatches, check_budget, image_patches, open_image
from .spec import MediaSpec

IMAGE_PARTS = ("image", "image_url")
AUDIO_PARTS = ("audio", "input_audio")


@dataclass(frozen=True)
class Span:
    """One item's soft tokens: positions [start, start + length) of the prompt."""

    start: int
    length: int
    kind: str  # "image" | "audio"
    key: bytes  # the item's content hash
    item: int  # index into MediaPrompt.items

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class MediaPrompt:
    """A prompt with media: what LLM.logits(messages=...) scores and what the engine runs."""

    ids: list[int]
    items: list[ImagePatches | AudioClip]
    spans: list[Span]
    bidirectional: bool = False  # image spans attend both ways on sliding layers
    embeddings: dict[bytes, Any] = field(default_factory=dict)  # key -> [tokens, hidden], filled by encoding

    def block_key(self, start: int, end: int) -> bytes:
        """The content hashes of the items whose soft tokens overlap [start, end): mixed into the prefix cache's
        block keys, so that the same placeholder ids with another image never match."""
        return b"".join(s.key for s in self.spans if s.start < end and s.end > start)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk [start, end) should end so that no item's soft tokens are split: before an item
        that would be cut, or past its end when the chunk starts inside it."""
        for s in self.spans:
            if s.start < end < s.end:
                return s.start if s.start > start else s.end
            if end == start + 1 and s.start <= start < s.end:
                return end + 1  # a one-token chunk would run as a decode step, without media: take the end token too
        return end


@dataclass
class MediaOptions:
    """Per-request preprocessing choices."""

    image_tokens: int = DEFAULT_BUDGET  # soft-token budget per image: 70, 140, 280, 560 or 1120
    max_pixels: int = MAX_PIXELS  # larger images are refused (JPEG: decoded at a reduced scale)


def media_parts(messages: list[dict]) -> list[dict]:
    """The image and audio parts of `messages`, in the order the chat template writes their placeholders."""
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") in IMAGE_PARTS + AUDIO_PARTS]
    return parts


def preprocess(part: dict, options: MediaOptions, spec: MediaSpec | None, model: str) -> ImagePatches | AudioClip:
    """One content part -> its patches or features, checked against what the model takes."""
    kind = "image" if part["type"] in IMAGE_PARTS else "audio"
    have = spec.modalities if spec is not None else {"text"}
    if kind not in have:
        takes = " and ".join(sorted(have))
        raise ModalityError(
            f"{model} does not take {kind} input (it takes {takes}): remove the {kind} part or use a model that does"
        )
    if kind == "image":
        image = open_image(_image_source(part), options.max_pixels)
        return image_patches(image, check_budget(options.image_tokens), spec.vision.patch, spec.vision.pool)
    return audio_features(load_audio(_audio_source(part)))


def _image_source(part: dict) -> Any:
    if part["type"] == "image":
        if "image" not in part:
            raise MediaDecodeError('an image part needs an "image" field: a path, bytes or a PIL.Image')
        return part["image"]
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:"):
        raise MediaDecodeError(
            "image_url must be a data URL (data:image/png;base64,...) here: fetch the image and send its bytes"
        )
    header, _, payload = url.partition(",")
    mime = header[5:].split(";")[0]
    if not mime.startswith("image/"):
        raise MediaDecodeError(f"image_url holds a {mime or 'untyped'} data URL: send an image/* data URL")
    return _b64(payload) if ";base64" in header else payload.encode()


def _audio_source(part: dict) -> Any:
    if part["type"] == "audio":
        if "audio" not in part:
            raise MediaDecodeError('an audio part needs an "audio" field: a path, bytes or (samples, rate)')
        return part["audio"]
    data = part.get("input_audio")
    data = data.get("data") if isinstance(data, dict) else data
    if not isinstance(data, str):
        raise MediaDecodeError('input_audio needs {"data": base64 audio, "format": "wav" | "mp3" | ...}')
    return _b64(data)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaDecodeError("the media data is not valid base64") from None


def expand(ids: list[int], items: list[ImagePatches | AudioClip], spec: MediaSpec) -> MediaPrompt:
    """Replace the n-th image / audio placeholder id in `ids` by the n-th item's begin token, soft tokens and end
    token; the placeholders must match the items in number and kind."""
    out: list[int] = []
    spans: list[Span] = []
    it = iter(enumerate(items))
    found = 0
    for t in ids:
        if t not in (spec.image_id, spec.audio_id):
            out.append(t)
            continue
        found += 1
        i, item = next(it, (None, None))
        kind = "image" if t == spec.image_id else "audio"
        if item is None or isinstance(item, ImagePatches) != (kind == "image"):
            break
        begin, end = (spec.boi_id, spec.eoi_id) if kind == "image" else (spec.boa_id, spec.eoa_id)
        out.append(begin)
        spans.append(Span(len(out), item.tokens, kind, item.key, i))
        out += [t] * item.tokens + [end]
    if found != len(items) or len(spans) != len(items):
        raise ValueError(
            f"the prompt has {found} media placeholder(s) for {len(items)} image/audio part(s), or their kinds "
            "differ: the chat template must write one <|image|> / <|audio|> per part (do not type them in text)"
        )
    return MediaPrompt(out, items, spans, bidirectional=spec.bidirectional_images)
