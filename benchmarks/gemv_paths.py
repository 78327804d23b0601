"""The float GEMV's paths against each other in one process (kernels/gemv_cpu.cpp and gemv_wide.cpp: AVX-512 and AVX2
on an AVX-512 machine), over one decode step's projections of the Qwen2.5-0.5B shape (24 layers of qkv, o, gate_up
and down, then the LM head: about 1 GB in bf16, so the weights come from DRAM), at several numbers of x rows.

    python benchmarks/gemv_paths.py [--dtype bf16] [--rows 1,2,4,8,16,32] [--rounds 3] [--layers 24] [--gemm]

Each round times every contender once per row count, in alternating order; the figures are the median ms per step
and GMAC/s (multiply-adds per second), and the first path's median per-round speed-up over each other one, which a change in the
machine's load disturbs less than separate runs. On AVX2 more than 8 rows run as even slices of 8 (every weight read
once per slice); the AVX-512 path takes them all in one pass. --gemm adds the GEMM that linear() uses past
cpu.gemv_rows() rows: bf16_gemm (AVX512-BF16 or AMX) for bf16 weights, half_gemm (AVX2 FMAs) for other 16-bit
weights and where bf16_gemm does not run, PyTorch's F.linear for float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hearthlm.kernels import cpu

SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]  # qkv, o, gate_up, down
LM_HEAD = (151936, 896)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def step_seconds(kernel, weights: list[torch.Tensor], rows: int, g: torch.Generator) -> float:
    xs = {K: torch.randn(rows, K, generator=g) for K in {w.shape[1] for w in weights}}
    t = time.perf_counter()
    for w in weights:
        kernel(xs[w.shape[1]], w)
    return time.perf_counter() - t


def contenders(dtype: torch.dtype, gemm: bool) -> dict:
    def on(path):
        def run(x, w):
            cpu.set_gemv_isa(path)
            return cpu.gemv(x, w)

        return run

    out = {path: on(path) for path in cpu.gemv_paths()}
    if gemm and dtype == torch.bfloat16 and cpu.bf16_gemm_available():
        out["bf16_gemm"] = cpu.bf16_gemm
    elif gemm and dtype != torch.float32 and cpu.half_gemm_available():
        out["half_gemm"] = cpu.half_gemm
    elif gemm and dtype == torch.float32:
        out["F.linear"] = F.linear
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--gemm", action="store_true", help="also time the GEMM linear() uses for more rows")
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernels are unavailable here (see kernels/cpu.py)")
    dtype, g = DTYPES[args.dtype], torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).to(dtype) for n, k in SHAPES * args.layers + [LM_HEAD]]
    macs = sum(w.numel() for w in weights)
    kernels = contenders(dtype, args.gemm)
    names = list(kernels)
    print(
        f"{args.dtype}, {macs * weights[0].element_size() / 1e9:.2f} GB of weights, threads {torch.get_num_threads()}"
    )
    print(f"contenders {names}, load {os.getloadavg()[0]:.2f}")
    before = cpu.gemv_isa()
    for rows in [int(r) for r in args.rows.split(",")]:
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                step_seconds(kernels[n], weights[:4], rows, g)  # warm the path's code and scratch
                times[n].append(step_seconds(kernels[n], weights, rows, g))
        ms = "  ".join(
            f"{n} {statistics.median(t) * 1e3:7.1f} ms {macs * rows / statistics.median(t) / 1e9:4.0f} GMAC/s"
            for n, t in times.items()
        )
        speedups = "  ".join(
            f"x{statistics.median(b / a for a, b in zip(times[names[0]], times[n])):.2f} over {n}" for n in names[1:]
        )
        print(f"rows {rows:3d}  {ms}   {names[0]}: {speedups}", flush=True)
    cpu.set_gemv_isa(before)
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
