"""Where a prefill's time goes: the whole prompt's tokens/s, and the share of it spent in each weight shape's GEMM
(with that GEMM's GOP/s), the rest being attention, norms, activations and Python.

    python benchmarks/prefill_share.py MODEL [--prompt-len 512] [--rounds 3] [--llama-cpp]

MODEL: a checkpoint folder, GGUF file or store name, loaded as `hearth run` loads it. Each round runs one cold
prefill (prefix caching off) of the same random prompt after a warm-up one. The GEMMs are timed by wrapping the
kernels prefill calls (kernels/cpu.py: half_gemm, bf16_gemm, quant_gemm), so a path that runs PyTorch's own
matmul (float32 weights, HEARTHLM_ISA=torch) shows as "rest". With --llama-cpp (a GGUF MODEL, llama-cpp-python
installed), each round also runs llama.cpp's prefill of the same tokens on the same file, in a process of its own
started for that round, so the two engines alternate and neither shares a process with the other.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.progress import Progress

from hearthlm import LLM, SamplingParams
from hearthlm.kernels import cpu

KERNELS = ("half_gemm", "bf16_gemm", "quant_gemm")  # what prefill's linear layers call (layers/linear.py, quant/)

LLAMA_CPP = """
import os, sys, time, llama_cpp
ids = [int(t) for t in sys.argv[2].split(",")]
llm = llama_cpp.Llama(sys.argv[1], n_ctx=len(ids) + 64, n_batch=len(ids), n_threads=os.cpu_count(),
                      n_threads_batch=os.cpu_count(), verbose=False)
llm.eval(ids)  # warm-up, as ours gets one
llm.reset()
start = time.perf_counter()
llm.eval(ids)
print(time.perf_counter() - start)
"""


class Timed:
    """The prefill kernels wrapped: seconds, calls and operations per (kernel, weight shape)."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, tuple[int, ...]], list[float]] = defaultdict(lambda: [0.0, 0, 0])
        for name in KERNELS:
            if hasattr(cpu, name):
                setattr(cpu, name, self._wrap(name, getattr(cpu, name)))

    def _wrap(self, name: str, kernel):
        def timed(x, w, *rest, **options):
            start = time.perf_counter()
            y = kernel(x, w, *rest, **options)
            stat = self.stats[(name, tuple(y.shape[-1:]) + tuple(x.shape[-1:]))]
            stat[0] += time.perf_counter() - start
            stat[1] += 1
            stat[2] += 2 * x.numel() * y.shape[-1]
            return y

        return timed


def llama_cpp_seconds(path: str, ids: list[int]) -> float:
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP, path, ",".join(map(str, ids))], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp on the same GGUF file")
    args = ap.parse_args()
    if args.llama_cpp and not Path(args.model).is_file():
        ap.error("--llama-cpp runs llama.cpp on the same file: give a .gguf file as MODEL")
    if args.prompt_len < 1 or args.rounds < 1:
        ap.error("--prompt-len and --rounds must be at least 1")
    timed = Timed()
    llm = LLM(args.model)
    llm.engine(prefix_caching=False)  # every round's prefill must be cold
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(20000, llm.config.vocab_size), (args.prompt_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([ids], params)  # warm-up
    ours, theirs, inside = [], [], []
    with Progress() as progress:
        task = progress.add_task("prefill rounds", total=args.rounds)
        for r in range(args.rounds):
            if args.llama_cpp and r % 2:
                theirs.append(llama_cpp_seconds(args.model, ids))
            timed.stats.clear()
            start = time.perf_counter()
            llm.generate([ids], params)
            ours.append(time.perf_counter() - start)
            inside.append(dict(timed.stats))
            if args.llama_cpp and r % 2 == 0:
                theirs.append(llama_cpp_seconds(args.model, ids))
            progress.advance(task)
    report(args, ours, theirs, inside)


def report(args, ours: list[float], theirs: list[float], inside: list[dict]) -> None:
    n = args.prompt_len
    print(f"{args.model}: {n}-token prefill, {torch.get_num_threads()} threads, kernel path {cpu.isa()}")
    print("hearthlm tok/s by round: " + ", ".join(f"{n / s:.1f}" for s in ours))
    median = statistics.median(ours)
    if theirs:
        print("llama.cpp tok/s by round: " + ", ".join(f"{n / s:.1f}" for s in theirs))
        print(f"hearthlm / llama.cpp, medians: {statistics.median(theirs) / median:.2f}x")
    pick = min(range(len(ours)), key=lambda i: abs(ours[i] - median))  # the round nearest the median
    best, median = inside[pick], ours[pick]
    total = sum(stat[0] for stat in best.values())
    print(f"\nround {pick + 1} ({n / median:.1f} tok/s, {median:.2f} s): GEMMs {total:.2f} s ({total / median:.0%})")
    print(f"{'kernel':<12}{'N x K':>14}{'calls':>7}{'seconds':>9}{'GOP/s':>8}{'share':>7}")
    for (name, (N, K)), (seconds, calls, ops) in sorted(best.items(), key=lambda kv: -kv[1][0]):
        print(
            f"{name:<12}{f'{N} x {K}':>14}{calls:>7}{seconds:>9.3f}{ops / seconds / 1e9:>8.0f}{seconds / median:>7.0%}"
        )
    print(f"{'rest':<12}{'':>14}{'':>7}{median - total:>9.3f}{'':>8}{(median - total) / median:>7.0%}")


if __name__ == "__main__":
    main()
