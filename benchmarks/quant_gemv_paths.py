"""The quantized GEMV's instruction paths against each other in one process (kernels/quant_cpu.cpp: AVX-512 VNNI
and AVX2 on a VNNI machine), at decode shapes with weights from DRAM (benchmarks/quant_gemv.py's shapes, formats
and weight copies). Each round runs every path for `--calls` calls, in alternating order; the figures are median
GB/s per path and the median of the per-round ratios, which a change in the machine's load disturbs less than
separate runs.

    python benchmarks/quant_gemv_paths.py [--rows 1] [--rounds 8] [--shapes qkv,gate_up,down,lm_head] [--gemm]

With more rows than one pass of the AVX2 kernel (8), the AVX2 path runs even slices of 8 rows: what every path
did before 8-bit weights got a VNNI kernel that takes any number of rows in one pass (kernels/quant_vnni.cpp).
--gemm adds the prefill GEMM (quant_gemm) as a third contender, which quant_linear uses past
cpu.quant_gemv_rows() rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from quant_gemv import FORMATS, SHAPES, weight_copies

from hearthlm.kernels import cpu


def seconds_per_call(x, parts, bits, group, calls, start, kernel=cpu.quant_gemv):
    times = []
    for i in range(calls):
        p = parts[(start + i) % len(parts)]
        t = time.perf_counter()
        kernel(x, *p, bits, group)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--shapes", default="qkv,gate_up,down,lm_head")
    ap.add_argument("--gemm", action="store_true", help="also time the prefill GEMM (quant_gemm)")
    args = ap.parse_args()
    paths = cpu.gemv_paths()
    contenders = paths + (["gemm"] if args.gemm and cpu.gemm_available() else [])
    if len(contenders) < 2:
        raise SystemExit(f"only {contenders} runs here: nothing to compare (--gemm adds the prefill GEMM)")
    print(f"threads {torch.get_num_threads()}, rows {args.rows}, paths {contenders}, load {os.getloadavg()[0]:.2f}")
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        x = torch.randn(args.rows, K, generator=g)
        for label, bits, group, mins in FORMATS:
            group = group or K
            parts, nbytes = weight_copies(N, K, bits, group, mins, g)
            times: dict[str, list[float]] = {p: [] for p in contenders}
            ratios: dict[str, list[float]] = {p: [] for p in contenders[1:]}
            for r in range(args.rounds):
                for path in contenders if r % 2 == 0 else contenders[::-1]:
                    kernel = cpu.quant_gemm if path == "gemm" else cpu.quant_gemv
                    if path != "gemm":
                        cpu.set_gemv_isa(path)
                    times[path].append(seconds_per_call(x, parts, bits, group, args.calls, r * args.calls, kernel))
                for p in contenders[1:]:
                    ratios[p].append(times[p][-1] / times[paths[0]][-1])
            rates = "  ".join(f"{p} {nbytes / statistics.median(t) / 1e9:5.1f} GB/s" for p, t in times.items())
            speedups = "  ".join(f"x{statistics.median(v):.2f} vs {p}" for p, v in ratios.items())
            print(f"{name:8s} {label:14s} {rates}  {paths[0]}: {speedups}")
    cpu.set_gemv_isa(paths[0])
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
