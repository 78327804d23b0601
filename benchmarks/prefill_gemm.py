"""Speed of the prefill products, kernel by kernel, at Llama-3.2-1B's shapes and a 512-token prompt.

For each weight format (the QuantTensor layouts that hearthlm's int8/int4 and the GGUF types load into) it times
the paths a prefill can take on this machine, in one process, alternating rounds:

- tiles:   dequantize a tile of weights to float32 and multiply with PyTorch (quant/linear.py `float_tiles`, the
           exact product; before the AVX2 GEMM it was the AVX2 path);
- gemm:    the integer GEMM quant_linear runs here (cpu.gemm_path(): AMX, AVX-512 VNNI in kernels/gemm_avx512.cpp, or
           AVX2 in kernels/gemm_avx2.cpp), x rounded to int8 per block of 32;
- and for 16-bit weights: float32 (weights converted per call, as the AVX2 path did before half_gemm), half_gemm
  (kernels/gemm_half_avx2.cpp: float32 FMAs, the weight converted a panel at a time: the AVX2 path, and AVX-512
  CPUs without BF16),
  hearthlm's bf16 GEMM on AMX-BF16 ("amx bf16", the AMX path) and on AVX512-BF16 ("avx512 bf16": the AVX-512 path
  on CPUs with it, and on AMX CPUs capped to it), and oneDNN's bf16 GEMM for reference (it rounds x and y to bf16;
  prefill does not use it).

Figures are GOP/s (2 operations per multiply-add) and the speedup over the tiles path; medians of --rounds.

    python benchmarks/prefill_gemm.py [--rows 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from hearthlm.kernels import cpu
from hearthlm.quant.linear import float_tiles, quant_linear
from hearthlm.quant.tensor import QuantTensor, pack_int4

# Llama-3.2-1B: (N, K) of the fused q/k/v, o, fused gate/up and down projections.
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
# label -> (bits, group or None for one scale per row, mins): the layouts each format loads into.
FORMATS = {
    "int8 g32 (Q8_0, int8-g32)": (8, 32, False),
    "int8 per row (int8)": (8, None, False),
    "int4 g32 (Q4_0, int4)": (4, 32, False),
    "int4 g32 + mins (Q4_1, Q4_K)": (4, 32, True),
    "int8 g16 (Q6_K)": (8, 16, False),
    "int8 g32 + mins (Q5_0, Q5_K)": (8, 32, True),
}


def quantized(N: int, K: int, bits: int, group: int | None, mins: bool) -> QuantTensor:
    g = torch.Generator().manual_seed(N + K)
    group = group or K
    if bits == 4:
        q = pack_int4(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8))
    else:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int16).to(torch.int8)
    s = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).half()
    m = (torch.randn(N, K // group, generator=g) * 0.01).half() if mins else None
    return QuantTensor(q, s, m, bits, group)


def seconds(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_isa(name: str, fn):
    """fn run on kernel path `name` (HEARTHLM_ISA), the choice restored after."""

    def run():
        import os

        old = os.environ.get("HEARTHLM_ISA")
        os.environ["HEARTHLM_ISA"] = name
        cpu.isa.cache_clear()
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("HEARTHLM_ISA")
            else:
                os.environ["HEARTHLM_ISA"] = old
            cpu.isa.cache_clear()

    return run


def cases(rows: int) -> dict[str, dict[str, callable]]:
    """format -> path -> a function that runs one prefill's products of that format (all four shapes)."""
    x = {K: torch.randn(rows, K, generator=torch.Generator().manual_seed(K)) for K in {k for _, k in SHAPES.values()}}
    out: dict[str, dict[str, callable]] = {}
    for label, (bits, group, mins) in FORMATS.items():
        weights = [quantized(N, K, bits, group, mins) for N, K in SHAPES.values()]

        def run(ws=weights, product=quant_linear):
            for w in ws:
                product(x[w.shape[1]], w)

        out[label] = {"tiles": lambda ws=weights: run(ws, float_tiles)}
        if cpu.gemm_available():
            out[label][f"{cpu.gemm_path()} gemm"] = run
    halves = [torch.randn(N, K, generator=torch.Generator().manual_seed(N)).bfloat16() for N, K in SHAPES.values()]
    out["bf16"] = {
        "tiles": lambda: [F.linear(x[w.shape[1]], w.float()) for w in halves],  # float32, converted per call
    }
    if cpu.half_gemm_available():  # float32 FMAs on panels converted as they are packed (AVX2 and wider)
        out["bf16"]["half_gemm"] = lambda: [cpu.half_gemm(x[w.shape[1]], w) for w in halves]

    def ours():  # float32 sums, x kept to 16 bits
        return [cpu.bf16_gemm(x[w.shape[1]], w) for w in halves]

    if cpu.amx_bf16():  # what prefill runs on the AMX path
        out["bf16"]["amx bf16"] = ours
    if with_isa("avx512", cpu.bf16_gemm_path)() == "avx512_bf16":  # ... and on the AVX-512 path
        out["bf16"]["avx512 bf16"] = with_isa("avx512", ours)
    if cpu.native_bf16():  # oneDNN's, for reference: rounds x and the output to bf16, so prefill does not use it
        out["bf16"]["onednn"] = lambda: [F.linear(x[w.shape[1]].bfloat16(), w).float() for w in halves]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512, help="prompt tokens (rows of x)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ops = 2 * args.rows * sum(N * K for N, K in SHAPES.values())
    flags = cpu.cpu_flags()
    print(f"kernel path {cpu.isa()}; CPU: {', '.join(sorted(f for f in flags if 'avx512' in f or 'amx' in f))}")
    print(f"threads {torch.get_num_threads()}; {args.rows} rows; shapes {SHAPES}")
    table = cases(args.rows)
    times: dict[tuple[str, str], list[float]] = {(f, p): [] for f, paths in table.items() for p in paths}
    with Progress() as progress:
        task = progress.add_task("prefill products", total=args.rounds * len(times))
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for key in order:
                times[key].append(seconds(table[key[0]][key[1]]))
                progress.advance(task)
    print(f"\n{'format':32} {'path':12} {'GOP/s':>8} {'vs tiles':>9}")
    for fmt, paths in table.items():
        base = statistics.median(times[(fmt, "tiles")])
        for path in paths:
            t = statistics.median(times[(fmt, path)])
            print(f"{fmt:32} {path:12} {ops / t / 1e9:8.0f} {base / t:8.2f}x")
    print(f"\n(one round: {Path(__file__).name} ran each format's four products once per path)")


if __name__ == "__main__":
    main()
