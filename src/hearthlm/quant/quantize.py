"""Quantizing float weights into QuantTensors: `int8` (one scale per output row) and `int4` (a scale and a
min per group of input elements).

int8: q = round(w / s) with s = max|w| / 127 per row: symmetric, because weight rows are centred near zero
and 255 levels leave no room for a min to pay off.
int4: 16 levels are few, so each group gets the (scale, min) pair that minimises its squared error: a small
grid of clipped ranges, each refitted by least squares on its integers, the best kept. This roughly halves
the error of plain min/max rounding (benchmarks/quality.py shows the effect on KL divergence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .tensor import QuantTensor, pack_int4

INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 32  # chosen by benchmarks/quality.py and benchmarks/decode.py (README, "Quantization")
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_CHUNK = 1 << 20  # elements quantized at a time: bounds the temporaries (and the load peak, see fit.py)


class QuantSpecError(ValueError):
    """An unknown quantization name."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int | None  # None: one group per row

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group}"


def parse_quant(name: str) -> QuantSpec:
    """'int8', 'int4' (the default group size) or 'int4-g32' / 'int4-g64' / 'int4-g128'."""
    m = re.fullmatch(r"int([48])(?:-g(\d+))?", name.strip().lower())
    if m is None or (m[1] == "8" and m[2]) or (m[2] and int(m[2]) not in INT4_GROUPS):
        raise QuantSpecError(
            f"unknown quantization '{name}': use int8, int4, or int4-g32 / int4-g64 / int4-g128 (group size)"
        )
    if m[1] == "8":
        return QuantSpec(8, None)
    return QuantSpec(4, int(m[2]) if m[2] else DEFAULT_INT4_GROUP)


def quantizable(weight: torch.Tensor, spec: QuantSpec) -> bool:
    K = weight.shape[-1]
    return (
        weight.dim() >= 2 and weight.is_floating_point() and K % 32 == 0 and (spec.group is None or K % spec.group == 0)
    )


@torch.inference_mode()
def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantTensor:
    """A float weight [..., N, K] (K a multiple of 32 and of the group) -> QuantTensor."""
    if not quantizable(weight, spec):
        raise ValueError(f"cannot quantize a {weight.dtype} tensor of shape {tuple(weight.shape)} to {spec.name}")
    lead, K = weight.shape[:-1], weight.shape[-1]
    rows = weight.reshape(-1, K)
    step = max(1, _CHUNK // K)
    parts = [
        (_int8 if spec.bits == 8 else _int4)(rows[i : i + step].float(), spec.group) for i in range(0, len(rows), step)
    ]
    qdata, scales, mins = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
    shape = lambda t: t.reshape(*lead, t.shape[-1])  # noqa: E731
    return QuantTensor(shape(qdata), shape(scales), None if mins is None else shape(mins), spec.bits, spec.group or K)


def _int8(w: torch.Tensor, group: int | None):
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.half(), None


def _int4(w: torch.Tensor, group: int):
    N, K = w.shape
    g = w.view(N, K // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    best_err = best_s = best_m = None
    for clip in _CLIPS:
        span = (hi - lo) * clip
        m0 = lo + (hi - lo - span) / 2
        s0 = torch.where(span > 0, span / 15, torch.ones_like(span))
        q = torch.round((g - m0) / s0).clamp_(0, 15)
        s, m = _refit(g, q, s0, m0)
        err = (q * s + m - g).square_().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_m = err, s, m
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    # The kernels see float16 scale and min: pick the integers against those rounded values.
    s, m = best_s.half().float(), best_m.half().float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((g - m) / safe).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), s.view(N, -1).half(), m.view(N, -1).half()


def _refit(g: torch.Tensor, q: torch.Tensor, s0: torch.Tensor, m0: torch.Tensor):
    """Least-squares scale and min for fixed integers q (falls back to the start where q is constant)."""
    n = g.shape[-1]
    sq, sw = q.sum(-1, keepdim=True), g.sum(-1, keepdim=True)
    sqq, sqw = (q * q).sum(-1, keepdim=True), (q * g).sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (n * sqw - sq * sw) / safe, s0)
    m = torch.where(ok, (sw - s * sq) / n, m0)
    return s, m
