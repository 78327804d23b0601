"""The quantized GEMV's instruction paths against each other in one process (kernels/quant_cpu.cpp: AVX-512 VNNI
and AVX2 on a VNNI machine), at decode shapes with weights from DRAM (benchmarks/quant_gemv.py's shapes, formats
and weight copies). Each round runs every path for `--calls` calls, in alternating order; the figures are median
GB/s per path and the median of the per-round ratios, which a change in the machine's load disturbs less than
separate runs.

    python benchmarks/quant_gemv_paths.py [--rows 1] [--rounds 8] [--shapes qkv,gate_up,down,lm_head]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from quant_gemv import FORMATS, SHAPES, weight_copies

from hearthlm.kernels import cpu


def seconds_per_call(x, parts, bits, group, calls, start):
    times = []
    for i in range(calls):
        p = parts[(start + i) % len(parts)]
        t = time.perf_counter()
        cpu.quant_gemv(x, *p, bits, group)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--shapes", default="qkv,gate_up,down,lm_head")
    args = ap.parse_args()
    paths = cpu.quant_gemv_paths()
    if len(paths) < 2:
        raise SystemExit(f"only {paths} runs here: nothing to compare")
    print(f"threads {torch.get_num_threads()}, rows {args.rows}, paths {paths}, load {os.getloadavg()[0]:.2f}")
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        x = torch.randn(args.rows, K, generator=g)
        for label, bits, group, mins in FORMATS:
            group = group or K
            parts, nbytes = weight_copies(N, K, bits, group, mins, g)
            times: dict[str, list[float]] = {p: [] for p in paths}
            ratios = []
            for r in range(args.rounds):
                for path in paths if r % 2 == 0 else paths[::-1]:
                    cpu.set_quant_gemv_isa(path)
                    times[path].append(seconds_per_call(x, parts, bits, group, args.calls, r * args.calls))
                ratios.append(times[paths[1]][-1] / times[paths[0]][-1])
            rates = "  ".join(f"{p} {nbytes / statistics.median(t) / 1e9:5.1f} GB/s" for p, t in times.items())
            print(f"{name:8s} {label:14s} {rates}  {paths[0]} speedup x{statistics.median(ratios):.2f}")
    cpu.set_quant_gemv_isa(paths[0])
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
