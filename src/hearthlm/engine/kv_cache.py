"""A contiguous KV cache: one [B, Hkv, S, D] buffer per layer that computes its own K/V.

- Full-attention layers keep S = max_len slots, indexed by position.
- Sliding-window layers keep a ring of S = window slots (slot = position % window): never more.
- KV-shared layers keep nothing; they read the K/V their source layer attended with in this step.
Masks are built once per forward from the absolute position held in every slot, per window size,
so sequences of different lengths share one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LayerSpec
from ..kernels import cpu
from ..multimodal.splice import widen


def slots(window: int | None, max_len: int) -> int:
    """Cache slots of a layer: its window (a ring), or max_len for full attention."""
    return min(window, max_len) if window else max_len


def cache_layers(model, layers: list[LayerSpec]) -> list[LayerSpec]:
    """The layer specs to build a KV cache from: `layers` (the config's), or a pipeline rank's own
    (distributed/pipeline.py), where the layers that other ranks run have no K/V heads and so no buffers."""
    return getattr(model, "kv_layers", layers)


def buffer_shapes(layers: list[LayerSpec], batch: int, max_len: int) -> dict[int, tuple[int, int, int, int]]:
    """The shape of the K buffer (and of the V buffer) of every layer that stores its own K/V; KV-shared
    layers store nothing. `hearth fit` sizes the cache from this too."""
    return {
        i: (batch, spec.num_kv_heads, slots(spec.sliding_window, max_len), spec.head_dim)
        for i, spec in enumerate(layers)
        if spec.kv_source is None
    }


class _Group:
    """Slot bookkeeping shared by all layers with the same window (None = full attention)."""

    def __init__(self, window: int | None, batch: int, slots: int, device: torch.device):
        self.window = window
        self.slot_pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.slots: torch.Tensor | None = None  # [b, T'] slots written this step
        self.written: slice = slice(None)  # which of the step's tokens are written
        self.concat = False  # sliding layer, T > 1: attend over ring + new tokens, then write
        self.length = 0  # full layers: slots [0, length) are read this step
        self.mask: torch.Tensor | None = None
        self.causal = False

    def begin(self, positions: torch.Tensor, rows: slice, spans: list | None = None) -> None:
        T = positions.shape[1]
        slot_pos = self.slot_pos[rows]
        w = self.window
        self.concat = w is not None and T > 1
        if w is None:
            self.slots, self.written = positions, slice(None)
            slot_pos.scatter_(1, positions, positions)
            self.length = int(positions.max()) + 1
            kpos = slot_pos[:, : self.length]
        elif not self.concat:
            self.slots, self.written = positions % w, slice(None)
            slot_pos.scatter_(1, self.slots, positions)
            kpos = slot_pos
        else:
            kpos = torch.cat((slot_pos, positions), dim=1)
            self.written = slice(max(0, T - w), T)
            self.slots = positions[:, self.written] % w
            slot_pos.scatter_(1, self.slots, positions[:, self.written])
        q = positions[:, :, None]
        k = kpos[:, None, :]
        mask = (k <= q) & (k >= 0)
        if w is not None:
            mask &= k > q - w
            if spans:  # media spans that attend both ways (multimodal/splice.py)
                mask = widen(mask, q, k, w, spans)
        self.causal = w is None and T > 1 and self.length == T and bool((positions[:, 0] == 0).all())
        self.mask = None if bool(mask.all()) else mask[:, None]  # [b, 1, T, S] or None: attend everywhere


SMALL_T = 32  # up to this many queries per row, attend with plain matmuls


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float
) -> torch.Tensor:
    """q [b, Hq, T, D], k/v [b, Hkv, S, D], mask [b, 1, T', S] (T' >= T: the queries are the last T) or None,
    causal: the mask is the plain causal one over S == T' -> [b, Hq, T, D]"""
    if mask is not None and q.shape[2] < mask.shape[2]:  # queries for the last positions only
        mask = mask[:, :, -q.shape[2] :]
        causal = False
    if q.shape[2] > SMALL_T or q.device.type != "cpu":
        mask = None if causal else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    # Few queries on CPU: PyTorch's fused CPU attention costs ~1 ms per call with 2 threads whatever the
    # length (measured), more than the whole layer's matmuls; a few small matmuls cost microseconds.
    b, hq, T, D = q.shape
    hkv = k.shape[1]
    scores = (q.reshape(b, hkv, (hq // hkv) * T, D) @ k.transpose(-1, -2)) * scale  # [b, Hkv, G*T, S]
    if mask is not None:
        scores = scores.view(b, hkv, hq // hkv, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(b, hkv, -1, k.shape[2])
    return (probs @ v).view(b, hq, T, D)


def attend_cached(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float
) -> torch.Tensor:
    """What both caches do once they hold the step's K/V: q [B, T, Hq, D], keys/values [B, Hkv, S, D] in the
    cache dtype, mask [B, 1, T', S] or None -> [B, T, Hq, D]."""
    if q.shape[1] == 1 and q.device.type == "cpu" and cpu.available():
        # Decode: one call that reads the cache in its own dtype (the generic path below costs ~20 ops).
        row_mask = mask[:, 0, -1] if mask is not None else None
        return cpu.decode_attention(q[:, 0].float(), keys, values, row_mask, scale).to(q.dtype)[:, None]
    q = q.transpose(1, 2)
    if q.device.type == "cpu":
        # Attend in fp32: PyTorch's CPU attention is several times slower in fp16/bf16 than in fp32
        # without AVX-512 (measured: 0.9 ms vs 0.12 ms at 512 keys). The cache keeps the model dtype.
        out = sdpa(q.float(), keys.float(), values.float(), mask, causal, scale).to(q.dtype)
    else:
        out = sdpa(q, keys, values, mask, causal, scale)
    return out.transpose(1, 2)


class ContiguousKVCache:
    def __init__(self, layers: list[LayerSpec], batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.max_len = batch, max_len
        self.source = [spec.kv_source for spec in layers]
        self.window = [spec.sliding_window for spec in layers]
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.groups: dict[int | None, _Group] = {}
        self.shared_sources = {s for s in self.source if s is not None}
        for w in dict.fromkeys(self.window):
            self.groups[w] = _Group(w, batch, slots(w, max_len), device)
        for i, shape in buffer_shapes(layers, batch, max_len).items():
            self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = slice(0, batch)
        self._step_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def decode_slots(self, layer: int) -> None:
        """See attention.KVStore.decode_slots: this cache's steps run module by module."""
        return None

    def begin(self, positions: torch.Tensor, rows: slice | None = None, spans: list | None = None) -> None:
        """Prepare a forward over `positions` [b, T] for cache rows `rows` (default: all); `spans`: per row, the
        [start, end) position ranges whose tokens attend to each other both ways on sliding layers."""
        self.rows = rows if rows is not None else slice(0, self.batch)
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the cache length {self.max_len}")
        for group in self.groups.values():
            group.begin(positions, self.rows, spans)
        self._row_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self._step_kv.clear()

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        group = self.groups[self.window[layer]]
        src = self.source[layer]
        if src is not None:
            keys, values = self._step_kv[src]
        else:
            keys, values = self._store(layer, group, k, v)
            if layer in self.shared_sources:
                self._step_kv[layer] = (keys, values)
        return attend_cached(q, keys, values, group.mask, group.causal, scale)

    def _store(self, layer: int, group: _Group, k: torch.Tensor, v: torch.Tensor):
        K, V = self.k[layer][self.rows], self.v[layer][self.rows]  # views [b, Hkv, S, D]
        rows = self._row_index
        k, v = k.to(K.dtype), v.to(V.dtype)  # activations may be wider than the cache (fp32 on CPU)
        if group.concat:
            keys = torch.cat((K, k.transpose(1, 2)), dim=2)
            values = torch.cat((V, v.transpose(1, 2)), dim=2)
        K[rows, :, group.slots] = k[:, group.written]
        V[rows, :, group.slots] = v[:, group.written]
        if group.concat:
            return keys, values
        if group.window is None:
            return K[:, :, : group.length], V[:, :, : group.length]
        return K, V
