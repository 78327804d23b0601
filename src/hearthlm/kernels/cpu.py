"""CPU kernels in C++ (AVX2/FMA/F16C), compiled on first use: a batch-1..8 GEMV, decode attention over
the KV cache in its stored dtype, and RMSNorm / RoPE for decode-sized inputs.

The extension is built with torch's cpp_extension into ~/.cache/hearthlm (about 30 s, once). If the
CPU lacks AVX2/FMA/F16C, no compiler is available, or HEARTHLM_KERNELS=0, `available()` is False and
callers use PyTorch's own ops.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path

import torch
from rich.console import Console

MAX_ROWS = 8  # the kernel serves up to this many input rows (decode batches)


def _cpu_supports() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


@functools.cache
def _load():
    if os.environ.get("HEARTHLM_KERNELS", "1") == "0" or not _cpu_supports():
        return None
    try:
        from torch.utils.cpp_extension import load

        # Link the OpenMP runtime torch itself ships, so the process has one thread pool, not two
        # competing for the same cores.
        torch_lib = Path(torch.__file__).parent / "lib"
        omp = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lgomp"] if (torch_lib / "libgomp.so.1").exists() else []
        build = Path(os.environ.get("HEARTHLM_CACHE", Path.home() / ".cache" / "hearthlm")) / "kernels"
        build.mkdir(parents=True, exist_ok=True)
        first = not (build / "hearthlm_gemv_cpu.so").exists()
        status = Console(stderr=True).status("building hearthlm's CPU kernels (once, about 30 s)")
        with status if first else contextlib.nullcontext():
            return load(
                name="hearthlm_gemv_cpu",
                sources=[str(Path(__file__).with_name("gemv_cpu.cpp"))],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                extra_ldflags=omp or ["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # no compiler / headers: fall back, loudly once
        warnings.warn(f"hearthlm: CPU kernels unavailable ({e}); using PyTorch ops", stacklevel=2)
        return None


def available() -> bool:
    return _load() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), weight [N, K] contiguous -> [M, N] float32."""
    return _load().gemv(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """float32 x [..., D] -> RMSNorm(x) * weight (float32 weight or None)."""
    return _load().rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float32 x [B, T, H, D], cos/sin [B, T, 1, D] -> rotate-half RoPE of x."""
    return _load().rope(x, cos, sin)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q [B, Hq, D] float32; k, v [B, Hkv, S, D] in the cache dtype; mask [B, S] bool -> [B, Hq, D]."""
    return _load().decode_attention(q, k, v, mask, scale)
