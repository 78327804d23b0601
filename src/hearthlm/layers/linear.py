"""Linear layers: one entry point that picks the kernel for the device, the weight format and the
number of input rows (quantized weights: quant/linear.py).

On CPU: decode batches and short prompts go to the GEMV kernel, up to cpu.gemv_rows(dtype) rows. On the AVX-512
path it takes them all in one pass over the weights and beats bf16_gemm up to 256 rows of 16-bit weights; float32
weights go to it up to 8 rows (one pass), and on AMX 16-bit weights up to 32 rows in passes of 8. More rows with
fp16/bf16 weights compute in float32, because PyTorch's half-precision CPU GEMMs without AVX-512 run several times
slower than fp32 (benchmarks/decode.py: transformers bf16 prefills at 28 tokens/s where fp32 does 208), and because
oneDNN's bf16 GEMM, 5x faster on CPUs with AMX, rounds x and its output to bfloat16: a prompt's numbers would then
depend on how many rows it has (an embedding on its own and in a batch differed by 2e-4), and the demo model lost
KL 8e-5 by it. On CPUs with AMX-BF16 or AVX512-BF16, bf16 weights take hearthlm's own bf16 GEMM instead
(kernels/gemm_avx512.cpp bf16_gemm, on the tile unit or with VDPBF16PS: float32 sums, x kept to 16 bits), which gives
the float32 path's numbers without converting the weight per call. Elsewhere 16-bit weights take half_gemm
(kernels/gemm_half_avx2.cpp: float32 FMAs, the weight converted a panel at a time as it is packed, where converting
the whole weight per call wrote and read back a float32 copy twice its size). Off the CPU: F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu
from ..quant.linear import quant_linear
from ..quant.tensor import QuantTensor, RowConcat

_HALF = (torch.float16, torch.bfloat16)


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantTensor | RowConcat, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(weight, QuantTensor):
        return quant_linear(x, weight, bias)
    if isinstance(weight, RowConcat):
        y = torch.cat([linear(x, part) for part in weight.parts], dim=-1)
        return y if bias is None else y + bias
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if 0 < rows <= cpu.gemv_rows(weight.dtype) and weight.is_contiguous() and cpu.available():
        fused = bias is not None and bias.dtype == torch.float32
        y = cpu.gemv(x, weight, bias if fused else None)
        if bias is not None and not fused:
            y += bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if weight.dtype == torch.bfloat16 and K % 32 == 0 and weight.is_contiguous() and cpu.bf16_gemm_available():
        fused = bias is not None and bias.dtype == torch.float32
        y = cpu.bf16_gemm(x, weight, bias if fused else None)
        return (y if bias is None or fused else y + bias).to(x.dtype)
    if weight.dtype in _HALF:
        if K % 8 == 0 and weight.is_contiguous() and cpu.half_gemm_available():
            return cpu.half_gemm(x, weight, bias).to(x.dtype)
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight is a parameter, or a QuantTensor submodule once quantized. Read from their dicts:
        # nn.Module's attribute lookup costs more than a microsecond, and decode runs ~100 of these per token.
        params = self._parameters
        weight = params["weight"] if "weight" in params else self._modules["weight"]
        return linear(x, weight, params.get("bias"))
