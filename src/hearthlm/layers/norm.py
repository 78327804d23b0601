"""RMSNorm, computed in float32 and cast back (as every reference implementation does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_weight else None

    def after_load(self) -> None:
        # The weight is only ever used in float32: convert it once instead of on every call.
        if self.weight is not None:
            self.weight = nn.Parameter(self.weight.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and cpu.available():  # faster than PyTorch's op at every size measured (docs)
            return cpu.rms_norm(x.float(), self.weight, self.eps).to(x.dtype)
        return F.rms_norm(x.float(), self.shape, self.weight, self.eps).to(x.dtype)
