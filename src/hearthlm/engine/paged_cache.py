"""The paged KV cache: the K/V of every layer that stores its own, in fixed-size blocks that the block
manager hands to sequences; a step reads each row's blocks through its block table.

Storage per layer is [Hkv, blocks * block_size, D] (a "slot" per position; each head's slots in one run, as
the decode kernels read them). A forward first writes the step's K/V into their slots, then attends over
each row's readable slots (its whole past for full attention, the last window for sliding layers) with a
mask built from the absolute positions. Decode on CPU reads those slots in place; otherwise they are
gathered into a [b, Hkv, S, D] tensor (a view when one row's slots are one run). KV-shared layers store
nothing and attend over their source layer's slots, as do the layers another pipeline rank runs (no K/V heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import LayerSpec
from ..kernels import cpu
from ..multimodal.splice import widen
from .kv_cache import attend_cached


@dataclass
class _Step:
    """One window group's slots and mask for the current forward."""

    write: torch.Tensor  # [b * T] slots the step's K/V go to
    read: torch.Tensor | slice  # [b * S] slots each row reads (padding repeats a valid slot, masked out),
    # or a slice when a single row's blocks are consecutive: then the step reads a view, no copy
    S: int
    mask: torch.Tensor | None  # [b, 1, T, S] or None: attend everywhere
    causal: bool  # the mask is exactly the causal one (S == T, one row from position 0)
    decode: tuple | None  # a CPU decode step's (write, read slots or None, read start, S, row mask): decode_slots
    keep: torch.Tensor | None = None  # [b * T] rows' positions that are not pads (runner.run_paged), when some are


def _one_run(rows: list[list[int]]) -> bool:
    """Whether the step is one request whose blocks are consecutive: its slots are one run, read as a slice."""
    return len(rows) == 1 and rows[0] == list(range(rows[0][0], rows[0][0] + len(rows[0])))


def _padded(rows: list[list[int]]) -> list[list[int]]:
    """Each row's blocks, padded to the longest with its own last block (a row's key positions past its end are
    clamped to its last position and masked)."""
    width = max(len(r) for r in rows)
    return [r + r[-1:] * (width - len(r)) for r in rows]


class PagedKVCache:
    def __init__(
        self,
        layers: list[LayerSpec],
        pool_sizes: dict[int | None, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.block_size = block_size
        self.window = [spec.sliding_window for spec in layers]
        self.source = [spec.kv_source for spec in layers]
        self.shared_sources = {s for s in self.source if s is not None}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, spec in enumerate(layers):
            if spec.kv_source is None and spec.num_kv_heads:  # none: another pipeline rank's layer
                shape = (spec.num_kv_heads, pool_sizes[spec.sliding_window] * block_size, spec.head_dim)
                # Untouched memory costs nothing until used; blocks are zeroed when first handed out.
                self.k[i] = torch.empty(shape, dtype=dtype, device=device)
                self.v[i] = torch.empty(shape, dtype=dtype, device=device)
        self.steps: dict[int | None, _Step] = {}
        self._step_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def block_bytes(self, window: int | None) -> int:
        """Bytes one block of `window`'s pool takes, K and V of every layer that stores its own."""
        return sum(
            2 * t.shape[0] * self.block_size * t.shape[2] * t.element_size()
            for i, t in self.k.items()
            if self.window[i] == window
        )

    @staticmethod
    def pool_windows(layers: list[LayerSpec]) -> list[int | None]:
        """The windows that need a block pool: those of layers storing their own K/V."""
        return list(dict.fromkeys(s.sliding_window for s in layers if s.kv_source is None))

    def zero(self, window: int | None, blocks: list[int]) -> None:
        """Clear blocks handed out for the first time: never-written memory may hold NaNs, which a masked
        attention would still multiply by zero."""
        if not blocks:
            return
        idx = torch.tensor(blocks, device=next(iter(self.k.values())).device)
        for i in self.k:
            if self.window[i] == window:
                for t in (self.k[i], self.v[i]):
                    t.view(t.shape[0], -1, self.block_size, t.shape[2])[:, idx] = 0

    def begin(
        self,
        positions: torch.Tensor,
        starts: list[int],
        tables: list[dict[int | None, list[int | None]]],
        spans: list | None = None,
    ):
        """Prepare a forward over positions [b, T] (row r from starts[r]) with each row's block tables; `spans`:
        per row, the [start, end) position ranges whose tokens attend to each other both ways on sliding layers.
        A row whose last position is before starts[r] + T - 1 begins with pads: positions repeating starts[r],
        whose K/V are not written."""
        self._step_kv.clear()
        for w in dict.fromkeys(self.window[i] for i in self.k):
            self.steps[w] = self._plan(w, positions, starts, [t[w] for t in tables], spans)

    def _plan(
        self, w: int | None, positions: torch.Tensor, starts: list[int], tables: list[list[int | None]], spans=None
    ) -> _Step:
        if positions.shape[1] == 1 and positions.device.type == "cpu" and not spans:
            return self._plan_decode(w, starts, tables)
        return self._plan_general(w, positions, starts, tables, spans)

    def _plan_general(
        self, w: int | None, positions: torch.Tensor, starts: list[int], tables: list[list[int | None]], spans=None
    ) -> _Step:
        bs, T, dev = self.block_size, positions.shape[1], positions.device
        his = positions[:, -1].tolist()
        pads = [T - (h - s + 1) for s, h in zip(starts, his)]
        los = [max(0, s - w + 1) if w else 0 for s in starts]
        rows = [table[lo // bs : hi // bs + 1] for table, lo, hi in zip(tables, los, his)]
        tab = torch.tensor(_padded(rows), dtype=torch.long, device=dev)  # [b, nb]
        lo, hi = torch.tensor(los, device=dev)[:, None], torch.tensor(his, device=dev)[:, None]
        S = max(h - l + 1 for l, h in zip(los, his))
        kpos = lo + torch.arange(S, device=dev)[None, :]  # [b, S]
        clamped = torch.minimum(kpos, hi)
        base = lo // bs
        if _one_run(rows):
            first = rows[0][0] * bs + los[0] % bs  # the common single-request case: slots in one run
            read = slice(first, first + S)
        else:
            read = (tab.gather(1, clamped // bs - base) * bs + clamped % bs).reshape(-1)
        write = tab.gather(1, positions // bs - base) * bs + positions % bs
        q, k = positions[:, :, None], kpos[:, None, :]
        mask = k <= q
        if w:
            mask &= k > q - w
            if spans:  # media spans that attend both ways (multimodal/splice.py)
                mask = widen(mask, q, k, w, spans)
        causal = w is None and len(starts) == 1 and starts[0] == 0 and S == T
        mask = None if bool(mask.all()) else mask[:, None]
        write, keep = write.reshape(-1), None
        if any(pads):
            keep = torch.tensor([r * T + j for r, p in enumerate(pads) for j in range(p, T)], device=dev)
            write = write[keep]
        decode = None
        if T == 1 and dev.type == "cpu":
            row_mask = None if mask is None else mask[:, 0, -1]
            runs = isinstance(read, slice)
            decode = (write, None if runs else read, read.start if runs else 0, S, row_mask)
        return _Step(write, read, S, mask, causal, decode, keep)

    def _plan_decode(self, w: int | None, starts: list[int], tables: list[list[int | None]]) -> _Step:
        """_plan's result for a CPU decode step (one position per row, at starts[r]), in NumPy: a step of a small
        model spent ~0.4 ms on _plan's two dozen small torch ops per window group, a third of its time at one row."""
        bs, q = self.block_size, np.asarray(starts, dtype=np.int64)
        lo = np.maximum(q - w + 1, 0) if w else np.zeros_like(q)
        S = int((q - lo).max()) + 1
        first = lo // bs
        rows = [table[a : b + 1] for table, a, b in zip(tables, first.tolist(), (q // bs).tolist())]
        write = torch.tensor([r[-1] * bs + p % bs for r, p in zip(rows, starts)], dtype=torch.long)
        kpos = lo[:, None] + np.arange(S)
        full = bool((q - lo == S - 1).all())  # every row reads S slots: no mask
        row_mask = None if full else torch.from_numpy(kpos <= q[:, None])
        mask = None if row_mask is None else row_mask[:, None, None, :]
        causal = w is None and len(starts) == 1 and starts[0] == 0
        if _one_run(rows):
            start = rows[0][0] * bs + int(lo[0]) % bs  # the common single-request case: slots in one run
            read = slice(start, start + S)
            return _Step(write, read, S, mask, causal, (write, None, start, S, row_mask))
        tab = np.array(_padded(rows), dtype=np.int64)  # [b, blocks]
        every = (tab * bs)[:, :, None] + np.arange(bs)  # [b, blocks, bs]: each row's slots in position order
        clamped = np.minimum(kpos, q[:, None])
        slots = np.take(every.ravel(), clamped + ((np.arange(len(rows)) * tab.shape[1] - first) * bs)[:, None])
        read = torch.from_numpy(slots.reshape(-1))  # (a flat take: a third of take_along_axis's time at 16 rows)
        return _Step(write, read, S, mask, causal, (write, read, 0, S, row_mask))

    def decode_slots(self, layer: int) -> tuple | None:
        """See attention.KVStore.decode_slots."""
        step = self.steps[self.window[layer]]
        if step.decode is None:
            return None
        write, *read = step.decode
        src = self.source[layer]
        if src is not None:  # a KV-shared layer reads its source layer's slots and writes none
            return (self.k[src], self.v[src], None, *read)
        return (self.k[layer], self.v[layer], write, *read)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        step = self.steps[self.window[layer]]
        src = self.source[layer]
        if src is None:
            self._write(layer, step, k, v)
            src = layer
        K, V = self.k[src], self.v[src]  # [Hkv, slots, D]; KV-shared layers read their source's
        if q.shape[1] == 1 and not isinstance(step.read, slice) and q.device.type == "cpu" and cpu.available():
            # Decode over scattered blocks (a batch, or a prefix-cache hit): read the slots in place.
            b, S = q.shape[0], step.S
            mask = step.mask[:, 0, -1] if step.mask is not None else None
            out = cpu.paged_decode_attention(q[:, 0].float(), K, V, step.read.view(b, S), mask, scale)
            return out.to(q.dtype)[:, None]
        return attend_cached(q, *self._read(src, step), step.mask, step.causal, scale)

    def _write(self, layer: int, step: _Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's k, v [b, T, Hkv, D] into their slots (the pads' not)."""
        K, V = self.k[layer], self.v[layer]
        _, _, H, D = k.shape
        k, v = k.reshape(-1, H, D), v.reshape(-1, H, D)
        if step.keep is not None:
            k, v = k[step.keep], v[step.keep]
        if k.device.type == "cpu" and k.dtype == torch.float32 and v.dtype == torch.float32 and cpu.available():
            cpu.kv_store(K, V, step.write, k, v)  # one call instead of two index_copy_ and their conversions
            return
        K.index_copy_(1, step.write, k.transpose(0, 1).to(K.dtype))
        V.index_copy_(1, step.write, v.transpose(0, 1).to(V.dtype))

    def _read(self, layer: int, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's readable K, V [b, Hkv, S, D]: a view when the slots are one run, else a gather (cached
        for the KV-shared layers that read the same layer in this step)."""
        K, V = self.k[layer], self.v[layer]
        if isinstance(step.read, slice):
            return K[None, :, step.read], V[None, :, step.read]
        if layer in self._step_kv:
            return self._step_kv[layer]
        H, D = K.shape[0], K.shape[2]
        keys, values = K.index_select(1, step.read), V.index_select(1, step.read)  # [Hkv, b * S, D]
        b = keys.shape[1] // step.S
        kv = keys.view(H, b, step.S, D).transpose(0, 1), values.view(H, b, step.S, D).transpose(0, 1)
        if layer in self.shared_sources:
            self._step_kv[layer] = kv
        return kv
