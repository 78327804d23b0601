"""Products with quantized weights: the CPU kernels where they apply, dequantized tiles elsewhere.

Up to cpu.quant_gemv_rows(bits) input rows (decode, verify steps, short prefill chunks) run the integer GEMV
kernel, which reads the packed weights once. More rows (prefill) run the integer GEMM: AMX or AVX-512 VNNI
(kernels/gemm_avx512.cpp: 5-7x the float tiles below at 512 rows), else AVX2 (kernels/gemm_avx2.cpp). Without the
kernels (another device, HEARTHLM_ISA=torch, no compiler) `float_tiles` dequantizes the weight a tile of output
rows at a time and multiplies in float: the exact product. Off the CPU the tiles come from the pure-torch reference
`dequantize`, so every device gets the same answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu
from .tensor import QuantTensor, dequantize

TILE = 1 << 20  # weights dequantized at a time for prefill (4 MB of float32)


def _kernels(w: QuantTensor) -> bool:
    return w.device.type == "cpu" and cpu.available()


def quant_linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    N, K = w.shape
    rows = x.numel() // K
    # The buffers straight from their dict: decode makes ~100 of these calls per token, and nn.Module's
    # attribute lookup costs more than a microsecond each.
    buffers = w._buffers
    qdata = buffers["qdata"]
    kernel = None
    if rows > 0 and qdata.device.type == "cpu":
        if cpu.available() and rows <= cpu.quant_gemv_rows(w.bits):
            kernel = cpu.quant_gemv
        elif qdata.dim() == 2 and qdata.is_contiguous() and cpu.gemm_available():
            kernel = cpu.quant_gemm
    if kernel is not None:
        fused = bias is not None and bias.dtype == torch.float32
        y = kernel(x, qdata, buffers["scales"], buffers["mins"], w.bits, w.group, bias if fused else None)
        if bias is not None and not fused:
            y += bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return float_tiles(x, w, bias)


def float_tiles(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias with W dequantized a tile of output rows at a time (the tile stays in cache) and multiplied in
    float: the exact product, to float32 rounding, where the integer kernels round x to 8 bits."""
    N, K = w.shape
    rows = x.numel() // K
    dtype = torch.float32 if x.device.type == "cpu" else x.dtype
    flat = x.reshape(rows, K).to(dtype)
    y = torch.empty(rows, N, dtype=dtype, device=x.device)
    step = max(1, TILE // K)
    for n in range(0, N, step):
        y[:, n : n + step] = F.linear(flat, _tile(w, n, min(N, n + step), dtype))
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*x.shape[:-1], N)


def _tile(w: QuantTensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    if _kernels(w):
        rows = torch.arange(start, end)
        return cpu.dequant_rows(w.qdata, w.scales, w.mins, w.bits, w.group, rows)
    t = w.rows(start, end)
    return dequantize(t.qdata, t.scales, t.mins, t.bits, t.group).to(dtype)


def quant_rows(w: QuantTensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a quantized table, float32 [len(ids), K] (embedding lookups)."""
    if _kernels(w):
        return cpu.dequant_rows(w.qdata, w.scales, w.mins, w.bits, w.group, ids.to(torch.int64))
    mins = None if w.mins is None else w.mins[ids]
    return dequantize(w.qdata[ids], w.scales[ids], mins, w.bits, w.group)
