"""Parts that Gemma 4's vision and audio towers share: the clipped linear layer, a scale-free RMSNorm, and the
projection of a tower's output into the text model's width (`embed_vision` / `embed_audio`).

Towers run in float32 on CPU (as the text model's activations do), their linear layers' bf16 / fp16 weights kept
as stored (layers.linear computes with them in float32), and in the model dtype elsewhere, except float16: its range is too small for the patch embedding and the pooler's
sqrt(width) scale (a known source of `<unused>` garbage after an image in other runtimes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import linear
from ..quant.tensor import QuantTensor


def tower_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tower computes in: see the module docstring."""
    if device.type == "cpu" or dtype == torch.float16:
        return torch.float32
    return dtype


def rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm computed in float32 (x * (mean(x^2) + eps)^-1/2, times `weight` when given), cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


def dense(x: torch.Tensor, weight: torch.Tensor | QuantTensor) -> torch.Tensor:
    """x @ weight.T: F.linear when the weight is in x's dtype, the reference's kernel whatever the row count
    (layers.linear's few-row CPU kernel sums in another order); layers.linear for stored half-precision or
    quantized weights."""
    if isinstance(weight, torch.Tensor) and weight.dtype == x.dtype:
        return F.linear(x, weight)
    return linear(x, weight)


class Norm(nn.Module):
    """RMSNorm whose weight multiplies as stored (Gemma 4's convention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms(x, self.eps, self.weight)


class ClippedLinear(nn.Module):
    """A bias-free linear layer whose input and output may be clamped to stored bounds (`use_clipped_linears`).
    Checkpoint names: NAME.linear.weight and, when clipped, NAME.input_min / input_max / output_min / output_max."""

    def __init__(self, d_in: int, d_out: int, clipped: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                setattr(self, name, nn.Parameter(torch.empty(()), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = x.clamp(self.input_min.item(), self.input_max.item())
        y = dense(x, self.weight)
        return y.clamp(self.output_min.item(), self.output_max.item()) if self.clipped else y

    def names(self, ours: str, theirs: str) -> dict[str, str]:
        """Our parameter names -> checkpoint names, for this layer at `ours` / `theirs`."""
        m = {f"{ours}.weight": f"{theirs}.linear.weight"}
        if self.clipped:
            m |= {f"{ours}.{b}": f"{theirs}.{b}" for b in ("input_min", "input_max", "output_min", "output_max")}
        return m


class Projection(nn.Module):
    """A tower's output into the text width: RMSNorm without a weight, then a bias-free linear layer."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(rms(x, self.eps), self.weight)


def mirrored_names(module: nn.Module, prefix: str) -> dict[str, str]:
    """Our parameter names -> checkpoint names for a module whose names mirror the checkpoint's (a clipped
    linear layer's weight sits one level deeper there, as NAME.linear.weight)."""
    m: dict[str, str] = {}
    for owner, sub in module.named_modules():
        if isinstance(sub, ClippedLinear):
            m |= sub.names(owner, prefix + owner)
        else:
            dot = f"{owner}." if owner else ""
            m |= {dot + name: prefix + dot + name for name, _ in sub.named_parameters(recurse=False)}
    return m
