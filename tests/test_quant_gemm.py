"""The integer GEMM for prefill with quantized weights (kernels/gemm_avx512.cpp on AMX and AVX-512 VNNI,
kernels/gemm_avx2.cpp on AVX2) and the choice of kernel path by CPU feature (kernels/cpu.py `isa`, HEARTHLM_ISA).

quant_gemm rounds x exactly as quant_gemv does, so it is held to the same two checks (test_quant_kernels._check):
float32 rounding against the float64 product of the rounded x, and the rounding bound against the exact product.
Row counts cover every register tile (6 rows on AVX-512, 4 on AVX2) and its tails; column counts every panel (32
columns on AVX-512, 16 on AVX2) and its tails.
"""

from __future__ import annotations

import pytest
import torch
from test_quant_kernels import LAYOUTS, _check, _weights

from hearthlm.kernels import cpu
from hearthlm.quant.linear import quant_linear
from hearthlm.quant.tensor import BITS, QuantTensor, dequantize, pack_high, pack_int4


@pytest.fixture(params=["amx", "avx512", "avx2"])
def gemm(request, kernel_path):
    """Runs a test on the AMX tile unit, on AVX-512 VNNI and on AVX2, each where this CPU has it."""
    kernel_path(request.param)
    assert cpu.gemm_path() == request.param
    return request.param


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"K{t[0]}-g{t[1]}")
def test_quant_gemm_matches_reference(gemm, bits, mins, layout):
    K, group = layout
    q, s, m = _weights(69, K, bits, group, mins, seed=K + group)  # 69 columns: two panels and a tail of 5
    g = torch.Generator().manual_seed(1)
    for M in (1, 5, 6, 7, 12, 13, 37):
        x = torch.randn(M, K, generator=g)
        x[0, 32:64] = 0  # an all-zero block: scale 0
        _check(x, q, s, m, bits, group, kernel=cpu.quant_gemm)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
def test_quant_gemm_equals_the_gemv(gemm, bits, mins):
    """The same rounded x, the same integer products: the two kernels differ by float32 summation order only."""
    K, group = 640, 32
    q, s, m = _weights(100, K, bits, group, mins, seed=11)
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(12))
    bias = torch.randn(100, generator=torch.Generator().manual_seed(13))
    a, b = cpu.quant_gemm(x, q, s, m, bits, group, bias), cpu.quant_gemv(x, q, s, m, bits, group, bias)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
def test_quant_gemm_extreme_integers_do_not_saturate(gemm, bits, mins):
    """The largest sums the byte products can make: every weight integer at its most negative or most positive
    (4-, 5- and 6-bit: 0 and 2^bits - 1; 8-bit: -128 and 127, in runs and alternating) times blocks of x that
    round to +-127 everywhere. AVX2's vpmaddubsw saturates at 16 bits, so a kernel that let a sum pass 32767 fails
    here."""
    K, group = 256, 32
    lo, hi = (-128, 127) if bits == 8 else (0, (1 << bits) - 1)
    cols = [
        torch.full((K,), lo),
        torch.full((K,), hi),
        torch.tensor([lo, hi] * (K // 2)),
        torch.tensor([hi, lo] * (K // 2)),
    ]
    ints = torch.stack(cols * 5)  # 20 columns: a whole panel and a tail on every path
    packed = {4: pack_int4, 5: lambda q: pack_high(q, 5), 6: lambda q: pack_high(q, 6), 8: lambda q: q.view(torch.int8)}
    q = packed[bits](ints.to(torch.uint8 if bits < 8 else torch.int8))
    s = torch.full((20, K // group), 0.01).half()
    m = torch.full((20, K // group), -0.05).half() if mins else None
    x = torch.stack([torch.full((K,), 3.0), torch.full((K,), -3.0), torch.tensor([3.0, -3.0] * (K // 2))] * 3)
    _check(x, q, s, m, bits, group, kernel=cpu.quant_gemm)  # a saturated sum is off by hundreds of steps


@pytest.mark.parametrize(
    "bits, group, mins",
    [(4, 32, False), (4, 32, True), (8, 16, False), (8, 32, True), (8, 4864, False), (6, 16, False), (5, 32, True)],
)
def test_quant_gemm_realistic_shape(gemm, bits, group, mins):
    N, K = 896, 4864  # Qwen2.5-0.5B's down projection: 28 panels for the threads to share
    q, s, m = _weights(N, K, bits, group, mins, seed=5)
    x = torch.randn(41, K, generator=torch.Generator().manual_seed(6))
    _check(x, q, s, m, bits, group, kernel=cpu.quant_gemm)


def test_quant_gemm_batched_input_shape_bias_and_dtype(gemm):
    q, s, m = _weights(40, 96, 4, 32, True, seed=8)
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(9))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(10))
    y = cpu.quant_gemm(x, q, s, m, 4, 32, bias)
    assert y.shape == (2, 9, 40) and y.dtype == torch.float32
    flat = cpu.quant_gemm(x.reshape(18, 96), q, s, m, 4, 32, None) + bias
    assert torch.allclose(y.reshape(18, 40), flat, rtol=0, atol=1e-5)
    yb = cpu.quant_gemm(x.bfloat16(), q, s, m, 4, 32, None)
    assert torch.allclose(yb, cpu.quant_gemm(x.bfloat16().float(), q, s, m, 4, 32, None))


@pytest.mark.parametrize("bits", BITS)
def test_quant_gemm_outlier_and_non_finite(gemm, bits):
    K = 640
    q, s, m = _weights(29, K, bits, 32, False, seed=3)
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(2))
    x[:, 100] = 1000.0  # an outlier channel costs only its own block's resolution
    _check(x, q, s, m, bits, 32, kernel=cpu.quant_gemm)
    x[0, 40], x[1, 70] = float("nan"), float("inf")
    y = cpu.quant_gemm(x, q, s, m, bits, 32)
    assert y[:2].isnan().all() and y[2:].isfinite().all()


@pytest.mark.parametrize("group", [16, 32])
def test_quant_gemm_int4_layout(gemm, group):
    """Nibbles packed by hand (element j low, j + 16 high, per block); one-hot rows of x read them back."""
    N, K = 5, 64
    vals = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    blocks = vals.view(N, 2, 32)
    q = (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(N, K // 2).contiguous()
    s = torch.full((N, K // group), 0.5, dtype=torch.float16)
    probes = [0, 1, 15, 16, 17, 31, 32, 63, 5, 40]
    x = torch.zeros(len(probes), K)
    x[range(len(probes)), probes] = 1.0
    y = cpu.quant_gemm(x, q, s, None, 4, group)
    assert torch.allclose(y, 0.5 * (vals[:, probes].T.float() - 8), rtol=1e-6, atol=0)


def test_quant_gemm_bad_inputs_are_clear_errors(gemm):
    q, s, m = _weights(8, 64, 4, 32, True, seed=1)
    x = torch.randn(9, 64)
    for match, args in [
        ("bits must be 4, 5, 6 or 8", (x, q, s, m, 2, 32)),
        ("last dim must be K", (torch.randn(9, 32), q, s, m, 4, 32)),
        ("group must divide K", (x, q, s, m, 4, 48)),
        ("scales must be contiguous float16", (x, q, s.float(), m, 4, 32)),
        ("scales .*do not fit", (x, q, s[:, :1].contiguous(), m, 4, 32)),
        ("mins .*must (be|match)", (x, q, s, m[:4].contiguous(), 4, 32)),
        ("qdata must be (a )?contiguous", (x, torch.cat([q, q], 1)[:, ::2], s, m, 4, 32)),
    ]:
        with pytest.raises(RuntimeError, match=match):
            cpu.quant_gemm(*args)


# -- the choice of path ---------------------------------------------------------------------------------------
@pytest.fixture
def capped(monkeypatch):
    """Sets HEARTHLM_ISA for one test and forgets the cached choice before and after."""

    def cap(value: str) -> None:
        monkeypatch.setenv("HEARTHLM_ISA", value)
        cpu.isa.cache_clear()

    yield cap
    monkeypatch.undo()
    cpu.isa.cache_clear()


def test_isa_is_what_the_cpu_has(capped):
    flags = cpu.cpu_flags()
    expected = next((path for path in ("amx", "avx512", "avx2") if cpu._NEEDS[path] <= flags), "torch")
    assert cpu.isa() == expected
    capped("amx")  # asking for more than the CPU has gives what it has
    assert cpu.isa() == expected
    capped("torch")
    assert cpu.isa() == "torch" and not cpu.gemm_available()
    capped("sse9")
    with pytest.raises(ValueError, match="HEARTHLM_ISA='sse9'.*amx, avx512, avx2, torch"):
        cpu.isa()


@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "torch"])
def test_prefill_product_on_every_path(kernel_path, isa):
    """Each path this machine can run gives the quantized product of a prefill chunk (more rows than quant_linear
    gives the GEMV on any path): the integer GEMM (AMX, AVX-512 VNNI or AVX2) within the bound of rounding x, the
    float tiles of the torch reference to float32 rounding."""
    kernel_path(isa)
    q, s, m = _weights(70, 640, 4, 32, True, seed=21)
    w = QuantTensor(q, s, m, 4, 32)
    x = torch.randn(cpu.QUANT_GEMV_ROWS_VNNI + 1, 640, generator=torch.Generator().manual_seed(22))
    y = quant_linear(x, w)
    exact = x.double() @ dequantize(q, s, m, 4, 32).double().T
    if isa != "torch":
        assert cpu.gemm_path() == isa and cpu._amx() == (isa == "amx")
        assert torch.equal(y, cpu.quant_gemm(x, q, s, m, 4, 32))
        _check(x, q, s, m, 4, 32, kernel=cpu.quant_gemm)
    else:
        assert not cpu.gemm_available()
        assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
