"""The AVX-512 VNNI path of the quantized GEMV for 8-bit weights (kernels/quant_vnni.cpp) at the batch sizes it
exists for: decode batches, speculative verify steps and short prefill chunks, any number of rows in one pass over
the weights.

It has two ways through: up to 4 rows the weights run as they lie and each unit's lanes are summed afterwards;
from 5 rows 16 weight rows at a time are transposed in cache, in chunks of 1024 elements of K, and x rows go in
passes of up to 8. (4-bit weights keep quant_cpu.cpp's 8-row kernel, checked in test_quant_kernels.) Both give every unit the same exact integer sum and the same float steps, so a row's result
must be the same bits alone and in any batch. The layouts here cross every boundary: K past one chunk with a
partial last 64-byte step, groups that straddle chunks, groups of 16, one group per row; 37 weight rows leave a
partial tile of 16. Each product is also held to test_quant_kernels._check's two bounds.
"""

from __future__ import annotations

import pytest
import torch
from test_quant_kernels import _check, _weights

from hearthlm.kernels import cpu
from hearthlm.quant.linear import quant_linear
from hearthlm.quant.tensor import QuantTensor

pytestmark = pytest.mark.skipif(
    not cpu.available() or "avx512" not in cpu.gemv_paths(), reason="needs a CPU with AVX-512 VNNI"
)

# (K, group): 1056 = 1024 + one 32-element block (a partial 64-byte step in a second chunk), groups of 96 across
# the chunk boundary; 2112 in groups of 16 (three chunks); 1088 in groups of 64; 3072 as one group per row; 640
# in one chunk.
LAYOUTS = [(1056, 96), (2112, 16), (1088, 64), (3072, 3072), (640, 32)]
ROWS = (2, 4, 5, 8, 9, 16, 33, 40)  # each side of the few-row path (4) and of a pass (8), several passes


@pytest.fixture(autouse=True)
def vnni():
    before = cpu.gemv_isa()
    cpu.set_gemv_isa("avx512")
    yield
    cpu.set_gemv_isa(before)


@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"K{t[0]}-g{t[1]}")
def test_many_rows_match_the_reference(mins, layout):
    K, group, bits = *layout, 8
    q, s, m = _weights(37, K, bits, group, mins, seed=K + group + bits)
    g = torch.Generator().manual_seed(K)
    for M in ROWS:
        x = torch.randn(M, K, generator=g)
        x[M - 1, 64:96] = 0  # an all-zero block: scale 0
        _check(x, q, s, m, bits, group)


@pytest.mark.parametrize("mins", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"K{t[0]}-g{t[1]}")
def test_a_row_is_the_same_bits_in_any_batch(mins, layout):
    K, group, bits = *layout, 8
    q, s, m = _weights(37, K, bits, group, mins, seed=K + group + 2 * bits)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(3))
    x = torch.randn(max(ROWS) + 1, K, generator=torch.Generator().manual_seed(K + 1))
    alone = torch.cat([cpu.quant_gemv(row, q, s, m, bits, group, bias) for row in x.split(1)])
    for M in ROWS:
        for start in (0, 1):
            got = cpu.quant_gemv(x[start : start + M], q, s, m, bits, group, bias)
            assert torch.equal(got, alone[start : start + M]), (M, start)


def test_quant_linear_keeps_short_batches_on_the_gemv():
    """Up to QUANT_GEMV_ROWS_VNNI rows quant_linear runs the 8-bit GEMV (faster than the prefill GEMM there), so a
    verify step or a short prefill chunk gives each row the bits it gets alone; 4-bit weights keep 8, and the AVX2
    path QUANT_GEMV_ROWS_AVX2."""
    q, s, m = _weights(48, 640, 8, 32, False, seed=9)
    w = QuantTensor(q, s, m, 8, 32)
    x = torch.randn(cpu.QUANT_GEMV_ROWS_VNNI, 640, generator=torch.Generator().manual_seed(10))
    assert cpu.quant_gemv_rows(4) == cpu.MAX_ROWS
    if cpu.avx512_gemm_available() and not cpu._amx():
        assert cpu.quant_gemv_rows(8) == cpu.QUANT_GEMV_ROWS_VNNI
        assert torch.equal(quant_linear(x, w), cpu.quant_gemv(x, q, s, m, 8, 32))
        assert torch.equal(quant_linear(x[:20], w)[7], quant_linear(x[7:8], w)[0])
    cpu.set_gemv_isa("avx2")
    assert cpu.quant_gemv_rows(8) == cpu.quant_gemv_rows(4) == cpu.QUANT_GEMV_ROWS_AVX2
