"""Aggregate generation throughput of the engine with N concurrent requests (continuous batching).

    python benchmarks/engine.py [--model FOLDER] [--concurrency 1,4,16] [--prompt-len 128] [--new-tokens 32]
                                [--dtype bfloat16] [--block-size 16]

Every request gets its own random prompt (no prefix sharing) and greedy decoding with ignore_eos, and all
are added at once. Figures: generated tokens / wall time from the first step to the last (prefill included),
and the decode-only rate (tokens after each request's first / time after the last first token). The model
defaults to the 2-layer Qwen2.5-0.5B-shape checkpoint that benchmarks/decode.py writes (--layers 2), else the
demo model. Other processes on the machine change these figures: compare runs taken side by side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.engine.engine import Engine

QWEN_L2 = Path("/tmp/hearthlm-bench-checkpoints/qwen2.5-0.5b-L2-v2")


def measure(llm: LLM, n: int, prompt_len: int, new_tokens: int, block_size: int) -> dict[str, float]:
    engine = Engine(llm, max_running=max(n, 1), block_size=block_size)
    g = torch.Generator().manual_seed(n)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        prompt = torch.randint(10, llm.config.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{i}", prompt, params)
    start, first, tokens = time.perf_counter(), {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.token_ids)
            first.setdefault(out.request_id, time.perf_counter())
    end = time.perf_counter()
    last_first = max(first.values())
    return {
        "tok_s": tokens / (end - start),
        "decode_tok_s": (tokens - n) / (end - last_first) if end > last_first else float("nan"),
        "wall_s": end - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=QWEN_L2 if QWEN_L2.exists() else None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    print(f"model {llm.path} ({llm.config.num_layers} layers, {args.dtype}), threads {torch.get_num_threads()}")
    measure(llm, 1, 16, 4, args.block_size)  # warm-up: kernels, allocator
    for n in (int(x) for x in args.concurrency.split(",")):
        r = measure(llm, n, args.prompt_len, args.new_tokens, args.block_size)
        print(
            f"concurrency {n:3d}: {r['tok_s']:8.1f} tok/s aggregate (prefill included), "
            f"{r['decode_tok_s']:8.1f} tok/s decode-only, {r['wall_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
