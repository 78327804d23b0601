"""The worst case of speculative decoding counted step by step: every draft rejected (benchmarks/speculative.py's
always-wrong drafter), each engine step timed by this process's CPU time and sorted by whether it verified a draft.
The cost of drafting is then (verify steps x their extra time over a plain step) / decode time, a figure that the
end-to-end timings of speculative.py, whose run-to-run noise is about 5% here, cannot resolve.

    HEARTHLM_THREADS=1 python benchmarks/spec_steps.py [--prompts 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import resource

from speculative import Contrary, measure, passages, quote_prompt

from hearthlm import LLM, SamplingParams


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def steps(llm: LLM, prompts: list[list[int]], new_tokens: int, batch: int, draft) -> dict[str, list[float]]:
    """CPU seconds of every decode step, by kind ("plain" / "verify"), over groups of `batch` prompts."""
    out: dict[str, list[float]] = {"plain": [], "verify": []}
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for g in range(0, len(prompts), batch):
        engine = llm.engine(draft=draft)
        for i, p in enumerate(prompts[g : g + batch]):
            engine.add_request(f"r{i}", p, params)
        while engine.scheduler.waiting or any(s.pending > 1 for s in engine.scheduler.running):
            engine.step()  # the prompts: not decode
        while engine.has_unfinished():
            before, start = engine.stats().draft_steps, cpu_seconds()
            engine.step()
            out["verify" if engine.stats().draft_steps > before else "plain"].append(cpu_seconds() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    llm = LLM(None, dtype="bfloat16")
    prompts = [llm.tokenizer.encode(quote_prompt(p)) for p in passages(args.prompts)]
    plain = measure(llm, prompts, args.new_tokens, None, None)
    wrong = Contrary({tuple(p): plain.tokens[f"r{i}"] for i, p in enumerate(prompts)}, llm.config.vocab_size)
    for batch in (1, 4):
        off = steps(llm, prompts, args.new_tokens, batch, None)["plain"]
        on = steps(llm, prompts, args.new_tokens, batch, wrong)
        base = sum(off) / len(off)
        extra = sum(t - base for t in on["verify"])
        print(
            f"batch {batch}: plain step {1e3 * base:.3f} ms; {len(on['verify'])} verify steps of "
            f"{1e3 * sum(on['verify']) / max(1, len(on['verify'])):.3f} ms among {len(on['plain']) + len(on['verify'])}"
            f" steps; verification costs {extra / sum(off):+.1%} of the decode time"
        )


if __name__ == "__main__":
    main()
