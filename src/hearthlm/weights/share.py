"""One rank's part of a weight (distributed/ splits a model over ranks): output rows (column-parallel layers,
vocabulary shards), input columns (row-parallel layers) and, in a stack of matrices [E, out, in], a run of the
matrices (experts divided among ranks). Works on float tensors, QuantTensor (int8 / int4, our own or repacked
GGUF blocks) and RowConcat (fused projections whose parts differ in format).

Slices are copies, so that the rest can be freed, or never read: taken from a view of a mapped checkpoint, a slice
reads only its own bytes (weights/loader.py reads a rank's share this way). A QuantTensor keeps one scale (and
min) per group of input columns, so a column slice must start and end on a group boundary; int4 packs blocks of
32 columns, and every QuantTensor needs a multiple of 32 columns, so the unit is lcm(group, 32). `column_unit`
says what a split must respect; `take_cols` refuses a slice that breaks it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..quant.tensor import QuantTensor, RowConcat, combine, pack_high, unpack_high


class GroupCut(ValueError):
    """A column slice that would cut a quantization group (the split must be refused, or made another way)."""


Weight = torch.Tensor | QuantTensor | RowConcat
Spans = tuple[tuple[int, int], ...]
Read = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Share:
    """The part of a weight one rank keeps: output rows in `rows` (ascending spans [a, b), concatenated), input
    columns [c0, c1) in `cols`; in a stack [E, out, in], `items` first keeps matrices [e0, e1), and rows and
    columns then apply to each matrix."""

    rows: Spans | None = None
    cols: tuple[int, int] | None = None
    items: tuple[int, int] | None = None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this share of a weight of shape `full`."""
        shape = list(full)
        if self.items is not None:
            shape[0] = self.items[1] - self.items[0]
        if self.rows is not None:
            shape[-2 if len(shape) > 1 else 0] = sum(b - a for a, b in self.rows)
        if self.cols is not None:
            shape[-1] = self.cols[1] - self.cols[0]
        return tuple(shape)

    def within(self, start: int, end: int) -> Share | None:
        """This share of the output rows [start, end) of a matrix built by stacking parts along its rows (a
        fused projection), in that part's own row numbers; None when it keeps none of them."""
        if self.rows is None:
            return self
        local = tuple((max(a, start) - start, min(b, end) - start) for a, b in self.rows if min(b, end) > max(a, start))
        return dataclasses.replace(self, rows=local) if local else None


def copy(view: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a tensor view (the default `read` below)."""
    return view.clone(memory_format=torch.contiguous_format)


def take(w: Weight, share: Share, name: str, read: Read = copy) -> Weight:
    """`share` of `w` (a matrix, or a stack of them when the share has `items` or `w` has three dims), as a copy;
    `name` is for the error when a column slice cuts a quantization group. `read` makes each copy of a view (a
    checkpoint's reads only the view's bytes from the file: Checkpoint.read)."""
    stacked = share.items is not None or len(w.shape) == 3
    if stacked:
        e0, e1 = share.items if share.items is not None else (0, w.shape[0])
        inner = dataclasses.replace(share, items=None)
        if isinstance(w, torch.Tensor) and inner.rows is None and inner.cols is None:
            return read(w[e0:e1])
        return combine_stack([take(w[e], inner, f"{name}[{e}]", read) for e in range(e0, e1)])
    if share.rows is not None:
        w = take_rows(w, list(share.rows), read)
    if share.cols is not None:
        w = take_cols(w, *share.cols, name, read)
    return w


def column_unit(w: Weight) -> int:
    """The granularity a slice of `w`'s input columns must keep (1 for float weights)."""
    if isinstance(w, RowConcat):
        return math.lcm(*(column_unit(p) for p in w.parts))
    if isinstance(w, QuantTensor):
        return 32 if w.group == w.shape[-1] else math.lcm(w.group, 32)  # one scale per row: any 32 columns
    return 1


def take_rows(w: Weight, spans: list[tuple[int, int]], read: Read = copy) -> Weight:
    """Output rows [a, b) for each (a, b) in `spans` (ascending), concatenated."""
    if isinstance(w, RowConcat):
        pieces, offset = [], 0
        for part in w.parts:
            n = part.shape[0]
            local = [(max(a, offset) - offset, min(b, offset + n) - offset) for a, b in spans]
            local = [(a, b) for a, b in local if b > a]
            if local:
                pieces.append(take_rows(part, local, read))
            offset += n
        return pieces[0] if len(pieces) == 1 else RowConcat(pieces)
    if isinstance(w, QuantTensor):
        parts = [_copy(w.rows(a, b), read) for a, b in spans]
        return combine(parts, stack=False) if len(parts) > 1 else parts[0]
    parts = [read(w[a:b]) for a, b in spans]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def take_cols(w: Weight, start: int, end: int, name: str, read: Read = copy) -> Weight:
    """Input columns [start, end) of a matrix; `name` is for the error when the slice cuts a group."""
    if isinstance(w, RowConcat):
        return RowConcat([take_cols(p, start, end, name, read) for p in w.parts])
    if not isinstance(w, QuantTensor):
        return read(w[:, start:end])
    unit = column_unit(w)
    if start % unit or end % unit:
        raise GroupCut(f"{name}: columns [{start}, {end}) cut its quantization groups of {unit}")
    K = w.shape[-1]
    per_row = w.group == K
    g0, g1 = (0, 1) if per_row else (start // w.group, end // w.group)
    if w.bits in (5, 6):  # the high-bit plane pairs blocks across the row: unpack, slice, pack the slice anew
        qdata = pack_high(unpack_high(read(w.qdata), w.bits)[:, start:end], w.bits)
    else:
        qdata = read(w.qdata[:, start * w.bits // 8 : end * w.bits // 8])
    mins = None if w.mins is None else read(w.mins[:, g0:g1])
    return QuantTensor(qdata, read(w.scales[:, g0:g1]), mins, w.bits, end - start if per_row else w.group)


def combine_stack(parts: list[Weight]) -> Weight:
    """Matrices of one format stacked into [len(parts), out, in]: a share of the experts, or each one's slice."""
    if isinstance(parts[0], torch.Tensor):
        return torch.stack(parts)
    return combine(parts, stack=True)


def _copy(q: QuantTensor, read: Read) -> QuantTensor:
    mins = None if q.mins is None else read(q.mins)
    return QuantTensor(read(q.qdata), read(q.scales), mins, q.bits, q.group)
