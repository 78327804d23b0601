"""Decode attention over a paged KV cache: hearthlm's kernel (kernels/gemv_cpu.cpp) against PyTorch's SDPA on the
same keys gathered into a dense float32 copy, at model-like shapes.

    python benchmarks/decode_attention.py [--dtype bf16] [--threads 2] [--repeat 200]

Each row: rows B, query heads Hq, KV heads Hkv, head size D, keys S per row. The kernel reads the cache in place
in its dtype; SDPA gets the gathered float32 copy (the gather not timed), so the ratio is the kernel's own speed,
not the cost of the copy it avoids. Best of three timings of --repeat calls each.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from hearthlm.kernels import cpu

SHAPES = [  # name, B, Hq, Hkv, D, S
    ("demo, 16 rows, sliding layer", 16, 4, 1, 64, 128),
    ("demo, 16 rows, full layer", 16, 4, 1, 128, 256),
    ("demo, 1 row, full layer", 1, 4, 1, 128, 256),
    ("Qwen2.5-0.5B, 1 row, 4k context", 1, 14, 2, 64, 4096),
    ("Qwen2.5-0.5B, 16 rows, 512 each", 16, 14, 2, 64, 512),
    ("Llama-3.2-1B, 1 row, 4k context", 1, 32, 8, 64, 4096),
    ("Gemma-4-E2B-like, 4 rows, 2k each", 4, 8, 1, 256, 2048),
]


def best(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - t) / repeat)
    return min(times)


def one(B: int, Hq: int, Hkv: int, D: int, S: int, dtype: torch.dtype, repeat: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    slots_total = B * S + 16
    q = torch.randn(B, Hq, D, generator=g)
    K, V = (torch.randn(Hkv, slots_total, D, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(slots_total, generator=g)[: B * S].view(B, S)
    scale = D**-0.5
    ours = best(lambda: cpu.paged_decode_attention(q, K, V, slots, None, scale), repeat)
    k, v = (t[:, slots].transpose(0, 1).float() for t in (K, V))  # [B, Hkv, S, D]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    theirs = best(lambda: sdpa(q[:, :, None], k, v, scale=scale, enable_gqa=True), repeat)
    return ours, theirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    threads = cpu.set_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    table = Table(title=f"paged decode attention, {args.dtype} cache, {threads} threads (us per call)")
    for col in ("shape", "B", "Hq", "Hkv", "D", "S", "hearthlm", "SDPA (dense fp32)", "SDPA / hearthlm"):
        table.add_column(col, justify="right")
    for name, *shape in track(SHAPES, description="shapes", console=Console(stderr=True)):
        ours, theirs = one(*shape, dtype, args.repeat)
        table.add_row(name, *map(str, shape), f"{ours * 1e6:.0f}", f"{theirs * 1e6:.0f}", f"{theirs / ours:.2f}x")
    (Console() if sys.stdout.isatty() else Console(width=140)).print(table)


if __name__ == "__main__":
    main()
