"""The CPU GEMV kernel against PyTorch's matmul, and the Linear dispatch around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hearthlm.kernels import cpu
from hearthlm.layers.linear import linear

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs a CPU with AVX2/FMA/F16C and a compiler")


PATHS = cpu.gemv_paths() if cpu.available() else ["avx2"]


@pytest.fixture(params=PATHS)
def gemv_path(request):
    """The test runs on each GEMV path this CPU can take (AVX-512 and AVX2 on an AVX-512 machine)."""
    before = cpu.gemv_isa()
    cpu.set_gemv_isa(request.param)
    yield request.param
    cpu.set_gemv_isa(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 40])
@pytest.mark.parametrize("shape", [(64, 32), (37, 203), (5, 8), (70, 1056)])  # odd rows; K % 32 != 0 tails
def test_gemv_matches_matmul(dtype, rows, shape, gemv_path):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g).to(dtype)
    x = torch.randn(rows, shape[1], generator=g)
    expected = x @ w.float().T
    got = cpu.gemv(x, w)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_gemv_of_no_rows_is_empty(gemv_path):
    w = torch.randn(10, 64).bfloat16()
    assert cpu.gemv(torch.zeros(0, 64), w).shape == (0, 10)
    assert cpu.gemv(torch.zeros(2, 0, 64), w, torch.zeros(10)).shape == (2, 0, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [8, 203, 1056, 896])  # no whole block of 32, tails of 11 and 0, Qwen2.5-0.5B's width
def test_gemv_row_is_the_same_alone_and_in_a_batch(dtype, K):
    """On the AVX-512 path a row's result is bit for bit the same alone (the one-row kernel) and at every place in
    batches of 2..40 (the wide kernel, whose blocks of 3 x rows and tiles of 4 weight rows the sizes cross), bias
    included: the engine's batched decode and speculative verify rows give each request its numbers alone."""
    if "avx512" not in PATHS:
        pytest.skip("this CPU has no AVX-512 GEMV path")
    before = cpu.gemv_isa()
    cpu.set_gemv_isa("avx512")
    try:
        g = torch.Generator().manual_seed(K)
        x, W, bias = torch.randn(40, K, generator=g), torch.randn(37, K, generator=g).to(dtype), torch.randn(37)
        alone = torch.cat([cpu.gemv(x[i : i + 1], W, bias) for i in range(40)])
        for M in (2, 3, 4, 5, 7, 9, 16, 40):
            for start in (0, 40 - M):
                assert torch.equal(cpu.gemv(x[start : start + M], W, bias), alone[start : start + M]), (M, start)
    finally:
        cpu.set_gemv_isa(before)


@pytest.mark.skipif("avx2" not in PATHS, reason="this CPU has no AVX2/FMA/F16C: the kernels are never built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [9, 12, 17, 32, 41])
@pytest.mark.parametrize("N", [70, 530])  # one thread task; several, each running every slice on its weight rows
def test_wide_gemv_is_its_even_slices_on_avx2(dtype, rows, N):
    """On the AVX2 path, past MAX_ROWS rows the GEMV runs even slices of at most MAX_ROWS rows (a fused decode step of
    up to MAX_DECODE_ROWS rows) in one pass over the weights: bit for bit what separate calls on those slices give,
    bias included."""
    before = cpu.gemv_isa()
    cpu.set_gemv_isa("avx2")
    try:
        g = torch.Generator().manual_seed(rows)
        x, W, bias = torch.randn(rows, 200, generator=g), torch.randn(N, 200, generator=g).to(dtype), torch.randn(N)
        k = -(-rows // cpu.MAX_ROWS)
        slices = [(i * rows // k, (i + 1) * rows // k) for i in range(k)]
        assert max(hi - lo for lo, hi in slices) <= cpu.MAX_ROWS
        want = torch.cat([cpu.gemv(x[lo:hi], W, bias) for lo, hi in slices])
        assert torch.equal(cpu.gemv(x, W, bias), want)
        assert torch.equal(cpu.gemv(x.view(1, rows, 200), W, bias), want.view(1, rows, N))
    finally:
        cpu.set_gemv_isa(before)


@pytest.mark.skipif("avx2" not in PATHS, reason="this CPU has no AVX2/FMA/F16C: the kernels are never built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "K", [1056, 2053, 4864]
)  # two chunks and a bit; a tail of 5; Qwen2.5-0.5B's MLP (pairs chunked too)
def test_avx2_gemv_rows_get_the_same_bits_with_k_in_chunks(dtype, K):
    """On the AVX2 path, blocks of x rows too wide for L1 run K in chunks (gemv_cpu.cpp, rows_kernel), and narrow
    blocks run it whole: each row's sum is the same chain either way, so pairs of rows (whole) give the bits of 8 rows
    (chunked), over several tiles of weight rows and a partial last tile."""
    before = cpu.gemv_isa()
    cpu.set_gemv_isa("avx2")
    try:
        g = torch.Generator().manual_seed(K)
        x, W = torch.randn(8, K, generator=g), torch.randn(37, K, generator=g).to(dtype)
        pairs = torch.cat([cpu.gemv(x[i : i + 2], W) for i in range(0, 8, 2)])
        assert torch.equal(cpu.gemv(x, W), pairs)
        assert torch.allclose(pairs, x @ W.float().T, atol=1e-3, rtol=1e-4)
    finally:
        cpu.set_gemv_isa(before)


@pytest.mark.parametrize("rows", [1, 7, 9, 40])  # both sides of the kernel's row limit
@pytest.mark.parametrize("path", ["avx512", "avx2"])  # 40 rows: the bf16 GEMM (oneDNN) or float32
def test_linear_dispatch_matches_f_linear(rows, path, kernel_path):
    kernel_path(path)
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(48, 40, generator=g), torch.randn(48, generator=g), torch.randn(1, rows, 40, generator=g)
    assert torch.allclose(linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)
    half = linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert half.dtype == torch.bfloat16
    # Exact result for the bf16-rounded inputs, then one bf16 rounding of the output (8-bit mantissa).
    exact = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float())
    assert torch.allclose(half.float(), exact, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 37), (16, 256), (1, 7), (600, 256), (40, 2048)])
def test_rms_norm_kernel_matches_float64_and_each_row_alone(with_weight, shape):
    """600 rows: split over the pool's threads."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g) * 4, torch.randn(shape[-1], generator=g)
    weight = w if with_weight else None
    xd = x.double()
    expected = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() if with_weight else 1)
    got = cpu.rms_norm(x, weight, 1e-6)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)
    rows = x.reshape(-1, shape[-1])
    for r in (0, rows.shape[0] // 2, rows.shape[0] - 1):  # the same bits wherever the row falls
        assert torch.equal(cpu.rms_norm(rows[r : r + 1], weight, 1e-6)[0], got.reshape(-1, shape[-1])[r])


@pytest.mark.parametrize("V", [1, 5, 8, 9, 37, 4096, 262144 + 3])
def test_argmax_rows_is_torch_argmax_ties_nans_and_infinities_included(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(12, V, generator=g)
    x[1] = 7.0  # all tied: the first
    x[2, V // 2] = float("nan")  # NaN counts as largest
    x[3, V - 1] = float("nan")
    x[3, 0] = float("inf")
    x[4] = float("-inf")
    x[5, V - 1] = 100.0  # in the tail of a row whose length is no multiple of 8
    x[6, (2 * V) // 3] = x[6, V // 3] = 50.0  # a tie past the first vector
    x[7].round_()  # many ties of the maximum
    x[8, 0] = -0.0
    x[8, 1:] = torch.where(x[8, 1:] > 0, 0.0, x[8, 1:])  # -0.0 and 0.0 tie as the maximum
    assert torch.equal(cpu.argmax_rows(x), x.argmax(-1))
    assert torch.equal(cpu.argmax_rows(x[2:5].contiguous().view(3, 1, V)), x[2:5].argmax(-1).view(3, 1))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu.argmax_rows(x.t() if V > 1 else x.double())


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of float32's spacing at exact (float64 exact)."""
    spacing = torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))).double() - exact.float().abs().double()
    return (got.double() - exact).abs() / spacing


def test_softcap_kernels_tanh_is_within_2_ulp_everywhere():
    x = torch.cat([torch.linspace(-12, 12, 2_000_001), torch.logspace(-30, 1, 100_001), -torch.logspace(-30, 1, 1001)])
    got = cpu.softcap_(x.clone(), 1.0)  # a cap of 1: x / 1 and * 1 are exact, so this is the kernel's tanh itself
    assert _ulps(got, torch.tanh(x.double())).max() <= 2
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 10.0, -88.0, 1e30])
    out = cpu.softcap_(special.clone(), 1.0)
    assert out[:4].tolist() == [0.0, 0.0, 1.0, -1.0] and out[1].signbit() and out[4].isnan()
    assert out[5:].tolist() == special[5:7].tolist() + [1.0, -1.0, 1.0]  # tanh(x) is x to float32 below 2^-12


@pytest.mark.parametrize("shape", [(3, 5), (16, 4096), (2, 8 * 1024 + 13), (17, 70001)])  # tails, many pieces
def test_softcap_kernel_is_cap_tanh_x_over_cap_in_place(shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g) * 60
    x[-1, -1] = float("nan")
    exact = torch.tanh((x / 30.0).double()) * 30.0  # from the same rounded x / cap as the kernel's
    got = x.clone()
    assert cpu.softcap_(got, 30.0).data_ptr() == got.data_ptr()
    assert _ulps(got, exact).nan_to_num(0.0).max() <= 3  # the tanh's 2, and the product's rounding
    assert got[-1, -1].isnan() and got.nan_to_num(0.0).abs().max() <= 30.0
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu.softcap_(x.t() if shape[0] > 1 else x.double(), 30.0)
    with pytest.raises(RuntimeError, match="positive"):
        cpu.softcap_(x, 0.0)


def test_rope_kernel_matches_rotate_half():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, 16, generator=g)[:, :, 1]  # a non-contiguous [B, T, H, D] view
    cos, sin = torch.randn(2, 3, 1, 16, generator=g), torch.randn(2, 3, 1, 16, generator=g)
    expected = x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin
    assert torch.allclose(cpu.rope(x, cos, sin), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [True, False])
def test_decode_attention_matches_sdpa(dtype, masked):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, S, D = 2, 8, 2, 37, 72  # D % 8 != 0 exercises the scalar tail
    q = torch.randn(B, Hq, D, generator=g)
    cache_k, cache_v = (torch.randn(B, Hkv, 50, D, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # strided views, as the cache hands them out
    mask = torch.rand(B, S, generator=g) > 0.3 if masked else None
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None],
        k.float(),
        v.float(),
        attn_mask=None if mask is None else mask[:, None, None],
        scale=0.3,
        enable_gqa=True,
    )[:, :, 0]
    assert torch.allclose(cpu.decode_attention(q, k, v, mask, 0.3), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [True, False])
def test_paged_decode_attention_reads_slots_in_place(dtype, masked):
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, NS, S, D = 3, 6, 2, 40, 11, 20
    q = torch.randn(B, Hq, D, generator=g)
    K, V = (torch.randn(Hkv, NS, D, generator=g).to(dtype) for _ in range(2))
    slots = torch.randint(0, NS, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True
    gathered = lambda t: t[:, slots].transpose(0, 1)  # noqa: E731  [B, Hkv, S, D]
    expected = cpu.decode_attention(q, gathered(K), gathered(V), mask, 0.4)
    assert torch.allclose(cpu.paged_decode_attention(q, K, V, slots, mask, 0.4), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.paged_decode_attention(q, K, V, slots + NS, mask, 0.4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 20, 64, 72, 128, 200])
def test_decode_attention_bits_do_not_depend_on_where_a_key_or_row_falls(dtype, D):
    """The kernel scores keys four at a time and one by one for the rest, and sums V 64 elements at a time: a
    key's and a row's numbers must not depend on which of those paths it takes. Keys masked out add nothing, so
    appending them moves the others across the four-key blocks without changing a bit; and a row alone gives the
    bits it gives in a batch."""
    g = torch.Generator().manual_seed(4)
    Hq, Hkv, NS = 6, 2, 64
    K, V = (torch.randn(Hkv, NS, D, generator=g).to(dtype) for _ in range(2))
    for S in range(1, 10):
        q = torch.randn(3, Hq, D, generator=g)
        slots = torch.randint(0, NS, (3, S + 5), generator=g)
        short = cpu.paged_decode_attention(q, K, V, slots[:, :S], None, 0.2)
        hidden = torch.zeros(3, S + 5, dtype=torch.bool)
        hidden[:, :S] = True
        assert torch.equal(cpu.paged_decode_attention(q, K, V, slots, hidden, 0.2), short)
        for b in range(3):
            alone = cpu.paged_decode_attention(q[b : b + 1], K, V, slots[b : b + 1, :S], None, 0.2)
            assert torch.equal(alone, short[b : b + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_store_writes_rows_into_slots(dtype):
    g = torch.Generator().manual_seed(3)
    K, V = torch.zeros(2, 30, 12, dtype=dtype), torch.zeros(2, 30, 12, dtype=dtype)
    k, v = torch.randn(4, 2, 12, generator=g), torch.randn(4, 2, 12, generator=g)
    slots = torch.tensor([7, 0, 29, 13])
    cpu.kv_store(K, V, slots, k, v[:, :, :])
    eK, eV = torch.zeros_like(K), torch.zeros_like(V)
    eK.index_copy_(1, slots, k.transpose(0, 1).to(dtype))
    eV.index_copy_(1, slots, v.transpose(0, 1).to(dtype))
    assert torch.equal(K, eK) and torch.equal(V, eV)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.kv_store(K, V, torch.tensor([0, 1, 2, 30]), k, v)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul_matches_torch(act):
    from hearthlm.layers.mlp import activation

    x = torch.randn(2, 3, 2 * 77, generator=torch.Generator().manual_seed(4)) * 5
    gate, up = x.chunk(2, dim=-1)
    assert torch.allclose(cpu.act_mul(x, act), activation(act)(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu.available(), reason="this CPU has no AVX2/FMA/F16C: the kernels are never built")
def test_built_kernels_load_despite_a_stale_build_lock(tmp_path):
    """A build killed midway leaves torch's `lock` file behind; the next run must not wait on it forever."""
    import os
    import shutil
    import subprocess
    import sys

    source = Path(os.environ.get("HEARTHLM_CACHE", Path.home() / ".cache" / "hearthlm")) / "kernels"
    shutil.copytree(source, tmp_path / "kernels")
    for build in [tmp_path / "kernels", *(tmp_path / "kernels").iterdir()]:
        if build.is_dir():
            (build / "lock").touch()
    code = "from hearthlm.kernels import cpu; assert cpu.available()"
    env = os.environ | {"HEARTHLM_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


# Where bf16_gemm runs on each kernel path that has it: the AMX tile unit, or AVX512-BF16 dot products.
BF16_GEMMS = {"amx": "amx", "avx512": "avx512_bf16"}


@pytest.fixture(params=list(BF16_GEMMS))
def bf16_gemm_path(request, kernel_path):
    """Runs a test on each of bf16_gemm's paths where this CPU has it (AVX512-BF16 also on AMX machines, capped
    by HEARTHLM_ISA=avx512)."""
    kernel_path(request.param)
    if cpu.bf16_gemm_path() != BF16_GEMMS[request.param]:
        pytest.skip(f"this CPU has no {BF16_GEMMS[request.param]} (bf16_gemm on the {request.param} path)")
    return request.param


# Row tails of the AMX (16) and AVX512-BF16 (6) tiles, column tails of their panels (32, 64), the shortest K.
@pytest.mark.parametrize("shape", [(40, 100, 256), (17, 33, 64), (64, 32, 32), (1, 64, 96), (13, 130, 64)])
def test_bf16_gemm_is_the_float32_product(shape, bf16_gemm_path):
    """bf16 weights on AMX or AVX512-BF16: float32 sums and x carried to 16 bits, so the float32 path's numbers
    to float32 rounding, bias included."""
    M, N, K = shape
    g = torch.Generator().manual_seed(M)
    x, w, b = (
        torch.randn(M, K, generator=g),
        (torch.randn(N, K, generator=g) * 0.02).bfloat16(),
        torch.randn(N, generator=g),
    )
    exact = x.double() @ w.double().T + b.double()
    # Per element: x's lost bits (below 2^-16 of it), float32 sums of 2K products (hi and lo) and the bias.
    bound = (x.double().abs() @ w.double().abs().T) * (2**-16 + 2 * K * 2**-24) + b.double().abs() * 2**-23
    for y in (cpu.bf16_gemm(x, w, b), linear(x, w, b)):
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
        assert ((y.double() - exact).abs() <= bound).all()


def test_bf16_gemm_rows_alone_and_in_a_batch(bf16_gemm_path):
    """A row's result does not depend on the rows around it (tile position, row tails), and leading dimensions of
    x are kept, whatever its dtype and strides."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(2, 23, 128, generator=g), (torch.randn(70, 128, generator=g) * 0.05).bfloat16()
    batch = cpu.bf16_gemm(x, w)
    assert batch.shape == (2, 23, 70)
    for i in (0, 5, 6, 22):
        assert torch.allclose(cpu.bf16_gemm(x[1, i : i + 1], w)[0], batch[1, i], rtol=0, atol=1e-5)
    assert torch.allclose(cpu.bf16_gemm(x.bfloat16(), w), cpu.bf16_gemm(x.bfloat16().float(), w), rtol=0, atol=0)
    strided = x.transpose(0, 1)  # [23, 2, 128], not contiguous
    assert torch.equal(cpu.bf16_gemm(strided, w), batch.transpose(0, 1))


def test_bf16_gemm_rejects_bad_inputs(bf16_gemm_path):
    x, w = torch.randn(4, 64), torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="W must be a contiguous 2-D bfloat16"):
        cpu.bf16_gemm(x, w.float())
    with pytest.raises(RuntimeError, match="W must be a contiguous 2-D bfloat16"):
        cpu.bf16_gemm(x, torch.randn(64, 8).bfloat16().T)
    with pytest.raises(RuntimeError, match="x's last dim must be K"):
        cpu.bf16_gemm(torch.randn(4, 32), w)
    with pytest.raises(RuntimeError, match="a multiple of 32"):
        cpu.bf16_gemm(torch.randn(4, 48), torch.randn(8, 48).bfloat16())
    with pytest.raises(RuntimeError, match="bias must be 1-D with N"):
        cpu.bf16_gemm(x, w, torch.randn(9))
    with pytest.raises(RuntimeError, match="x must be a floating-point"):
        cpu.bf16_gemm(torch.ones(4, 64, dtype=torch.int32), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 5, 8), (7, 16, 24), (13, 37, 256), (40, 70, 640)], ids=str)
def test_half_gemm_is_the_float32_product(kernel_path, dtype, shape):
    """half_gemm (kernels/gemm_half_avx2.cpp), prefill's GEMM for 16-bit weights where bf16_gemm does not run:
    float32 x and sums over the 16-bit weight widened exactly, so it is the float64 product to float32 rounding.
    Rows cover the 6-row register tile and every tail, columns the 16-column panel and its tails."""
    kernel_path("avx2")
    M, N, K = shape
    g = torch.Generator().manual_seed(M + N + K)
    x, w, bias = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g)
    exact = x.double() @ w.double().T
    bound = (K + 2) * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30  # float32 summation, worst case
    assert ((cpu.half_gemm(x, w).double() - exact).abs() <= bound).all()
    y = cpu.half_gemm(x.view(1, M, K), w, bias)
    assert y.shape == (1, M, N) and ((y[0].double() - exact - bias.double()).abs() <= bound + 1e-6).all()
    assert torch.equal(cpu.half_gemm(x[-1:], w)[0], cpu.half_gemm(x, w)[-1])  # a row's result is its own


def test_half_gemm_rejects_bad_inputs(kernel_path):
    kernel_path("avx2")
    x, w = torch.randn(4, 64), torch.randn(8, 64).bfloat16()
    for match, args in [
        ("W must be a contiguous 2-D bfloat16 or float16", (x, w.float())),
        ("W must be a contiguous 2-D", (x, torch.randn(64, 8).bfloat16().T)),
        ("x must be a float tensor \\[..., K\\]", (torch.randn(4, 32), w)),
        ("a multiple of 8", (torch.randn(4, 12), torch.randn(8, 12).bfloat16())),
        ("bias must be 1-D with N", (x, w, torch.randn(9))),
        ("x must be a float tensor", (torch.ones(4, 64, dtype=torch.int32), w)),
    ]:
        with pytest.raises(RuntimeError, match=match):
            cpu.half_gemm(*args)


def test_bf16_prefill_rows_agree_with_decode_rows(kernel_path):
    """Whatever path a prompt's length picks (the GEMV up to 32 rows, the AMX or AVX512-BF16 GEMM or float32
    beyond), a row's result is the same to float32 rounding: a text embedded alone and in a batch gives the same
    vector."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(48, 256, generator=g), (torch.randn(64, 256, generator=g) * 0.02).bfloat16()
    alone = linear(x[:3], w)
    native = cpu.isa()
    for path in [p for p in ("amx", "avx512", "avx2") if cpu.ISAS.index(p) >= cpu.ISAS.index(native)]:
        if path in BF16_GEMMS and not cpu.avx512_gemm_available():
            continue
        kernel_path(path)
        assert torch.allclose(linear(x, w)[:3], alone, rtol=0, atol=1e-5)  # oneDNN bf16 was 2e-4 off


@pytest.mark.parametrize("name", ["llama", "gemma3_bias"])
def test_bf16_model_prefill_is_the_float32_path(checkpoint, name, bf16_gemm_path, kernel_path, monkeypatch):
    """A bf16 checkpoint's 40-token prefill (past the GEMV's rows) multiplies its weights with bf16_gemm: each
    product is the float32 one (weights converted) to 2^-16 of x, and the logits are those of the float32 path
    (HEARTHLM_ISA=avx2) within what these random nets make of float32 rounding. (Noise of 2^-22 on the float32
    path's products moves them by 2e-4 to 6e-4; rounding x and y to bf16 as oneDNN does, by 1.4e-2.) The AVX-512
    GEMV takes up to 256 rows, past these checkpoints' 256 positions, so its limit is set to 32 here, as on AMX."""
    from checkpoints import VOCAB

    from hearthlm import LLM

    monkeypatch.setitem(cpu.GEMV_ROWS, "avx512", (32, cpu.MAX_ROWS))
    llm = LLM(checkpoint(name)[1], dtype="bfloat16")
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    real, rows, errors = cpu.bf16_gemm, [], []

    def checked(x, w, b=None):
        y = real(x, w, b)
        ref = torch.nn.functional.linear(x.float(), w.float(), b)
        rows.append(x.numel() // x.shape[-1])
        errors.append(((y - ref).abs().max() / ref.abs().max()).item())
        return y

    monkeypatch.setattr(cpu, "bf16_gemm", checked)
    got = llm.logits(ids)
    assert rows and max(rows) == 40 and max(errors) <= 2e-5
    kernel_path("avx2")
    rows.clear()
    expected = llm.logits(ids)
    assert not rows
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 2e-3
