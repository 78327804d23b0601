"""One forward over a batch of whole inputs, without a KV cache: what embeddings need from a model.

Rows are right-padded to the longest; every row starts at position 0. `EncoderStore` stands in for the KV cache
(layers/attention.py's KVStore): each layer attends over this step's own K/V under a mask built once per window
size from the row lengths. Causal models keep their causal (and sliding) masks, so a generative model's hidden
states are exactly those of a prefill; bidirectional models (embedding encoders) see the whole row, within a radius
on sliding layers. Padding keys are masked out, so padding changes no real position's result.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..engine.kv_cache import sdpa
from ..layers.attention import Batch
from ..models.base import CausalLM


def attention_mask(lengths: torch.Tensor, T: int, window: int | None, bidirectional: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query q may read key k. Causal: k <= q and k > q - window; bidirectional:
    |q - k| <= window (the whole row without a window). Keys past a row's length are masked; a padding query
    also reads itself, so that no softmax row is empty (its result is never used)."""
    pos = torch.arange(T, device=lengths.device)
    q, k = pos[:, None], pos[None, :]
    if bidirectional:
        allowed = (q - k).abs() <= window if window else torch.ones(T, T, dtype=torch.bool, device=pos.device)
    else:
        allowed = k <= q
        if window:
            allowed = allowed & (k > q - window)
    real = k[None] < lengths[:, None, None]  # [B, 1, T]
    return ((allowed[None] & real) | (q == k)[None])[:, None]


class EncoderStore:
    """A KVStore for one whole-input forward: no cache; KV-shared layers read their source layer's K/V of this step."""

    def __init__(self, cfg: ModelConfig, lengths: torch.Tensor, T: int):
        self.source = [s.kv_source for s in cfg.layers]
        self.window = [s.sliding_window for s in cfg.layers]
        self.shared_sources = {s for s in self.source if s is not None}
        self.masks = {w: attention_mask(lengths, T, w, cfg.bidirectional) for w in set(self.window)}
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def decode_slots(self, layer: int) -> None:
        return None  # no fused decode step: there is no cache to read

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """q [B, T, Hq, D]; k, v [B, T, Hkv, D] (None on KV-shared layers) -> [B, T, Hq, D]."""
        src = self.source[layer]
        if src is not None:
            k, v = self._kv[src]
        elif layer in self.shared_sources:
            self._kv[layer] = (k, v)
        dtype = q.dtype
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.device.type == "cpu":  # as the KV caches do: PyTorch's CPU attention is fastest in fp32
            q, k, v = q.float(), k.float(), v.float()
        out = sdpa(q, k, v, self.masks[self.window[layer]], False, scale)
        return out.to(dtype).transpose(1, 2)


@torch.inference_mode()
def encode(model: CausalLM, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (non-empty) -> (per-token embedding states [B, T, E] of the model, lengths [B])."""
    device = model.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    T = int(lengths.max())
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)
    positions = torch.arange(T, device=device).expand(len(rows), T)
    store = EncoderStore(model.config, lengths, T)
    hidden = model(ids, Batch(positions=positions, cache=store))
    return model.embedding_states(hidden), lengths
