"""Speed of the quantized-weight GEMV (kernels/quant_cpu.cpp) at decode shapes, against the bf16 GEMV.

Decode at batch 1 reads every weight once per token, so the figure that matters is how fast a kernel streams
its weights: GB/s of weight bytes (integers + scales + mins) read per call, to compare with the machine's read
bandwidth (benchmarks/membw.py). Every call reads a different copy of the weights, enough copies to overflow
the last-level cache several times, so the figures are for weights coming from DRAM as they do in decode (a
model's layers do not fit in cache), not for a matrix the cache keeps warm.

    python benchmarks/quant_gemv.py [--rows 1] [--calls 200] [--shapes gate_up,down] [--formats Q6_K,Q5_K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hearthlm.kernels import cpu
from hearthlm.quant.tensor import pack_high, pack_int4

# Qwen2.5-0.5B: (N, K) of the fused q/k/v, o, fused gate/up, down projections and the LM head.
SHAPES = {
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (151936, 896),
}
# (label, bits, group or None for one per row, with mins)
FORMATS = [
    ("int4 g32 sym", 4, 32, False),
    ("int4 g32 mins", 4, 32, True),
    ("int8 per-row", 8, None, False),
    ("int8 g32", 8, 32, False),
    # GGUF's Q6_K and Q5_K: as int8 (how they loaded before the 6- and 5-bit layouts) and at their own width
    ("Q6_K as int8", 8, 16, False),
    ("Q6_K 6-bit", 6, 16, False),
    ("Q5_K as int8", 8, 32, True),
    ("Q5_K 5-bit", 5, 32, True),
]
STREAM_BYTES = 256 << 20  # weights cycled through per measurement: several times a 32 MB L3


def _quant_parts(N: int, K: int, bits: int, group: int, mins: bool, g: torch.Generator):
    if bits == 4:
        q = pack_int4(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8))
    elif bits < 8:
        q = pack_high(torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8), bits)
    else:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = (torch.rand(N, K // group, generator=g) * 0.01).half()
    m = (torch.randn(N, K // group, generator=g) * 0.01).half() if mins else None
    return q, s, m


def _copies(nbytes: int) -> int:
    return max(1, -(-STREAM_BYTES // nbytes))


def weight_copies(N: int, K: int, bits: int, group: int, mins: bool, g: torch.Generator) -> tuple[list, int]:
    """Enough copies of one random quantized weight's parts to overflow the last-level cache (see _copies), and
    the bytes of one copy."""
    first = _quant_parts(N, K, bits, group, mins, g)
    nbytes = sum(t.numel() * t.element_size() for t in first if t is not None)
    copies = [tuple(t.clone() if t is not None else None for t in first) for _ in range(_copies(nbytes) - 1)]
    return [first, *copies], nbytes


def _time_calls(fns: list, calls: int) -> float:
    """Median seconds per call, each call on the next weight copy, after a warm-up pass over all copies."""
    for f in fns:
        f()
    times = []
    for i in range(calls):
        f = fns[i % len(fns)]
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch; default 1)")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per case (default 200)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    ap.add_argument("--formats", default="", help="only the formats whose label contains one of these (comma list)")
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit("the quantized CPU kernels are unavailable here (see kernels/cpu.py)")
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M = {args.rows}, load average {load:.2f}")
    print(f"{'shape':9s} {'N x K':>13s}  {'format':14s} {'MB':>7s} {'us/call':>9s} {'GB/s':>6s}")
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        x = torch.randn(args.rows, K, generator=g)
        cases = []
        for label, bits, group, mins in FORMATS:
            if args.formats and not any(f in label for f in args.formats.split(",")):
                continue
            group = group or K
            parts, nbytes = weight_copies(N, K, bits, group, mins, g)
            fns = [lambda p=p, b=bits, gr=group, x=x: cpu.quant_gemv(x, *p, b, gr) for p in parts]
            cases.append((label, nbytes, fns))
        if cpu.available():
            w = torch.randn(N, K, generator=g).bfloat16()
            ws = [w] + [w.clone() for _ in range(_copies(w.nbytes) - 1)]
            cases.append(("bf16 gemv", w.nbytes, [lambda w=w, x=x: cpu.gemv(x, w) for w in ws]))
        for label, nbytes, fns in cases:
            sec = _time_calls(fns, args.calls)
            print(
                f"{name:9s} {f'{N}x{K}':>13s}  {label:14s} {nbytes / 1e6:7.2f} {sec * 1e6:9.1f} {nbytes / sec / 1e9:6.1f}"
            )
            del fns
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
