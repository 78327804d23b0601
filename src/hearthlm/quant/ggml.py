"""GGML tensor types (the block formats of GGUF files) in torch: exact dequantization, and repacking
into the one layout our kernels run (tensor.py's QuantTensor) without going through float.

Why both: `dequantize` is the reference (it equals gguf-py's numpy `gguf.quants.dequantize` bit
for bit, in the same order of float operations) and serves tensors we keep in float; `repack` is the
load path, rearranging each block's integers and scales with integer ops so a GGUF model runs on the
same kernels as our own int4 / int8 weights.

Shapes are in torch order, outermost first: (..., N, K), where K, the last dimension, is the row
length that the blocks run along. GGUF lists dimensions innermost first (ne[0] = K); turn them
round with `shape_from_gguf`. `raw` is the tensor's bytes, a 1-D uint8 tensor (a slice of the file).

Repacked forms and their cost in bits per weight (GGUF -> ours):

    type  GGUF   ours                                              after repack
    F32   32     float32, shared with raw                          exact
    F16   16     float16, shared with raw                          exact
    BF16  16     bfloat16, shared with raw                         exact
    Q8_0  8.5    int8, fp16 scale / 32              8.5            exact
    Q4_0  4.5    4-bit, fp16 scale / 32             4.5            exact (same bytes)
    Q4_1  5      4-bit, fp16 scale + min / 32       5              exact (same bytes)
    Q5_0  5.5    5-bit, fp16 scale / 32             5.5            exact
    Q5_1  6      5-bit, fp16 scale + min / 32       6              exact
    Q4_K  4.5    4-bit, fp16 scale + min / 32       5              scale d*sc, min -dmin*m in fp16
    Q5_K  5.5    5-bit, fp16 scale + min / 32       6              scale d*sc, min -dmin*m in fp16
    Q6_K  6.5625 6-bit, fp16 scale / 16             7              scale d*sc in fp16

The K-types keep two-level scales (an fp16 super-scale times a 6- or 8-bit integer per sub-block);
ours has one fp16 scale (and min) per group, so the product is rounded to fp16: an element with
integer q, combined scale s = d*sc and min m = dmin*mi moves by at most
    |q| * |s| * 2^-11 + |m| * 2^-11 + 2^-23 * |value|
(half an fp16 ulp, relative, on s and on m; the last term is the final float32 rounding; where s or
m fall below 2^-14, fp16's subnormals, add (|q| + 1) * 2^-25 absolute). Where s and m are exactly
representable in fp16 (e.g. d and dmin powers of two within range) the result is bit for bit the
reference, because the reference's products d*sc*q are exact in float32 and a - b == a + (-b).
A combined scale above fp16's range (65504) is refused with GGMLError rather than made inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import torch
from torch import nn

from .tensor import QuantTensor, pack_high


class GGMLTypeError(ValueError):
    """A GGML tensor we cannot read: a type we do not support (or do not know), a shape that does not
    fit its blocks, a byte count that does not match, a combined scale beyond float16. One class for
    all of them, so a loader catches one thing."""


GGMLError = GGMLTypeError  # the same class, under the more general name


class GGMLType(IntEnum):
    """The GGML type ids we support (ggml.h's enum ggml_type)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# Every id ggml has defined, for naming unsupported types in errors (4, 5: removed Q4_2 / Q4_3;
# 31-33 and 36-38: removed repacked Q4_0_4_4 ... IQ4_NL_8_8).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0", 35: "TQ2_0",
    36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip

QK_K = 256  # elements per K-quant superblock

# (elements per block, bytes per block)
GGML_BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q8_0: (32, 2 + 32),  # d, qs[32] int8
    GGMLType.Q4_0: (32, 2 + 16),  # d, qs[16] nibbles
    GGMLType.Q4_1: (32, 2 + 2 + 16),  # d, m, qs[16]
    GGMLType.Q5_0: (32, 2 + 4 + 16),  # d, qh[4] (bit i: element i), qs[16]
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),  # d, m, qh[4], qs[16]
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin, scales[12] (6-bit sc, m), qs[128]
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql[128], qh[64], scales[16] int8, d
}


def type_name(ggml_type: int) -> str:
    """The GGML name of a type id ("Q4_K"), or "type <id>" for an id ggml never had."""
    return GGML_TYPE_NAMES.get(int(ggml_type), f"type {int(ggml_type)}")


def shape_from_gguf(dims: Sequence[int]) -> tuple[int, ...]:
    """GGUF's dims (innermost first, ne[0] = row length) -> the torch shape these functions take."""
    return tuple(int(d) for d in reversed(dims))


def _type(ggml_type: int) -> GGMLType:
    try:
        return GGMLType(int(ggml_type))
    except ValueError:
        supported = ", ".join(t.name for t in GGMLType)
        raise GGMLTypeError(f"GGML type {type_name(ggml_type)} is not supported (supported: {supported})") from None


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Bytes of a tensor of this type and torch-order shape (..., K); K must fill whole blocks."""
    t = _type(ggml_type)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise GGMLError(f"invalid shape {shape} for a {t.name} tensor")
    block, block_bytes = GGML_BLOCK_SIZES[t]
    if shape[-1] % block:
        raise GGMLTypeError(
            f"{t.name} tensor of shape {shape}: its row length {shape[-1]} (the last dimension) "
            f"is not a multiple of the {t.name} block size {block}"
        )
    n = 1
    for s in shape:
        n *= s
    return n // block * block_bytes


def _checked(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> tuple[GGMLType, tuple[int, ...], torch.Tensor]:
    """Validate; return the type, the shape and raw as blocks uint8 [n_blocks, bytes per block]."""
    t = _type(ggml_type)
    shape = tuple(int(s) for s in shape)
    expected = tensor_nbytes(t, shape)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        what = (
            f"{raw.dtype} tensor of shape {tuple(raw.shape)}" if isinstance(raw, torch.Tensor) else type(raw).__name__
        )
        raise GGMLError(f"raw must be a 1-D uint8 tensor of the tensor's bytes, not a {what}")
    if raw.numel() != expected:
        raise GGMLError(
            f"{t.name} tensor of shape {shape} takes {expected} bytes, got {raw.numel()}"
            + (" (truncated data?)" if raw.numel() < expected else "")
        )
    return t, shape, raw.contiguous().view(-1, GGML_BLOCK_SIZES[t][1])


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte offset `at` of every block, as float32 [n_blocks, 1] (exact)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _u8(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """qs [nb, 16] of Q4_0 / Q4_1 / Q5_x blocks -> uint8 [nb, 32]: low nibbles 0..15, high 16..31."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 qh [nb, 4] (a little-endian uint32, bit i for element i) -> uint8 [nb, 32] of 0 / 1."""
    return ((qh.unsqueeze(-1) >> _u8(range(8), qh.device)) & 1).reshape(qh.shape[0], 32)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K packed scales [nb, 12] -> 6-bit (sc, m), each uint8 [nb, 8] (get_scale_min_k4).

    Bytes 0-3: sc 0-3 in the low 6 bits, high 2 bits of sc 4-7; bytes 4-7: m 0-3 likewise with the
    high 2 bits of m 4-7; bytes 8-11: low nibble the low 4 bits of sc 4-7, high nibble of m 4-7.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc, mn


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K qs [nb, 128] -> uint8 [nb, 8, 32]: per 64 elements 32 bytes, low nibbles first."""
    qs = qs.reshape(-1, 4, 1, 32) >> _u8([0, 4], qs.device).view(1, 1, 2, 1)
    return (qs & 15).reshape(-1, 8, 32)


def _q5k_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_K qh [nb, 32] -> uint8 [nb, 8, 32]: bit s of byte j is element j of sub-block s."""
    return (qh.unsqueeze(1) >> _u8(range(8), qh.device).view(1, 8, 1)) & 1


def _q6k_q(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q6_K ql [nb, 128], qh [nb, 64] -> uint8 [nb, 256] of 0..63.

    Per 128 elements: 64 bytes of ql (low nibbles elements 0..63, high nibbles 64..127) and 32 bytes
    of qh (bits 2k, 2k+1 of byte j: the top two bits of element 32k + j)."""
    lo = (ql.reshape(-1, 2, 1, 64) >> _u8([0, 4], ql.device).view(1, 1, 2, 1)) & 15
    hi = (qh.reshape(-1, 2, 1, 32) >> _u8([0, 2, 4, 6], qh.device).view(1, 1, 4, 1)) & 3
    return lo.reshape(-1, QK_K) | (hi.reshape(-1, QK_K) << 4)


# ---------------------------------------------------------------------------------------------
# dequantize: float32 [n_blocks, block] in exactly the reference's float operations


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles32(b[:, 2:]).to(torch.int8) - 8).float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles32(b[:, 4:]).float() + _f16(b, 2)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _deq_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K with their integers q [nb, 8, 32]: (d*sc) * q - (dmin*m), as numpy does it."""
    sc, m = _k_scale_min(b[:, 4:16])
    ds = (_f16(b, 0) * sc.float()).unsqueeze(-1)
    dm = (_f16(b, 2) * m.float()).unsqueeze(-1)
    return (ds * q.float() - dm).reshape(-1, QK_K)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    return _deq_k(b, _k_low_nibbles(b[:, 16:]))


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    return _deq_k(b, _k_low_nibbles(b[:, 48:]) | (_q5k_high_bits(b[:, 16:48]) << 4))


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    ds = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    q = (_q6k_q(b[:, :128], b[:, 128:192]).to(torch.int8) - 32).reshape(-1, 16, 16)
    return (ds * q.float()).reshape(-1, QK_K)


def _deq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32).clone()


def _deq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()


def _deq_bf16(b: torch.Tensor) -> torch.Tensor:
    # the bits moved by integer ops, as the reference does, so even NaN payloads are kept
    return (b.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_DEQUANTIZE = {
    GGMLType.F32: _deq_f32,
    GGMLType.F16: _deq_f16,
    GGMLType.BF16: _deq_bf16,
    GGMLType.Q8_0: _deq_q8_0,
    GGMLType.Q4_0: _deq_q4_0,
    GGMLType.Q4_1: _deq_q4_1,
    GGMLType.Q5_0: _deq_q5_0,
    GGMLType.Q5_1: _deq_q5_1,
    GGMLType.Q4_K: _deq_q4_k,
    GGMLType.Q5_K: _deq_q5_k,
    GGMLType.Q6_K: _deq_q6_k,
}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> torch.Tensor:
    """The tensor's bytes -> float32 of torch-order `shape` (..., K), bit for bit as gguf-py's
    `gguf.quants.dequantize` (same float operations in the same order; NaN where it has NaN, but
    NaN payloads may differ: torch quiets F16 signalling NaNs, and where both operands of an add
    are NaN it keeps the other one). Always a new tensor (it does not share memory with raw)."""
    t, shape, blocks = _checked(raw, ggml_type, shape)
    return _DEQUANTIZE[t](blocks).reshape(shape)


# ---------------------------------------------------------------------------------------------
# repack: (qdata, scales, mins, bits, group) per block, integers rearranged, no float weights (5- and 6-bit: the
# values 0..2^bits - 1, which repack packs row by row)


def _fp16(x: torch.Tensor, t: GGMLType, what: str) -> torch.Tensor:
    """float32 combined scales -> float16 (round to nearest even), refusing overflow to inf."""
    h = x.half()
    if bool((h.isinf() & x.isfinite()).any()):
        raise GGMLError(f"{t.name} tensor: a combined {what} exceeds float16's range (65504)")
    return h


def _fp16_bytes(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at : at + 2].contiguous().view(torch.float16)


def _rp_q8_0(b: torch.Tensor, t: GGMLType):
    return b[:, 2:].view(torch.int8), _fp16_bytes(b, 0), None, 8, 32


def _rp_q4_0(b: torch.Tensor, t: GGMLType):
    return b[:, 2:], _fp16_bytes(b, 0), None, 4, 32


def _rp_q4_1(b: torch.Tensor, t: GGMLType):
    return b[:, 4:], _fp16_bytes(b, 0), _fp16_bytes(b, 2), 4, 32


def _rp_q5_0(b: torch.Tensor, t: GGMLType):
    q = _nibbles32(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)
    return q, _fp16_bytes(b, 0), None, 5, 32


def _rp_q5_1(b: torch.Tensor, t: GGMLType):
    q = _nibbles32(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return q, _fp16_bytes(b, 0), _fp16_bytes(b, 2), 5, 32


def _k_scales_mins(b: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    sc, m = _k_scale_min(b[:, 4:16])
    scales = _fp16(_f16(b, 0) * sc.float(), t, "scale d*sc")
    mins = _fp16(-(_f16(b, 2) * m.float()), t, "min dmin*m")
    return scales, mins


def _rp_q4_k(b: torch.Tensor, t: GGMLType):
    # GGML: per 64 elements 32 bytes, byte j = element j (low nibble) and 32 + j (high nibble).
    # Ours: per 32 elements 16 bytes, byte j = element j (low) and 16 + j (high).
    qs = b[:, 16:].reshape(-1, 4, 2, 16)  # [nb, 64-chunk, first / second half of the 32 bytes, 16]
    first, second = qs[:, :, 0], qs[:, :, 1]
    low_block = (first & 15) | (second << 4)  # elements 0..31 of the chunk
    high_block = (first >> 4) | (second & 0xF0)  # elements 32..63
    qdata = torch.stack([low_block, high_block], dim=2)  # [nb, 4, 2, 16]
    return qdata, *_k_scales_mins(b, t), 4, 32


def _rp_q5_k(b: torch.Tensor, t: GGMLType):
    q = _k_low_nibbles(b[:, 48:]) | (_q5k_high_bits(b[:, 16:48]) << 4)
    return q, *_k_scales_mins(b, t), 5, 32


def _rp_q6_k(b: torch.Tensor, t: GGMLType):
    q = _q6k_q(b[:, :128], b[:, 128:192])
    scales = _fp16(_f16(b, 208) * b[:, 192:208].view(torch.int8).float(), t, "scale d*sc")
    return q, scales, None, 6, 16


_REPACK = {
    GGMLType.Q8_0: _rp_q8_0,
    GGMLType.Q4_0: _rp_q4_0,
    GGMLType.Q4_1: _rp_q4_1,
    GGMLType.Q5_0: _rp_q5_0,
    GGMLType.Q5_1: _rp_q5_1,
    GGMLType.Q4_K: _rp_q4_k,
    GGMLType.Q5_K: _rp_q5_k,
    GGMLType.Q6_K: _rp_q6_k,
}

_FLOAT_DTYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
FLOAT_TYPES = frozenset(_FLOAT_DTYPES)


def repack(raw: torch.Tensor, ggml_type: int, shape: Sequence[int]) -> QuantTensor | torch.Tensor:
    """The tensor in the form our kernels run, torch-order `shape` (..., K).

    F32 / F16 / BF16 -> a float32 / float16 / bfloat16 tensor viewing raw's memory where raw is
    aligned for it (a copy otherwise); the loader decides on any conversion. The block types -> a
    QuantTensor (see the module docstring for the mapping); its qdata / scales are new tensors.
    """
    t, shape, blocks = _checked(raw, ggml_type, shape)
    if t in _FLOAT_DTYPES:
        flat = raw.contiguous()
        try:
            return flat.view(_FLOAT_DTYPES[t]).view(shape)
        except RuntimeError:  # storage offset not a multiple of the element size
            return flat.clone().view(_FLOAT_DTYPES[t]).view(shape)
    qdata, scales, mins, bits, group = _REPACK[t](blocks, t)
    rows, K = shape[:-1], shape[-1]
    if bits in (5, 6):  # the values, packed per row (a row's high bits pair its blocks: quant/tensor.py)
        qdata = pack_high(qdata.reshape(*rows, K), bits)
    qdata = _own(qdata.reshape(*rows, K * bits // 8), raw)
    scales = _own(scales.reshape(*rows, K // group), raw)
    mins = None if mins is None else _own(mins.reshape(*rows, K // group), raw)
    return QuantTensor(qdata, scales, mins, bits, group)


def _own(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """x in its own memory: a copy where it is still a view of raw (a single block's slices)."""
    if x.numel() and x.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        return x.clone()
    return x


class GGMLRows(nn.Module):
    """A 2-D table [N, K] of a GGML block type kept as the file's bytes (a view of the mapping), for tables read a
    few rows at a time (Gemma 4's per-layer embeddings: 2.5 GB at Q8_0 for E2B, of which a token reads 9 KB).
    Repacking would copy all of it into memory; here the rows gathered are dequantized as `dequantize` does them,
    and the page cache holds the rest. Float types are views already and never need this."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, shape: Sequence[int]):
        super().__init__()
        t, shape, _ = _checked(raw, ggml_type, shape)
        if len(shape) != 2:
            raise GGMLError(f"a table of rows must be 2-D, got shape {shape}")
        self.type, self.shape = t, torch.Size(shape)
        self.register_buffer("raw", raw.view(shape[0], -1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what rows() gives

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (1-D) as float32 [len(ids), K]."""
        picked = self.raw.index_select(0, ids.to(device=self.raw.device, dtype=torch.int64))
        return dequantize(picked.reshape(-1), self.type, (len(ids), self.shape[1]))

    def extra_repr(self) -> str:
        return f"{self.type.name}, shape={tuple(self.shape)}, mapped"
