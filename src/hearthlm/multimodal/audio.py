"""Audio for Gemma 4, as its reference feature extractor prepares it.

1. Decode (WAV, FLAC, MP3, OGG: libsndfile through `soundfile`), average the channels to mono, resample to
   16 kHz (`soxr`, its default high quality).
2. Log-mel features: 20 ms periodic-Hann frames every 10 ms, the first centred on t = 0 (10 ms of zeros in
   front), a 512-point FFT magnitude, 128 HTK-mel triangles over 0-8 kHz (no area normalisation),
   log(mel + 0.001). A frame counts only when all of its samples are real audio.
3. Soft tokens: one per 4 frames (40 ms), at most 750 (30 s): longer clips are refused, not cut.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MediaDecodeError, MediaSizeError

RATE = 16_000
FRAME = 320  # samples per analysis frame (20 ms)
HOP = 160  # 10 ms
FFT = 512
MELS = 128
MEL_FLOOR = 1e-3
MAX_SECONDS = 30.0  # 480,000 samples: 3000 frames, 750 soft tokens


@dataclass
class AudioClip:
    features: np.ndarray  # [frames, 128] float32
    tokens: int
    key: bytes  # content hash of the features
    seconds: float


def load_audio(source: Any) -> np.ndarray:
    """A path, bytes, or (samples, rate) -> mono float32 samples at 16 kHz."""
    if isinstance(source, tuple) and len(source) == 2:
        samples, rate = np.asarray(source[0], dtype=np.float32), int(source[1])
    else:
        samples, rate = _decode(source)
    if samples.ndim == 2:  # [frames, channels] -> mono
        samples = samples.mean(axis=1, dtype=np.float32)
    if samples.ndim != 1:
        raise MediaDecodeError(f"audio samples must be 1-D (mono) or 2-D [frames, channels], got shape {samples.shape}")
    if rate <= 0:
        raise MediaDecodeError(f"audio sample rate must be positive, got {rate}")
    if rate != RATE and samples.size:
        import soxr

        samples = soxr.resample(samples, rate, RATE).astype(np.float32)
    return samples


def _decode(source: Any) -> tuple[np.ndarray, int]:
    import soundfile

    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise MediaDecodeError(f"cannot read audio file {source}: {e.strerror}") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise MediaDecodeError(f"audio must be a path, bytes or (samples, rate), got {type(source).__name__}")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaDecodeError(
            f"could not decode the audio ({type(e).__name__}: {e}): send a WAV, FLAC, MP3 or OGG file"
        ) from None
    return samples, rate


def frames(samples: int) -> int:
    """Mel frames with only real samples, for a clip of `samples` samples."""
    return max(0, (samples + FRAME // 2 - (FRAME + 1)) // HOP + 1)


def audio_features(samples: np.ndarray, max_seconds: float = MAX_SECONDS) -> AudioClip:
    """Mono 16 kHz samples -> log-mel features and the clip's soft-token count."""
    seconds = samples.size / RATE
    if seconds > max_seconds:
        raise MediaSizeError(
            f"the audio is {seconds:.1f} s long, over the model's limit of {max_seconds:g} s "
            f"({math.ceil(max_seconds * 25)} tokens): trim it or send it as several clips"
        )
    n = frames(samples.size)
    if n == 0:
        raise MediaSizeError(f"the audio is too short ({samples.size} samples at 16 kHz): send at least 10 ms")
    padded = np.concatenate([np.zeros(FRAME // 2, dtype=np.float32), samples.astype(np.float32)])
    starts = np.arange(n) * HOP
    windows = padded[starts[:, None] + np.arange(FRAME)[None, :]] * _window()  # [n, FRAME]
    magnitude = np.abs(np.fft.rfft(windows, n=FFT, axis=-1))  # float32
    # The mel sum and the log in float64, as the reference does (its filters stay float64): float32 here moves the
    # features by ~2e-7, which the audio tower and the text model amplify a hundredfold.
    feats = np.log(magnitude @ _mel_filters() + MEL_FLOOR).astype(np.float32)
    key = hashlib.blake2b(feats.tobytes(), digest_size=16, person=b"audio").digest()
    return AudioClip(feats, (n + 3) // 4, key, seconds)


@cache
def _window() -> np.ndarray:
    n = np.arange(FRAME)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / FRAME)).astype(np.float32)  # periodic Hann


@cache
def _mel_filters() -> np.ndarray:
    """[FFT / 2 + 1, MELS] triangles, HTK mel scale, 0-8000 Hz, peaks of height 1."""
    to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(RATE / 2), MELS + 2))  # [MELS + 2]
    bins = np.linspace(0, RATE // 2, FFT // 2 + 1)  # [F]
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lo) / (mid - lo)
    falling = (hi - bins[:, None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling))  # float64
