"""Images for Gemma 4, as its reference image processor prepares them.

1. Decode with Pillow (PNG, JPEG, WebP, GIF: first frame, and whatever else Pillow reads); transparency is
   composited onto white; RGB.
2. Resize, keeping the aspect ratio, to the largest size whose sides are multiples of pool * patch (48 px) and
   whose 16-px patches number at most budget * pool^2 (bicubic, on the 8-bit image).
3. Rescale to [0, 1] (no mean / std), cut into 16x16 patches (row-major; each patch's values ordered row, column,
   channel) with their (x, y) grid positions. Soft tokens = patches / 9.

Memory stays bounded: an image whose header states more than `max_pixels` is refused before its pixels are
decoded (a JPEG is instead decoded at a reduced scale that fits).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MediaDecodeError, MediaSizeError

BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image the model was trained with
DEFAULT_BUDGET = 280
MAX_PIXELS = 50_000_000  # refuse (or, for JPEG, decode at a reduced scale) above this many pixels


@dataclass
class ImagePatches:
    patches: np.ndarray  # [P, 3 * patch^2] float32 in [0, 1]
    positions: np.ndarray  # [P, 2] int64 (x, y) of each patch
    tokens: int  # soft tokens after pooling
    key: bytes  # content hash of the patches (the pixels and the budget they were resized for)
    size: tuple[int, int]  # (width, height) after resizing


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise MediaDecodeError("image input needs Pillow: pip install pillow") from None
    return Image


def open_image(source: Any, max_pixels: int = MAX_PIXELS):
    """A path, bytes or a PIL image -> an RGB PIL image (first frame of an animation)."""
    Image = _pillow()
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read(source)
        try:
            with warnings.catch_warnings():  # the pixel limit is ours (below); Pillow's own check only warns here
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise MediaSizeError(
                f"the image states more pixels than Pillow will open, over the limit of {max_pixels / 1e6:.0f} "
                "megapixels: downscale it first"
            ) from None
        except Exception as e:
            raise MediaDecodeError(
                f"could not decode the image ({type(e).__name__}: {e}): send a PNG, JPEG, WebP or GIF file"
            ) from None
    w, h = image.size
    if w == 0 or h == 0:
        raise MediaSizeError(f"the image is empty ({w}x{h} pixels): send an image with at least one pixel")
    if w * h > max_pixels:
        image = _shrink_or_refuse(image, max_pixels)
    try:
        image.seek(0)
        return _rgb(image)
    except Exception as e:
        raise MediaDecodeError(
            f"could not decode the image ({type(e).__name__}: {e}): the file may be truncated"
        ) from None


def _read(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise MediaDecodeError(f"cannot read image file {source}: {e.strerror}") from None
    raise MediaDecodeError(f"an image must be a path, bytes or a PIL.Image, got {type(source).__name__}")


def _shrink_or_refuse(image, max_pixels: int):
    w, h = image.size
    if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale: the full-size pixels never exist in memory
        scale = math.sqrt(max_pixels / (w * h))
        # draft picks the largest reduction that keeps the image at least this size: at half the size that fits,
        # that is a reduction whose result fits (when 1/8 suffices)
        image.draft("RGB", (max(1, int(w * scale / 2)), max(1, int(h * scale / 2))))
        if image.size[0] * image.size[1] <= max_pixels:
            return image
    raise MediaSizeError(
        f"the image has {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of {max_pixels / 1e6:.0f}: "
        "downscale it first, or raise the limit (max_pixels)"
    )


def _rgb(image):
    Image = _pillow()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, budget: int, patch: int = 16, pool: int = 3) -> tuple[int, int]:
    """(height, width) after resizing: sides multiples of pool * patch, at most budget * pool^2 patches."""
    max_patches = budget * pool * pool
    side = pool * patch
    scale = math.sqrt(max_patches * patch * patch / (height * width))
    th, tw = math.floor(height * scale / side) * side, math.floor(width * scale / side) * side
    longest = budget * side  # one row (or column) of `budget` soft tokens
    if th == 0:  # a very wide image: one row of tokens, as long as the ratio allows
        th, tw = side, min(math.floor(width / height) * side, longest)
    elif tw == 0:
        th, tw = min(math.floor(height / width) * side, longest), side
    return th, tw


def check_budget(budget: int) -> int:
    if budget not in BUDGETS:
        raise ValueError(f"image token budget must be one of {', '.join(map(str, BUDGETS))}, got {budget!r}")
    return budget


def image_patches(image, budget: int = DEFAULT_BUDGET, patch: int = 16, pool: int = 3) -> ImagePatches:
    """An RGB PIL image -> its patches and positions for a soft-token `budget` (one of BUDGETS)."""
    Image = _pillow()
    check_budget(budget)
    th, tw = target_size(image.height, image.width, budget, patch, pool)
    if (tw, th) != image.size:
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    ph, pw = th // patch, tw // patch
    patches = pixels.reshape(ph, patch, pw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    ys, xs = np.divmod(np.arange(ph * pw), pw)
    positions = np.stack([xs, ys], axis=-1).astype(np.int64)
    h = hashlib.blake2b(np.array([ph, pw], dtype=np.int64).tobytes(), digest_size=16, person=b"image")
    h.update(patches.tobytes())
    key = h.digest()
    return ImagePatches(np.ascontiguousarray(patches), positions, ph * pw // (pool * pool), key, (tw, th))
