"""Slices of a loaded weight for one rank: output rows (column-parallel layers, vocabulary shards) or input
columns (row-parallel layers), for float tensors, QuantTensor (int8 / int4, our own or repacked GGUF blocks)
and RowConcat (fused projections whose parts differ in format).

Slices are copies, so that the full weight each rank loaded can be freed. A QuantTensor keeps one scale (and
min) per group of input columns, so a column slice must start and end on a group boundary; int4 packs blocks
of 32 columns, and every QuantTensor needs a multiple of 32 columns, so the unit is lcm(group, 32).
`column_unit` says what a split must respect; `take_cols` refuses a slice that breaks it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.tensor import QuantTensor, RowConcat, combine

Weight = torch.Tensor | QuantTensor | RowConcat
Spans = list[tuple[int, int]]


def weight_of(linear: nn.Module) -> Weight:
    """A Linear's weight: a parameter, or a QuantTensor / RowConcat submodule once quantized."""
    return linear._parameters["weight"] if "weight" in linear._parameters else linear._modules["weight"]


def set_weight(module: nn.Module, name: str, value: Weight | None) -> None:
    """Put `value` in the place of parameter (or quantized submodule) `name`."""
    module._parameters.pop(name, None)
    module._modules.pop(name, None)
    if value is None or isinstance(value, nn.Module):
        setattr(module, name, value)
    else:
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))


def column_unit(w: Weight) -> int:
    """The granularity a slice of `w`'s input columns must keep (1 for float weights)."""
    if isinstance(w, RowConcat):
        return math.lcm(*(column_unit(p) for p in w.parts))
    if isinstance(w, QuantTensor):
        return 32 if w.group == w.shape[-1] else math.lcm(w.group, 32)  # one scale per row: any 32 columns
    return 1


def take_rows(w: Weight, spans: Spans) -> Weight:
    """Output rows [a, b) for each (a, b) in `spans` (ascending), concatenated."""
    if isinstance(w, RowConcat):
        pieces, offset = [], 0
        for part in w.parts:
            n = part.shape[0]
            local = [(max(a, offset) - offset, min(b, offset + n) - offset) for a, b in spans]
            local = [(a, b) for a, b in local if b > a]
            if local:
                pieces.append(take_rows(part, local))
            offset += n
        return pieces[0] if len(pieces) == 1 else RowConcat(pieces)
    if isinstance(w, QuantTensor):
        parts = [w.rows(a, b) for a, b in spans]
        return combine(parts, stack=False) if len(parts) > 1 else _copy(parts[0])
    return torch.cat([w[a:b] for a, b in spans]).contiguous()


def take_cols(w: Weight, start: int, end: int, name: str) -> Weight:
    """Input columns [start, end) of a matrix; `name` is for the error when the slice cuts a group."""
    if isinstance(w, RowConcat):
        return RowConcat([take_cols(p, start, end, name) for p in w.parts])
    if not isinstance(w, QuantTensor):
        return w[:, start:end].contiguous()
    unit = column_unit(w)
    if start % unit or end % unit:
        raise ValueError(f"{name}: columns [{start}, {end}) cut its quantization groups of {unit}")
    K = w.shape[-1]
    per_row = w.group == K
    g0, g1 = (0, 1) if per_row else (start // w.group, end // w.group)
    per_byte = 2 if w.bits == 4 else 1
    qdata = w.qdata[:, start // per_byte : end // per_byte].contiguous()
    mins = None if w.mins is None else w.mins[:, g0:g1].contiguous()
    return QuantTensor(qdata, w.scales[:, g0:g1].contiguous(), mins, w.bits, end - start if per_row else w.group)


def combine_stack(parts: list[Weight]) -> Weight:
    """Matrices of one format stacked into [len(parts), out, in]: a share of the experts, or each one's slice."""
    if isinstance(parts[0], torch.Tensor):
        return torch.stack(parts)
    return combine(parts, stack=True)


def _copy(q: QuantTensor) -> QuantTensor:
    mins = None if q.mins is None else q.mins.clone()
    return QuantTensor(q.qdata.clone(), q.scales.clone(), mins, q.bits, q.group)


def even(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s [start, end) of n items split evenly (n divisible by world)."""
    part = n // world
    return rank * part, (rank + 1) * part
