"""The kernels over a decode step's logits (kernels/logits_cpu.cpp) against PyTorch's ops, in one process: Gemma's
final soft cap, cap * tanh(x / cap) in place, and each row's argmax (the greedy token). Then the time to sample one
token (engine/sampler.py pick) with common settings.

    python benchmarks/logits.py [--rows 1,16] [--vocab 4096,262144] [--rounds 7] [--threads N]

Each round times both contenders once per shape, in alternating order; the figures are medians in microseconds and
the median per-round speed-up of the kernel, which a change in the machine's load disturbs less than separate runs.
4,096 is the demo's vocabulary, 262,144 Gemma 4's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.progress import track

from hearthlm import SamplingParams
from hearthlm.engine.sampler import pick
from hearthlm.kernels import cpu

CAP = 30.0  # Gemma's final_logit_softcapping
SAMPLING = {  # Gemma 4's generation_config, Ollama's defaults, top-p alone, temperature alone
    "top_k 64, top_p 0.95": SamplingParams(temperature=1.0, top_k=64, top_p=0.95),
    "top_k 40, top_p 0.9, min_p 0.05": SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
    "top_p 0.95": SamplingParams(temperature=0.7, top_p=0.95),
    "temperature 0.7": SamplingParams(temperature=0.7),
}


def torch_softcap(x: torch.Tensor) -> torch.Tensor:
    return x.div_(CAP).tanh_().mul_(CAP)


CONTENDERS = {
    "soft cap": (torch_softcap, lambda x: cpu.softcap_(x, CAP)),
    "argmax": (lambda x: x.argmax(-1), cpu.argmax_rows),
}


def seconds(fn, x: torch.Tensor) -> float:
    y = x.clone()  # the soft cap works in place: every call starts from the same logits
    t = time.perf_counter()
    fn(y)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16")
    p.add_argument("--vocab", default="4096,262144")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="default: hearthlm's (the physical cores)")
    args = p.parse_args()
    if args.threads:
        cpu.set_threads(args.threads)
    shapes = [(int(r), int(v)) for v in args.vocab.split(",") for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    logits = {s: torch.randn(s, generator=g) * 40 for s in shapes}
    times = {(op, s, who): [] for op in CONTENDERS for s in shapes for who in ("torch", "kernel")}
    for rnd in track(range(args.rounds), description="rounds"):
        for op, (ref, kernel) in CONTENDERS.items():
            for s in shapes:
                order = [("torch", ref), ("kernel", kernel)][:: 1 if rnd % 2 else -1]
                for who, fn in order:
                    fn(logits[s].clone())  # warm
                    times[op, s, who].append(seconds(fn, logits[s]))
    print(f"threads {torch.get_num_threads()}")
    for op in CONTENDERS:
        for s in shapes:
            ref, ker = times[op, s, "torch"], times[op, s, "kernel"]
            gain = statistics.median(r / k for r, k in zip(ref, ker))
            print(f"{op:8} [{s[0]:>2}, {s[1]:>6}]  PyTorch {statistics.median(ref) * 1e6:9.1f} us  "
                  f"kernel {statistics.median(ker) * 1e6:9.1f} us  {gain:5.2f}x")  # fmt: skip
    sample_times(sorted({v for _, v in shapes}), args.rounds)


def sample_times(vocabs: list[int], rounds: int) -> None:
    """Median time of one sampled token per setting, on logits of a language model's shape: a few likely tokens and a
    long tail (random normal logits times 8)."""
    g = torch.Generator().manual_seed(1)
    for V in vocabs:
        row = torch.randn(V, generator=g) * 8
        for name, p in SAMPLING.items():
            gen = p.generator()
            ts = [seconds(lambda x, p=p, gen=gen: pick(x, p, gen), row) for _ in range(rounds)]
            print(f"sample   [ 1, {V:>6}]  {name:32} {statistics.median(ts) * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
