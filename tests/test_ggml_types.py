"""GGML tensor types: dequantize equals gguf-py's numpy reference bit for bit; repack into
QuantTensor is exact for the plain block types and within fp16 rounding of the combined scales for
the K-types (exact when those are representable)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

from hearthlm.quant import ggml
from hearthlm.quant.ggml import GGML_BLOCK_SIZES, GGMLError, GGMLType, GGMLTypeError, dequantize, repack, tensor_nbytes
from hearthlm.quant.tensor import QuantTensor, unpack, unpack_int4

gguf = pytest.importorskip("gguf")
gq = pytest.importorskip("gguf.quants")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

BLOCK_TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
K_TYPES = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
ALL_TYPES = FLOAT_TYPES + BLOCK_TYPES + K_TYPES
# byte offsets of the float16 super-scales (d, and dmin where there is one) in each block
SCALE_OFFSETS = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}


def reference(raw: torch.Tensor, t: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's numpy dequantization of the same bytes, as a torch tensor of `shape`."""
    rows = raw.numpy().reshape(-1, tensor_nbytes(t, (shape[-1],)))
    with np.errstate(all="ignore"):  # random bytes: NaN / inf scales
        out = gq.dequantize(rows, GGMLQuantizationType(int(t)))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit (so -0.0 != 0.0), NaN where NaN; NaN payloads may differ (see below)."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), "NaN positions differ"
    assert torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def random_raw(t: GGMLType, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (tensor_nbytes(t, shape),), dtype=torch.uint8, generator=g)


def set_f16(raw: torch.Tensor, t: GGMLType, offset: int, values: torch.Tensor) -> None:
    """Write float16 `values` (one per block) at `offset` of every block of raw, in place."""
    blocks = raw.view(-1, GGML_BLOCK_SIZES[t][1])
    blocks[:, offset : offset + 2] = values.half().reshape(-1, 1).view(torch.uint8)


def quantized(t: GGMLType, x: np.ndarray) -> torch.Tensor:
    """Real blocks from gguf-py's numpy quantizer (it has Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16, F16)."""
    q = gq.quantize(x.astype(np.float32), GGMLQuantizationType(int(t)))
    return torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(-1).copy())


def realistic_k_blocks(t: GGMLType, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Valid K-quant blocks (gguf-py cannot quantize them): random integers, 6-bit / int8 sub-scales
    and mins, super-scales d, dmin positive and log-uniform over 1e-6 .. 1e-2, as in real models
    (a few reaching fp16's subnormals, below 6.1e-5 / 63)."""
    raw = random_raw(t, shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = raw.numel() // GGML_BLOCK_SIZES[t][1]
    for off in SCALE_OFFSETS[t]:
        set_f16(raw, t, off, 10 ** (torch.rand(n, generator=g) * 4 - 6))
    return raw


# --- the type table -------------------------------------------------------------------------------


def test_type_table_matches_gguf():
    for t in GGMLType:
        gt = GGMLQuantizationType(int(t))
        assert gt.name == t.name
        assert GGML_BLOCK_SIZES[t] == GGML_QUANT_SIZES[gt], t.name
    assert set(GGML_BLOCK_SIZES) == set(GGMLType)
    for gt in GGMLQuantizationType:  # the names used in errors, where gguf knows the id
        if gt.value in ggml.GGML_TYPE_NAMES:
            assert ggml.GGML_TYPE_NAMES[gt.value] == gt.name
    assert {gt.value for gt in GGMLQuantizationType} <= set(ggml.GGML_TYPE_NAMES)


def test_package_does_not_import_gguf():
    tree = ast.parse(inspect.getsource(ggml))
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] == "gguf"]


def test_tensor_nbytes():
    assert tensor_nbytes(GGMLType.Q4_K, (4096, 4096)) == 4096 * 16 * 144
    assert tensor_nbytes(GGMLType.Q6_K, (2, 3, 512)) == 6 * 2 * 210
    assert tensor_nbytes(GGMLType.Q8_0, (10, 64)) == 10 * 2 * 34
    assert tensor_nbytes(GGMLType.F32, (7, 3)) == 84
    assert tensor_nbytes(GGMLType.BF16, (5,)) == 10
    assert tensor_nbytes(int(GGMLType.Q5_1), [3, 32]) == 72  # plain ints and lists too


@pytest.mark.parametrize(
    "type_id, name", [(10, "Q2_K"), (11, "Q3_K"), (16, "IQ2_XXS"), (34, "TQ1_0"), (9, "Q8_1"), (99, "type 99")]
)
def test_unsupported_types_are_named(type_id, name):
    raw = torch.zeros(1024, dtype=torch.uint8)
    for call in (
        lambda: tensor_nbytes(type_id, (1, 256)),
        lambda: dequantize(raw, type_id, (1, 256)),
        lambda: repack(raw, type_id, (1, 256)),
    ):
        with pytest.raises(GGMLTypeError, match=name) as e:
            call()
        assert isinstance(e.value, ValueError) and "not supported" in str(e.value)


def test_row_length_not_a_multiple_of_the_block():
    with pytest.raises(GGMLTypeError, match=r"row length 100 .*Q4_K block size 256"):
        tensor_nbytes(GGMLType.Q4_K, (2, 100))
    with pytest.raises(GGMLTypeError, match=r"row length 48 .*Q8_0 block size 32"):
        dequantize(torch.zeros(1000, dtype=torch.uint8), GGMLType.Q8_0, (4, 48))
    # the blocks run along the last dimension: 256 x 100 is not 100 x 256
    assert tensor_nbytes(GGMLType.Q4_K, (100, 256)) == 100 * 144


def test_byte_count_mismatch_names_expected_and_got():
    raw = random_raw(GGMLType.Q4_K, (2, 256), 0)
    with pytest.raises(GGMLError, match=r"takes 288 bytes, got 287 \(truncated"):
        dequantize(raw[:-1], GGMLType.Q4_K, (2, 256))
    with pytest.raises(GGMLError, match="takes 144 bytes, got 288"):
        repack(raw, GGMLType.Q4_K, (1, 256))
    with pytest.raises(GGMLError, match="1-D uint8"):
        dequantize(raw.view(2, -1), GGMLType.Q4_K, (2, 256))
    with pytest.raises(GGMLError, match="1-D uint8"):
        repack(raw.to(torch.int16), GGMLType.Q4_K, (2, 256))
    assert GGMLError is GGMLTypeError and issubclass(GGMLTypeError, ValueError)  # one class for the loader to catch


def test_shape_from_gguf():
    assert ggml.shape_from_gguf([4096, 11008]) == (11008, 4096)
    assert ggml.shape_from_gguf((64, 32, 8)) == (8, 32, 64)


# --- dequantize == gguf-py, bit for bit --------------------------------------------------------------


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes_matches_reference(t):
    """Every bit pattern: odd, subnormal, negative, inf and NaN scales included (about 3% of random
    fp16 are NaN / inf). NaN positions must agree; NaN payloads may not: numpy keeps F16 signalling
    NaNs signalling where torch's conversion quiets them, and when both operands of an add are NaN,
    numpy and torch keep different ones."""
    block = GGML_BLOCK_SIZES[t][0]
    shape = (3, 4, 8 * max(block, 32))  # 96 blocks of the K-types
    raw = random_raw(t, shape, seed=int(t))
    out = dequantize(raw, t, shape)
    assert out.shape == shape and out.dtype == torch.float32
    assert_same_bits(out, reference(raw, t, shape))


@pytest.mark.parametrize("t", FLOAT_TYPES + BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_real_blocks_is_exact(t):
    x = np.random.default_rng(int(t)).standard_normal((8, 256)).astype(np.float32) * 0.05
    raw = quantized(t, x)
    out = dequantize(raw, t, x.shape)
    ref = reference(raw, t, x.shape)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert torch.allclose(out, torch.from_numpy(x), rtol=0, atol=0.05 * 0.6)  # and it is the data (4-bit: max/16)


def test_dequantize_does_not_share_raw():
    raw = quantized(GGMLType.F32, np.ones((2, 4), np.float32))
    out = dequantize(raw, GGMLType.F32, (2, 4))
    raw.zero_()
    assert torch.equal(out, torch.ones(2, 4))


# --- repack ----------------------------------------------------------------------------------------

LAYOUT = {  # type: (bits, group, qdata dtype, mins)
    GGMLType.Q8_0: (8, 32, torch.int8, False),
    GGMLType.Q4_0: (4, 32, torch.uint8, False),
    GGMLType.Q4_1: (4, 32, torch.uint8, True),
    GGMLType.Q5_0: (5, 32, torch.uint8, False),
    GGMLType.Q5_1: (5, 32, torch.uint8, True),
    GGMLType.Q4_K: (4, 32, torch.uint8, True),
    GGMLType.Q5_K: (5, 32, torch.uint8, True),
    GGMLType.Q6_K: (6, 16, torch.uint8, False),
}


@pytest.mark.parametrize("t", BLOCK_TYPES + K_TYPES, ids=lambda t: t.name)
def test_repack_layout(t):
    shape = (2, 3, 512)  # a stack of expert matrices
    raw = realistic_k_blocks(t, shape, 1) if t in K_TYPES else random_raw(t, shape, 1)
    r = repack(raw, t, shape)
    bits, group, dtype, has_mins = LAYOUT[t]
    assert isinstance(r, QuantTensor) and r.shape == shape
    assert (r.bits, r.group, r.qdata.dtype, r.mins is not None) == (bits, group, dtype, has_mins)
    assert r.scales.dtype == torch.float16 and r.scales.shape == (2, 3, 512 // group)
    assert r.qdata.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr()
    if r.bits in (5, 6):  # held at their own width: every value of the range occurs in random blocks
        q = unpack(r.qdata, r.bits)
        assert q.min() == 0 and q.max() == (1 << r.bits) - 1
    # the bits per weight of the module docstring's table
    bits_per_weight = {
        GGMLType.Q8_0: 8.5,
        GGMLType.Q4_0: 4.5,
        GGMLType.Q4_1: 5,
        GGMLType.Q5_0: 5.5,
        GGMLType.Q5_1: 6,
    }.get(t)
    bits_per_weight = bits_per_weight or {GGMLType.Q4_K: 5, GGMLType.Q5_K: 6, GGMLType.Q6_K: 7}[t]
    assert r.nbytes * 8 / r.shape.numel() == bits_per_weight


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_repack_is_exact(t):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: same scales, same integers: the same floats, for real blocks and
    for any bytes at all."""
    x = np.random.default_rng(int(t)).standard_normal((16, 512)).astype(np.float32)
    raw = quantized(t, x)
    assert torch.equal(
        repack(raw, t, x.shape).dequantize().view(torch.int32), dequantize(raw, t, x.shape).view(torch.int32)
    )
    shape = (64, 256)
    raw = random_raw(t, shape, seed=100 + int(t))
    assert_same_bits(repack(raw, t, shape).dequantize(), dequantize(raw, t, shape))


def test_repack_q4_0_keeps_the_bytes():
    raw = random_raw(GGMLType.Q4_0, (2, 64), 3)
    r = repack(raw, GGMLType.Q4_0, (2, 64))
    blocks = raw.view(-1, 18)
    assert torch.equal(r.qdata.reshape(-1, 16), blocks[:, 2:])
    assert torch.equal(r.scales.reshape(-1, 1).view(torch.uint8), blocks[:, :2])


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_repack_k_types_exact_when_scales_are_powers_of_two(t):
    """d, dmin = +-2^e (e in -20..4, fp16 subnormals included): d*sc and dmin*m are exact in float16,
    so the repacked tensor gives the reference's floats bit for bit, whatever the other bytes."""
    shape = (32, 512)
    raw = random_raw(t, shape, seed=200 + int(t))
    g = torch.Generator().manual_seed(int(t))
    n = raw.numel() // GGML_BLOCK_SIZES[t][1]
    for off in SCALE_OFFSETS[t]:
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        set_f16(raw, t, off, sign * 2.0 ** torch.randint(-20, 5, (n,), generator=g))
    out = repack(raw, t, shape).dequantize()
    assert torch.equal(out.view(torch.int32), dequantize(raw, t, shape).view(torch.int32))
    assert torch.equal(out.view(torch.int32), reference(raw, t, shape).view(torch.int32))


def k_bound(r: QuantTensor, ref: torch.Tensor) -> torch.Tensor:
    """Per element: half an fp16 ulp (relative 2^-11) on the combined scale times |q| and on the min,
    the final float32 rounding, and the absolute error of fp16 subnormals (below 2^-14)."""
    q = unpack(r.qdata, r.bits).float()
    if r.mins is None and r.bits < 8:  # symmetric: the integer the scale multiplies is q - 2^(bits - 1)
        q = q - (1 << (r.bits - 1))
    q = q.abs()
    s = r.scales.float().abs().repeat_interleave(r.group, dim=-1)
    m = (
        r.mins.float().abs() if r.mins is not None else torch.zeros_like(r.scales, dtype=torch.float32)
    ).repeat_interleave(r.group, dim=-1)
    return (q * s + m) * 2.0**-11 * (1 + 2.0**-10) + ref.abs() * 2.0**-23 + (q + 1) * 2.0**-25


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_repack_k_types_within_fp16_rounding(t):
    shape = (64, 1024)
    raw = realistic_k_blocks(t, shape, seed=300 + int(t))
    ref = dequantize(raw, t, shape)
    r = repack(raw, t, shape)
    out = r.dequantize()
    diff = (out - ref).abs()
    assert (diff <= k_bound(r, ref)).all()
    # relative to the weights' scale it is tiny; and it is not exact: the rounding is real
    assert diff.max() <= 2.0**-10 * ref.abs().max()
    assert diff.max() > 0


def test_repack_q4_k_nibble_order():
    """One Q4_K block, q = element index mod 16 in GGML's order: ours has it in Q4_0's order."""
    t = GGMLType.Q4_K
    raw = torch.zeros(144, dtype=torch.uint8)
    raw[:2] = torch.tensor([1.0]).half().view(torch.uint8)  # d = 1
    raw[4:8] = 1  # sc 0..3 = 1, the high bits of sc 4..7 = 0
    raw[12:16] = 1  # sc 4..7 = 1, m 4..7 = 0
    q = torch.arange(256) % 16
    q = q.view(4, 2, 32)  # per 64 elements: first 32 in the low nibbles, next 32 in the high
    raw[16:] = (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8).reshape(-1)
    assert torch.equal(dequantize(raw, t, (1, 256)), (torch.arange(256) % 16).float().view(1, 256))
    r = repack(raw, t, (1, 256))
    assert torch.equal(unpack_int4(r.qdata), (torch.arange(256) % 16).to(torch.uint8).view(1, 256))
    assert torch.equal(r.dequantize(), dequantize(raw, t, (1, 256)))


def test_repack_k_scale_overflow_is_refused():
    t = GGMLType.Q4_K
    raw = realistic_k_blocks(t, (1, 256), 5)
    set_f16(raw, t, 0, torch.tensor([60000.0]))
    raw[4] = 63  # sc 0 = 63: d*sc = 3.8e6
    with pytest.raises(GGMLError, match="float16's range"):
        repack(raw, t, (1, 256))
    assert dequantize(raw, t, (1, 256)).isfinite().all()  # the float path is fine


@pytest.mark.parametrize(
    "t, dtype",
    [(GGMLType.F32, torch.float32), (GGMLType.F16, torch.float16), (GGMLType.BF16, torch.bfloat16)],
    ids=lambda v: getattr(v, "name", ""),
)
def test_repack_float_types_are_views(t, dtype):
    x = torch.randn(4, 8)
    raw = x.to(dtype).view(torch.uint8).reshape(-1)
    r = repack(raw, t, (4, 8))
    assert r.dtype == dtype and r.shape == (4, 8) and torch.equal(r, x.to(dtype))
    assert r.data_ptr() == raw.data_ptr()  # no copy
    assert torch.equal(r.float(), dequantize(raw, t, (4, 8)))
    unaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), raw])[1:]  # storage offset 1
    assert torch.equal(repack(unaligned, t, (4, 8)), x.to(dtype))


def test_single_block_does_not_alias_raw():
    raw = random_raw(GGMLType.Q8_0, (1, 32), 7)
    r = repack(raw, GGMLType.Q8_0, (1, 32))
    before = r.dequantize()
    raw.zero_()
    assert_same_bits(r.dequantize(), before)


@pytest.mark.parametrize("bits", [5, 6])
def test_a_column_share_of_5_and_6_bit_weights_is_those_columns(bits):
    """take_cols (a rank's input columns under --tp) on the layout whose high bits pair blocks across the row:
    shares that start on an odd block, end before the row does, or hold an odd number of blocks."""
    from hearthlm.quant.tensor import pack_high
    from hearthlm.weights.share import take_cols

    K, group = 320, 32
    g = torch.Generator().manual_seed(bits)
    q = pack_high(torch.randint(0, 1 << bits, (6, K), generator=g, dtype=torch.uint8), bits)
    w = QuantTensor(q, (torch.rand(6, K // group, generator=g) + 0.5).half(), None, bits, group)
    whole = w.dequantize()
    for start, end in [(0, 64), (32, 96), (64, 320), (96, 288), (288, 320), (0, 320)]:
        part = take_cols(w, start, end, "w")
        assert part.bits == bits and part.qdata.shape[-1] == (end - start) * bits // 8
        assert torch.equal(part.dequantize(), whole[:, start:end])
