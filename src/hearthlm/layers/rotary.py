"""Rotary position embeddings: default, linearly scaled, llama3-scaled and proportional (partial) RoPE.

All four produce one inverse-frequency vector of length head_dim / 2 and are applied the same way
(rotate-half over the whole head). Proportional RoPE rotates only the first `partial` share of the
frequencies; the rest get frequency 0, i.e. they pass through unrotated.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeSpec
from ..kernels import cpu


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    # Explicit CPU: models are built under the meta device, but these tables are real data.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    if spec.kind == "default":
        inv = 1.0 / (spec.theta**exponents)
        return inv / torch.tensor(spec.freq_factors, device="cpu") if spec.freq_factors else inv
    if spec.kind == "linear":  # positions divided by the factor
        return 1.0 / (spec.theta**exponents) / spec.factor
    if spec.kind == "proportional":
        rotated = int(spec.partial * head_dim // 2)
        inv = torch.zeros(head_dim // 2, device="cpu")
        inv[:rotated] = 1.0 / (spec.theta ** exponents[:rotated])
        return inv / spec.factor
    if spec.kind == "llama3":
        inv = 1.0 / (spec.theta**exponents)
        low_wavelen = spec.original_max_position / spec.low_freq_factor
        high_wavelen = spec.original_max_position / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / spec.factor, inv)
        smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown RoPE kind {spec.kind!r}")


class Rotary:
    """cos/sin tables for one (RoPE spec, head_dim), grown on demand, indexed by absolute position."""

    def __init__(self, spec: RopeSpec, head_dim: int):
        self.inv_freq = inverse_frequencies(spec, head_dim)
        self._cos = self._sin = torch.empty(0)

    def _grow(self, n: int, device: torch.device) -> None:
        size = max(n, 2 * self._cos.shape[0], 256)
        freqs = torch.arange(size, device=device).float()[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        self._cos, self._sin = emb.cos(), emb.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, D] in `dtype` (broadcast over heads)."""
        need = int(positions.max()) + 1
        if need > self._cos.shape[0] or self._cos.device != positions.device:
            self._grow(need, positions.device)
        return self._cos[positions].to(dtype)[:, :, None], self._sin[positions].to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; rotate-half convention (pairs i and i + D/2)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] <= 32 and cpu.available():
        return cpu.rope(x, cos, sin)  # decode-sized: one call instead of seven small ops
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
