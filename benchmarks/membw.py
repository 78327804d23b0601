"""Main-memory bandwidth of this machine, as seen by torch on its default thread count.

Decode at batch 1 reads every weight once per token, so the read bandwidth measured here is the
ceiling ("roofline") that benchmarks/decode.py compares decode speeds against.

    python benchmarks/membw.py [--gib 1] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Bandwidth:
    """GB/s (10^9 bytes per second) of one access pattern over repeated passes."""

    best: float
    median: float
    samples: list[float]


def _timed_passes(fn, nbytes: int, reps: int) -> Bandwidth:
    fn()  # first pass faults the pages in and warms the thread pool: not a bandwidth figure
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return Bandwidth(max(rates), statistics.median(rates), rates)


def read(gib: float = 1.0, reps: int = 10) -> Bandwidth:
    """Read bandwidth: a sum over a float32 buffer far larger than any cache. Of torch's one-pass
    reads (sum, dot, matrix-vector) the sum is the fastest here, so it makes the highest ceiling."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    return _timed_passes(lambda: src.sum(), src.nbytes, reps)


def copy(gib: float = 1.0, reps: int = 10) -> Bandwidth:
    """Copy bandwidth: bytes read plus bytes written."""
    src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _timed_passes(lambda: dst.copy_(src), 2 * src.nbytes, reps)


def measure(gib: float = 1.0, reps: int = 10) -> dict[str, Bandwidth]:
    """Read and copy bandwidth, one buffer set at a time."""
    return {"read": read(gib, reps), "copy": copy(gib, reps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="buffer size in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=10, help="timed passes (default 10)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.gib} GiB buffer")
    for kind, bw in measure(args.gib, args.reps).items():
        print(f"{kind:5s} best {bw.best:6.1f} GB/s  median {bw.median:6.1f} GB/s")


if __name__ == "__main__":
    main()
