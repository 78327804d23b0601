"""Time of one engine step at several batch sizes: the per-step cost the serving engine pays, without HTTP.

    python benchmarks/step_time.py [--model hearth-demo] [--quant int8] [--threads 2] [--batches 1,4,16] [--tokens 128]

For each batch size B: an Engine with B greedy requests of a 20-token prompt and --tokens tokens each; after two
warm-up steps, the wall time and the calling thread's CPU time per step until all finish. At --threads 1 that CPU
time is the whole step's and the steadier figure on a shared machine; wall time is what a client sees. Run it beside `python -c "while True: pass"` to see
what a busy core does to the step (docs/cpu-kernels.md, "Threads").
"""

from __future__ import annotations

import argparse
import time

import hearthlm  # before torch: hearthlm sets libgomp's spin count (docs/cpu-kernels.md)
from hearthlm import SamplingParams
from hearthlm.engine.engine import Engine
from hearthlm.kernels.cpu import set_threads


def step_times(llm: hearthlm.LLM, batch: int, tokens: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per decode step of `batch` requests."""
    engine = Engine(llm)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", list(range(5 + i, 25 + i)), params)
    engine.step()
    engine.step()
    steps, wall, cpu = 0, time.perf_counter(), time.thread_time()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - wall) / steps * 1e3, (time.thread_time() - cpu) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hearth-demo")
    p.add_argument("--threads", default=None, help="default: the physical cores")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--quant", default=None, help="quantize at load: int8 or int4 (default: as the model is)")
    args = p.parse_args()
    threads = set_threads(args.threads)
    llm = hearthlm.LLM(args.model, quant=args.quant)
    for batch in (int(b) for b in args.batches.split(",")):
        wall, cpu = step_times(llm, batch, args.tokens)
        print(f"threads {threads} B={batch}: {wall:.2f} ms/step wall, {cpu:.2f} ms CPU, {batch / wall * 1e3:.0f} tok/s")


if __name__ == "__main__":
    main()
