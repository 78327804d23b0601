"""The quantized-weight CPU kernels (kernels/quant_cpu.cpp) against the reference quant.tensor.dequantize.

quant_gemv rounds x to int8 per block of 32 (one scale each, as llama.cpp's Q8_0) and is otherwise exact, so
it is checked twice: to float32 rounding against the float64 product of that rounded x (which pins every
weight, scale and min to its place), and against the exact x @ W.T within the worst case the rounding of x
allows. dequant_rows must equal the reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import cpu
from hearthlm.quant.tensor import BITS, dequantize, pack_high, pack_int4

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs a CPU with AVX2/FMA/F16C and a compiler")

PATHS = cpu.gemv_paths() if cpu.available() else ["avx2"]


@pytest.fixture(autouse=True, params=PATHS)
def quant_path(request):
    """Every test runs on each quant_gemv path this CPU can take (AVX-512 VNNI and AVX2 on a VNNI machine)."""
    before = cpu.gemv_isa()
    cpu.set_gemv_isa(request.param)
    yield request.param
    cpu.set_gemv_isa(before)


# (K, group): groups of 16, 32, 64, 128, 96 (a multiple of 32 that is not a power of two) and K (one per row);
# K = 96 has an odd number of blocks (the unpaired last block of the 4-bit kernel) and a partial chunk.
LAYOUTS = [(96, 16), (96, 32), (96, 96), (384, 96), (640, 16), (640, 32), (640, 64), (640, 128), (640, 640)]


def _weights(N: int, K: int, bits: int, group: int, mins: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:  # random nibbles: any mix-up of low and high halves, or of blocks, changes the result
        q = pack_int4(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8))
    elif bits < 8:  # 5- and 6-bit (GGUF's Q5_* and Q6_K): random high bits as well
        q = pack_high(torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8), bits)
    else:
        q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int16).to(torch.int8)
    s = (torch.randn(N, K // group, generator=g) * 0.02).half()  # both signs, as GGML's Q4_0 scales
    m = (torch.randn(N, K // group, generator=g) * 0.1).half() if mins else None
    return q, s, m


def _rounded_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x^ (x rounded per block of 32 to int8 times the block's scale max|x| / 127) and each element's scale."""
    b = x.view(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d).view_as(x), d.expand_as(b).reshape_as(x)


def _check(x, q, s, m, bits, group, kernel=cpu.quant_gemv):
    W = dequantize(q, s, m, bits, group).double()
    y = kernel(x, q, s, m, bits, group)
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], q.shape[0])
    xr, dx = _rounded_x(x)
    # Float32 rounding only: the kernel's terms are bounded by |x^| (|s| |q| + |offset|) per element: below 8 bits
    # |q| < 2^bits and an offset of 2^(bits - 1) |s| (symmetric) or |m|, |q| <= 128 for 8-bit.
    S = s.double().abs().repeat_interleave(group, -1) * (128 if bits == 8 else (1 << bits) - 1 + (1 << (bits - 1)))
    if m is not None:
        S = S + m.double().abs().repeat_interleave(group, -1)
    fp = 1e-5 * (xr.double().abs() @ S.T) + 1e-30
    assert ((y.double() - xr.double() @ W.T).abs() <= fp).all()
    # The worst case of rounding x: each element off by at most half its block's step.
    bound = (dx.double() / 2) @ W.abs().T * 1.001 + fp
    assert ((y.double() - x.double() @ W.T).abs() <= bound).all()
    return y


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"K{t[0]}-g{t[1]}")
def test_quant_gemv_matches_reference(bits, mins, layout):
    K, group = layout
    q, s, m = _weights(37, K, bits, group, mins, seed=K + group)  # 37 rows: tails of every row tiling
    g = torch.Generator().manual_seed(1)
    for M in range(1, cpu.MAX_ROWS + 1):
        x = torch.randn(M, K, generator=g)
        x[0, 32:64] = 0  # an all-zero block: scale 0
        _check(x, q, s, m, bits, group)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows", [9, 16, 23, 32])
@pytest.mark.parametrize("N", [37, 600])  # one thread task; several, each running every slice on its weight rows
def test_wide_quant_gemv_is_its_even_slices(bits, rows, N):
    """Past MAX_ROWS rows (a fused decode step of up to MAX_DECODE_ROWS rows) the quantized GEMV runs even slices
    of at most MAX_ROWS rows (on AVX2 in one pass over the weights): bit for bit what separate calls on those
    slices give."""
    K, group = 256, 32
    q, s, m = _weights(N, K, bits, group, bits == 4, seed=rows)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(N)
    k = -(-rows // cpu.MAX_ROWS)
    cuts = [i * rows // k for i in range(k + 1)]
    want = torch.cat([cpu.quant_gemv(x[a:b], q, s, m, bits, group, bias) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(cpu.quant_gemv(x, q, s, m, bits, group, bias), want)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize(
    "layout", [(96, 16), (96, 32), (640, 16), (640, 128), (640, 640)], ids=lambda t: f"K{t[0]}-g{t[1]}"
)
def test_quant_gemv_row_is_the_same_alone_and_in_a_batch(bits, mins, layout, quant_path):
    """A row's result does not depend on the rows beside it (the engine's batched decode equals each request
    alone): on the VNNI path bit for bit the same alone and at every place in batches of 2..8. The AVX2 path splits
    its accumulators by the number of rows, so there only the float rounding of the sums may differ (its integer
    sums are exact): within 2e-6 of the row's magnitude. 5- and 6-bit weights take the AVX2 GEMV on every path."""
    K, group = layout
    q, s, m = _weights(37, K, bits, group, mins, seed=K + group + 1)
    x = torch.randn(cpu.MAX_ROWS, K, generator=torch.Generator().manual_seed(K))
    alone = torch.cat([cpu.quant_gemv(x[i : i + 1], q, s, m, bits, group) for i in range(cpu.MAX_ROWS)])
    for M in range(2, cpu.MAX_ROWS + 1):
        for start in range(0, cpu.MAX_ROWS - M + 1):
            got, want = cpu.quant_gemv(x[start : start + M], q, s, m, bits, group), alone[start : start + M]
            if quant_path == "avx2" or bits in (5, 6):  # (5- and 6-bit weights run the AVX2 GEMV on every path)
                torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))
            else:
                assert torch.equal(got, want)


def test_quant_gemv_path_follows_hearthlm_isa():
    """The AVX-512 path is chosen at load where isa() allows it; HEARTHLM_ISA=avx2 keeps the AVX2 code."""
    import os
    import subprocess
    import sys

    code = "from hearthlm.kernels import cpu; print(cpu.gemv_isa())"
    uncapped = "avx512" if cpu._NEEDS["avx512"] <= cpu.cpu_flags() else "avx2"  # (this process may be capped)
    for cap in ("avx2", None):
        env = {k: v for k, v in os.environ.items() if k != "HEARTHLM_ISA"}
        if cap:
            env["HEARTHLM_ISA"] = cap
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == (cap or uncapped)
    with pytest.raises(ValueError, match="does not run here"):
        cpu.set_gemv_isa("amx")


@pytest.mark.parametrize("bits", BITS)
def test_quant_gemv_outlier_stays_in_its_block(bits):
    K, group = 640, 32
    q, s, m = _weights(29, K, bits, group, bits == 4, seed=3)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    x[:, 96:128] = 0
    x[:, 100] = 1000.0  # an activation outlier, as some channels of LLM activations are
    y = _check(x, q, s, m, bits, group)
    # Per-block scales: the outlier costs its own block's resolution only, so the result stays far closer to
    # exact than rounding each row of x to one scale does.
    W = dequantize(q, s, m, bits, group).double()
    exact = x.double() @ W.T
    step = x.abs().amax(-1, keepdim=True) / 127
    per_row = (torch.round(x / step) * step).double() @ W.T
    assert (y.double() - exact).abs().max() < (per_row - exact).abs().max() / 20


@pytest.mark.parametrize("bits", BITS)
def test_quant_gemv_non_finite_x_shows(bits):
    q, s, m = _weights(11, 96, bits, 32, False, seed=4)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    x[0, 40], x[1, 70] = float("nan"), float("inf")
    y = cpu.quant_gemv(x, q, s, m, bits, 32)
    assert y[:2].isnan().all() and y[2].isfinite().all()


@pytest.mark.parametrize(
    "bits, group, mins",
    [(4, 32, False), (4, 32, True), (4, 128, True), (8, 4864, False), (8, 16, False), (6, 16, False), (5, 32, True)],
)
def test_quant_gemv_realistic_shape(bits, group, mins):
    N, K = 896, 4864  # Qwen2.5-0.5B's down projection; several tasks for the thread pool
    q, s, m = _weights(N, K, bits, group, mins, seed=5)
    g = torch.Generator().manual_seed(6)
    for M in (1, 3):
        _check(torch.randn(M, K, generator=g), q, s, m, bits, group)


@pytest.mark.parametrize("group", [16, 32])
def test_quant_gemv_int4_layout(group):
    """Built by hand, not with pack_int4: byte j of a block holds element j (low nibble) and element j + 16
    (high nibble); one-hot rows of x read single elements back."""
    N, K = 5, 64
    g = torch.Generator().manual_seed(7)
    vals = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    blocks = vals.view(N, 2, 32)
    q = (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(N, K // 2).contiguous()
    s = torch.full((N, K // group), 0.5, dtype=torch.float16)
    probes = [0, 1, 15, 16, 17, 31, 32, 63]
    x = torch.zeros(len(probes), K)
    x[range(len(probes)), probes] = 1.0
    y = cpu.quant_gemv(x, q, s, None, 4, group)
    expected = 0.5 * (vals[:, probes].T.float() - 8)
    assert torch.allclose(y, expected, rtol=1e-6, atol=0)


def _hand_packed(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """5- or 6-bit weights packed by hand from quant/tensor.py's description, not with pack_high: a row's nibbles
    as for 4-bit, then its high-bit plane, 8h bytes per pair of blocks (an element's place v in the pair's lo or hi
    vector: h = 2, byte v % 16, bits 2 (v // 16), + 4 for hi; h = 1, byte v % 8, bit v // 8, + 4 for hi) and 4h
    bytes for an unpaired last block (element e at byte e % 4h, bits h (e // 4h))."""
    N, K = vals.shape
    h, nb = bits - 4, K // 32
    plane = torch.zeros(N, K * h // 8, dtype=torch.uint8)
    for n in range(N):
        for b in range(nb):
            for e in range(32):
                top = int(vals[n, 32 * b + e]) >> 4
                if b // 2 < nb // 2:
                    v, span = e % 16 + 16 * (b % 2), 16 if h == 2 else 8
                    at, shift = 8 * h * (b // 2) + v % span, h * (v // span) + (4 if e >= 16 else 0)
                else:
                    at, shift = 8 * h * (b // 2) + e % (4 * h), h * (e // (4 * h))
                plane[n, at] |= top << shift
    return torch.cat([pack_int4(vals & 15), plane], dim=1)


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("K", [64, 96])  # a pair of blocks; a pair and an unpaired last block
def test_quant_gemv_high_bits_layout(bits, group, K):
    """One-hot rows of x read single elements back, through the GEMV, the row dequantizer and the GEMM, from weights
    packed by hand (_hand_packed); pack_high gives the same bytes."""
    N = 5
    vals = torch.randint(0, 1 << bits, (N, K), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    q = _hand_packed(vals, bits)
    assert torch.equal(pack_high(vals, bits), q)
    s = torch.full((N, K // group), 0.5, dtype=torch.float16)
    probes = [0, 1, 7, 8, 15, 16, 17, 24, 31, 32, 47, 48, 63, K - 1]
    x = torch.zeros(len(probes), K)
    x[range(len(probes)), probes] = 1.0
    expected = 0.5 * (vals[:, probes].T.float() - (1 << (bits - 1)))
    assert torch.equal(dequantize(q, s, None, bits, group), 0.5 * (vals.float() - (1 << (bits - 1))))
    assert torch.allclose(cpu.quant_gemv(x, q, s, None, bits, group), expected, rtol=1e-6, atol=0)
    assert torch.equal(cpu.dequant_rows(q, s, None, bits, group, torch.arange(N)), dequantize(q, s, None, bits, group))
    assert torch.allclose(cpu.quant_gemm(x, q, s, None, bits, group), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"K{t[0]}-g{t[1]}")
def test_dequant_rows_bit_identical(bits, mins, layout):
    K, group = layout
    q, s, m = _weights(41, K, bits, group, mins, seed=K * group)
    ref = dequantize(q, s, m, bits, group)
    rows = torch.tensor([40, 0, 7, 7, 13])
    assert torch.equal(cpu.dequant_rows(q, s, m, bits, group, rows), ref[rows])
    many = torch.randint(0, 41, (300,), generator=torch.Generator().manual_seed(0))  # several threads' worth
    assert torch.equal(cpu.dequant_rows(q, s, m, bits, group, many), ref[many])
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])  # token ids [B, T] -> [B, T, K]
    assert torch.equal(cpu.dequant_rows(q, s, m, bits, group, ids), ref[ids])
    assert cpu.dequant_rows(q, s, m, bits, group, torch.zeros(0, dtype=torch.long)).shape == (0, K)


def test_bad_inputs_are_clear_errors():
    K = 64
    q, s, m = _weights(8, K, 4, 32, True, seed=0)
    x = torch.randn(1, K)

    def gemv_error(match, x=x, q=q, s=s, m=m, bits=4, group=32):
        with pytest.raises(RuntimeError, match=match):
            cpu.quant_gemv(x, q, s, m, bits, group)

    gemv_error("x has no rows", x=torch.randn(0, K))
    gemv_error("float tensor", x=torch.ones(1, K, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="bias must be float32"):
        cpu.quant_gemv(x, q, s, m, 4, 32, torch.zeros(7))
    # Any float dtype, layout and leading shape is taken, as the model's activations come.
    y = cpu.quant_gemv(x, q, s, m, 4, 32)
    t = torch.randn(K, 2).T
    assert torch.equal(cpu.quant_gemv(t, q, s, m, 4, 32), cpu.quant_gemv(t.contiguous(), q, s, m, 4, 32))
    assert torch.equal(cpu.quant_gemv(x.double(), q, s, m, 4, 32), y)
    assert torch.equal(cpu.quant_gemv(x.view(1, 1, K), q, s, m, 4, 32), y.view(1, 1, -1))
    bias = torch.randn(8)
    assert torch.equal(cpu.quant_gemv(x, q, s, m, 4, 32, bias), y + bias)
    gemv_error("K = 64", x=torch.randn(1, 32))
    gemv_error("uint8", q=q.view(torch.int8))
    gemv_error("int8", q=q, bits=8)  # 4-bit data passed as 8-bit
    gemv_error("bits must be 4, 5, 6 or 8", bits=2)
    gemv_error("do not hold whole 6-bit blocks", q=q[:, :31].contiguous(), bits=6)
    gemv_error("qdata must be contiguous", q=torch.cat([q, q], 1)[:, ::2])
    gemv_error("scales must be contiguous float16", s=s.float())
    gemv_error("do not fit", s=s[:, :1].contiguous())
    gemv_error("mins .* must match", m=m[:4].contiguous())
    gemv_error("group must divide K", group=48)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.dequant_rows(q, s, m, 4, 32, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="int64"):
        cpu.dequant_rows(q, s, m, 4, 32, torch.tensor([1], dtype=torch.int32))


def test_kernels_off_means_unavailable(monkeypatch):
    monkeypatch.setenv("HEARTHLM_KERNELS", "0")
    cpu.isa.cache_clear()
    try:
        assert cpu.isa() == "torch"
        assert cpu._build("hearthlm_cpu", cpu.SOURCES) is None
    finally:
        monkeypatch.undo()
        cpu.isa.cache_clear()
