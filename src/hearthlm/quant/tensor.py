"""QuantTensor: a weight matrix (or a stack of expert matrices) stored as 4-, 5-, 6- or 8-bit integers with
one float16 scale (and optionally one float16 min) per group of `group` consecutive input elements.

The one layout every quantized weight runs in, whatever it came from (our int8 / int4, or a GGUF
Q4_0, Q4_K, Q6_K, ...), so that one set of kernels serves them all:

- logical shape [..., N, K] (out, in); K is a multiple of 32; `group` divides K and is 16, a
  multiple of 32, or K itself (one scale per output row);
- bits == 8: qdata int8 [..., N, K], the signed integer of every weight;
- bits == 4: qdata uint8 [..., N, K // 2]; each block of 32 elements of a row takes 16 bytes, byte j
  holding element j of the block in its low nibble and element j + 16 in its high nibble (the
  order of GGML's Q4_0), values 0..15;
- bits == 5 or 6 (GGUF's Q5_0 / Q5_1 / Q5_K and Q6_K, held at their own width): qdata uint8
  [..., N, K * bits // 8]: each row's low nibbles first, K // 2 bytes laid out as for 4-bit, then its
  h = bits - 4 high bits in K * h // 8 bytes, 8 h bytes per pair of blocks (the pair the 4-bit kernels read
  in one 32-byte load) and 4 h bytes for an unpaired last block; `high_bit_places` says which byte and bit
  hold each element's (the order in which one broadcast, a mask and a shift per 64-bit lane unpack them);
  values 0..31 / 0..63;
- scales float16 [..., N, K // group];
- mins float16 [..., N, K // group] or None.

The value of a weight with integer q in group g:
    mins given:            scales[g] * q + mins[g]
    no mins, bits == 8:    scales[g] * q
    no mins, bits < 8:     scales[g] * (q - 2^(bits - 1))   (symmetric: GGML's Q4_0, Q5_0, Q6_K)
`dequantize` below is the reference for that rule; the CPU kernels must agree with it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

BITS = (4, 5, 6, 8)  # the integer widths the layout holds


class QuantTensor(nn.Module):
    def __init__(
        self,
        qdata: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        bits: int,
        group: int,
    ):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {bits}")
        K = qdata.shape[-1] * 8 // bits
        if K % 32 or K % group or not (group == 16 or group % 32 == 0):
            raise ValueError(f"unsupported layout: K={K}, group={group}")
        if scales.shape != (*qdata.shape[:-1], K // group) or (mins is not None and mins.shape != scales.shape):
            raise ValueError(f"scales {tuple(scales.shape)} do not fit qdata {tuple(qdata.shape)} with group {group}")
        self.register_buffer("qdata", qdata)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bits = bits
        self.group = group
        self.shape = torch.Size((*qdata.shape[:-1], K))
        self._views: dict[int, QuantTensor] = {}

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.mins) if t is not None)

    @property
    def layout(self) -> tuple[int, int, bool]:
        return self.bits, self.group, self.mins is not None

    def __getitem__(self, i: int) -> QuantTensor:
        """One matrix of a stack (an expert's weights): a view, made once and kept (experts are picked per step)."""
        if len(self.shape) < 3:
            raise IndexError("indexing selects one matrix of a stacked QuantTensor")
        view = self._views.get(i)
        if view is None:
            mins = None if self.mins is None else self.mins[i]
            view = self._views[i] = QuantTensor(self.qdata[i], self.scales[i], mins, self.bits, self.group)
        return view

    def rows(self, start: int, end: int) -> QuantTensor:
        """Output rows [start, end) of a matrix (a view)."""
        mins = None if self.mins is None else self.mins[start:end]
        return QuantTensor(self.qdata[start:end], self.scales[start:end], mins, self.bits, self.group)

    def extra_repr(self) -> str:
        kind = "asymmetric" if self.mins is not None else "symmetric"
        return f"shape={tuple(self.shape)}, bits={self.bits}, group={self.group}, {kind}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scales, self.mins, self.bits, self.group).to(dtype)


@functools.lru_cache(maxsize=64)
def high_bit_places(K: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of a row of K 5- or 6-bit weights: the byte of the row's high-bit plane that holds its
    h = bits - 4 high bits, and their shift in it. Per pair of blocks (2p, 2p + 1) the 4-bit kernels read 32
    bytes of nibbles as two vectors: lo = elements 0..15 of both blocks, hi = elements 16..31 of both; call an
    element's place in its vector v (0..31). The pair's 8 h bytes: for h = 2, byte v % 16 holds lo's element at
    bits 2 (v // 16) and hi's at bits 4 + 2 (v // 16); for h = 1, byte v % 8 holds lo's at bit v // 8 and hi's at
    bit 4 + v // 8. An unpaired last block's 4 h bytes: element e at byte e % 4h, bits h (e // 4h) up."""
    h, nb = bits - 4, K // 32
    byte = torch.empty(K, dtype=torch.int64)
    shift = torch.empty(K, dtype=torch.int64)
    e = torch.arange(32)
    for b in range(nb):
        base, at = 8 * h * (b // 2), slice(32 * b, 32 * b + 32)
        if b // 2 < nb // 2:  # one of a pair
            upper = e >= 16  # the hi vector's
            v = e % 16 + 16 * (b % 2)
            span = 16 if h == 2 else 8
            byte[at] = base + v % span
            shift[at] = h * (v // span) + 4 * upper
        else:
            byte[at] = base + e % (4 * h)
            shift[at] = h * (e // (4 * h))
    return byte, shift


def unpack_high(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., K * bits // 8] of 5- or 6-bit weights (the layout above) -> uint8 [..., K], one value each."""
    K = qdata.shape[-1] * 8 // bits
    byte, shift = (t.to(qdata.device) for t in high_bit_places(K, bits))
    high = (qdata[..., K // 2 :][..., byte] >> shift.to(torch.uint8)) & ((1 << (bits - 4)) - 1)
    return unpack_int4(qdata[..., : K // 2]) | (high << 4)


def pack_high(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., K] of values below 2^bits (bits 5 or 6) -> the packed layout (inverse of unpack_high). Works in
    bytes: a plane-sized temporary per field, never a wider copy of q (repack runs it on whole embedding tables)."""
    K, h = q.shape[-1], bits - 4
    byte, shift = high_bit_places(K, bits)
    holder = torch.empty(8 // h, K * h // 8, dtype=torch.int64)  # [field, plane byte] -> the element it holds
    holder[shift // h, byte] = torch.arange(K)
    q = q.to(torch.uint8)
    plane = torch.zeros(*q.shape[:-1], K * h // 8, dtype=torch.uint8, device=q.device)
    for f, elements in enumerate(holder.to(q.device)):
        plane |= (q[..., elements] >> 4) << (h * f)
    return torch.cat([pack_int4(q & 15), plane], dim=-1)


def unpack(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer of every weight, [..., K]: uint8 0..2^bits - 1 below 8 bits, int8 for 8."""
    if bits == 8:
        return qdata
    return unpack_int4(qdata) if bits == 4 else unpack_high(qdata, bits)


def unpack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] in the block layout above -> uint8 [..., K] with one value per element."""
    b = qdata.reshape(*qdata.shape[:-1], -1, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(*qdata.shape[:-1], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] of values 0..15 -> the packed layout (inverse of unpack_int4)."""
    b = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 32)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(*q.shape[:-1], -1)


def dequantize(
    qdata: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int
) -> torch.Tensor:
    """The reference: float32 weights [..., N, K] from the packed parts."""
    q = unpack(qdata, bits).float()
    s = scales.float().repeat_interleave(group, dim=-1)
    if mins is not None:
        return q * s + mins.float().repeat_interleave(group, dim=-1)
    return s * q if bits == 8 else s * (q - (1 << (bits - 1)))


class RowConcat(nn.Module):
    """Matrices of different formats stacked along the output rows: what a fused projection (q|k|v, gate|up)
    becomes when its parts were quantized differently (a GGUF Q4_K_M file stores v as Q6_K, q and k as
    Q4_K). `linear` runs each part and concatenates the outputs."""

    def __init__(self, parts: list[QuantTensor | torch.Tensor]):
        super().__init__()
        self.parts = list(parts)
        for i, p in enumerate(self.parts):
            if isinstance(p, nn.Module):
                self.add_module(str(i), p)
            else:
                self.register_buffer(str(i), p)
        self.shape = torch.Size((sum(p.shape[0] for p in parts), parts[0].shape[1]))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device


def combine(parts: list[QuantTensor | torch.Tensor], stack: bool) -> QuantTensor | RowConcat | torch.Tensor:
    """Concatenate (fused projections) or stack (experts) weights of which at least one is quantized."""
    quant = [p for p in parts if isinstance(p, QuantTensor)]
    if len(quant) == len(parts) and len({p.layout for p in quant}) == 1:
        join = torch.stack if stack else torch.cat
        first = quant[0]
        mins = None if first.mins is None else join([p.mins for p in quant])
        return QuantTensor(
            join([p.qdata for p in quant]), join([p.scales for p in quant]), mins, first.bits, first.group
        )
    if stack:
        kinds = sorted({p.extra_repr() if isinstance(p, QuantTensor) else str(p.dtype) for p in parts})
        raise ValueError(f"cannot stack expert weights stored in different formats: {kinds}")
    return RowConcat(parts)
