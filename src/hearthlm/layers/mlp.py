"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu
from .linear import Linear

SMALL = 1 << 16  # elements of [gate | up] up to which the fused CPU kernel's lower overhead wins


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def act_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for gate_up = [gate | up] along the last dim."""
    if gate_up.device.type == "cpu" and gate_up.dtype == torch.float32 and gate_up.numel() <= SMALL and cpu.available():
        return cpu.act_mul(gate_up, act)  # decode-sized: one pass instead of chunk, act, mul
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(act)(gate) * up


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_up = Linear(hidden, 2 * intermediate, bias=bias)  # rows: [gate; up]
        self.down = Linear(intermediate, hidden, bias=bias)
        activation(act)  # an unknown name fails here, at build time
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(act_mul(self.gate_up(x), self.act))
