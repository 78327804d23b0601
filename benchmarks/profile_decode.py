"""Where a decode step's time goes: Python functions (cProfile) and device ops (torch.profiler).

    python benchmarks/profile_decode.py MODEL [--device cuda] [--tokens 64] [--top 25]

MODEL: a checkpoint folder, GGUF file or store name. One greedy generation warms up, a second runs under
cProfile (the host: scheduling, sampling, Python around the kernels), a third under torch.profiler (the ops,
by self time on the device). On a GPU a decode step far below the memory roofline is usually host-bound, and
the first table shows what to cut."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from hearthlm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: HEARTHLM_DEVICE, else cpu)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per profiled run")
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = [[3 + i % 1000 for i in range(32)]]
    llm.generate(prompt, params)  # warm-up
    start = time.perf_counter()
    llm.generate(prompt, params)
    print(f"{args.tokens / (time.perf_counter() - start):.1f} tok/s including a 32-token prefill")
    profiler = cProfile.Profile()
    profiler.runcall(llm.generate, prompt, params)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if llm.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompt, params)
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))


if __name__ == "__main__":
    main()
