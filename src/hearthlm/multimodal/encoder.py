"""Encoding prompts' media through the towers: the items of all the prompts asked for at once, one batched tower
call per kind, with recent outputs kept by content hash so that a repeated image or clip is not encoded again."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .image import ImagePatches
from .prompt import MediaPrompt
from .towers import Towers

CACHE_BYTES = 256 * 2**20  # encoder outputs kept for reuse, least recently used dropped first


class MediaEncoder:
    def __init__(self, towers: Towers, cache_bytes: int = CACHE_BYTES):
        self.towers = towers
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.encoded = 0  # items run through a tower since creation (cache hits excluded)

    def encode(self, prompts: list[MediaPrompt], ranges: list[tuple[int, int]] | None = None) -> None:
        """Fill `prompt.embeddings` for the items of each prompt (only those overlapping its [start, end) range when
        `ranges` is given: a chunk, past what the prefix cache already holds)."""
        todo: dict[bytes, ImagePatches | object] = {}
        with self._lock:
            for i, prompt in enumerate(prompts):
                lo, hi = ranges[i] if ranges is not None else (0, len(prompt.ids))
                for span in prompt.spans:
                    if span.key in prompt.embeddings or not (span.start < hi and span.end > lo):
                        continue
                    hit = self._cache.get(span.key)
                    if hit is not None:
                        self._cache.move_to_end(span.key)
                        prompt.embeddings[span.key] = hit
                    else:
                        todo[span.key] = prompt.items[span.item]
        if not todo:
            return
        keys = list(todo)
        images = [k for k in keys if isinstance(todo[k], ImagePatches)]
        clips = [k for k in keys if not isinstance(todo[k], ImagePatches)]
        out = dict(zip(images, self.towers.encode_images([todo[k] for k in images])))
        out |= dict(zip(clips, self.towers.encode_audio([todo[k] for k in clips])))
        with self._lock:
            self.encoded += len(out)
            for key, emb in out.items():
                self._remember(key, emb)
            for prompt in prompts:
                for span in prompt.spans:
                    if span.key in out:
                        prompt.embeddings[span.key] = out[span.key]

    def _remember(self, key: bytes, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.cache_bytes or key in self._cache:
            return
        self._cache[key] = emb
        self._held += size
        while self._held > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()
