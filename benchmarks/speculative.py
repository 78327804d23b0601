"""Speculative decoding on the demo model: decode tok/s with and without drafting, at batch 1 and with 4 concurrent
requests, with the acceptance rate and the mean accepted length per verify step.

    python benchmarks/speculative.py [--task quote|heldout] [--model FOLDER] [--new-tokens 128] [--runs 3]

Tasks (greedy, ignore_eos, on text the demo never trained on):
- heldout (the demo's MTP drafter, hearth-demo-assistant): the openings of held-out documents of the demo's three
  sources (benchmarks/data/demo_heldout.jsonl, written by `training/train_drafter.py prompts`; `--source` keeps
  one), continued by the model; drafting by the model's -assistant drafter (`--draft`, default auto) and, for
  comparison, by prompt lookup;
- quote (benchmarks/data/heldout.txt): a passage, then the passage again cut after its first words: the model is
  to copy the rest, which is what prompt lookup drafts (on the demo model the reply mostly loops instead; the
  loops are drafted too);
- worst: the same prompts with a drafter whose every token is wrong (the plain reply's token + 1), so every draft
  is rejected: the cost of verification, with the adaptive pause (as shipped) and without it (raw cost).
Decode tok/s: tokens after each request's first / time after the last request's first token (prefill left out);
speedup: the median over runs of each run's rate / drafting off's in the same run. Acceptance: accepted / drafted
tokens; mean accepted: accepted tokens per verify step (each step also emits one token of the model's own).
Every configuration runs on one prompt group right after the others (so a change in the machine's load hits
them alike), each run starting the round at another configuration (so that none always runs first), and the
figures are medians over runs; other work on the machine moves them, so compare figures
of one run only. A results file (JSON) records the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hearthlm import LLM, SamplingParams
from hearthlm.engine.mtp import MTPDrafter
from hearthlm.engine.speculative import Adaptive, make_drafter

DATA = Path(__file__).resolve().parent / "data" / "heldout.txt"
HELDOUT = Path(__file__).resolve().parent / "data" / "demo_heldout.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
NO_PAUSE = Adaptive(row_cost=0.0, try_cost=0.0)  # never stops drafting: the raw cost of verification
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def passages(n: int, min_chars: int = 300) -> list[str]:
    """n passages of consecutive non-empty lines, each at least min_chars long."""
    out, block = [], []
    for line in DATA.read_text().splitlines():
        if line.strip():
            block.append(line.strip())
        if sum(len(b) for b in block) >= min_chars:
            out.append("\n".join(block))
            block = []
    return out[:n]


def quote_prompt(passage: str) -> str:
    head = " ".join(passage.split()[:8])
    return f"{passage}\n\nThe same passage, word for word:\n{head}"


def heldout_prompts(n: int, source: str | None) -> list[str]:
    """The first n held-out document openings (sources interleaved), of one source if `source`."""
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    return [r["prompt"] for r in rows if source in (None, r["source"])][:n]


class Contrary:
    """A drafter that is always wrong: it proposes the plain greedy reply's next tokens, each plus one."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], vocab: int):
        self.replies, self.vocab = replies, vocab

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            reply, at = self.replies[tuple(seq.prompt)], len(seq.output)
            out.append([((reply[i] if i < len(reply) else 0) + 1) % self.vocab for i in range(at, at + k)])
        return out


class Oracle:
    """A drafter that is always right: it proposes the plain greedy reply's next tokens. With `cost`, a model
    drafter, it first runs that drafter's propose and throws its drafts away: the speedup a drafter of that cost
    would give if every one of its tokens were accepted."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], cost=None):
        self.replies, self.cost = replies, cost
        self.reads_hidden = cost is not None

    def bind(self, cache) -> Oracle:
        return Oracle(self.replies, self.cost.bind(cache) if self.cost is not None else None)

    def propose(self, seqs, ks):
        if self.cost is not None:
            self.cost.propose(seqs, ks)
        out = []
        for seq, k in zip(seqs, ks):
            reply, at = self.replies[tuple(seq.prompt)], len(seq.output)
            out.append(reply[at : at + k])
        return out


@dataclass
class Run:
    decode_tok_s: float
    tokens: dict[str, list[int]]
    drafted: int
    accepted: int
    steps: int


def measure(llm: LLM, prompts: list[list[int]], new_tokens: int, draft, adaptive: Adaptive | None) -> Run:
    """All of `prompts` at once through a fresh engine; decode-only rate."""
    engine = llm.engine(draft=draft, adaptive=adaptive)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.token_ids:
                first.setdefault(out.request_id, clock())
    end = clock()
    decoded = sum(len(t) for t in tokens.values()) - len(prompts)
    s = engine.stats()
    return Run(decoded / (end - max(first.values())), tokens, s.drafted_tokens, s.accepted_tokens, s.draft_steps)


def combine(runs: list[Run]) -> Run:
    """Runs of several prompt groups as one: the rate over all of their decode time."""
    decoded = [sum(len(t) - 1 for t in r.tokens.values()) for r in runs]
    seconds = sum(d / r.decode_tok_s for d, r in zip(decoded, runs))
    tokens = {f"{j}-{k}": v for j, r in enumerate(runs) for k, v in r.tokens.items()}
    return Run(
        sum(decoded) / seconds, tokens, sum(r.drafted for r in runs), sum(r.accepted for r in runs),
        sum(r.steps for r in runs),
    )  # fmt: skip


def heldout_configs(llm: LLM, prompts: list[list[int]], new_tokens: int, draft: str) -> dict[str, tuple]:
    """name -> (drafter, adaptive policy) for the held-out task: the model drafter (loaded once), prompt lookup,
    and two bounds: an always-right drafter that costs nothing, and one that costs what the model drafter does."""
    drafter = make_drafter(draft, llm)
    if not isinstance(drafter, MTPDrafter):
        raise SystemExit(f"--draft {draft}: no MTP drafter for {llm.path} (train one: training/train_drafter.py)")
    plain = measure(llm, prompts, new_tokens, None, None)
    replies = {tuple(p): plain.tokens[f"r{i}"] for i, p in enumerate(prompts)}
    return {
        "off": (None, None),
        "heldout: mtp": (drafter, None),
        "heldout: lookup": ("lookup", None),
        "bound: always right, free": (Oracle(replies), None),
        "bound: always right, mtp's cost": (Oracle(replies, drafter), None),
    }


def configs(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict[str, tuple]:
    """name -> (drafter, adaptive policy); the worst-case drafter needs the plain replies first."""
    plain = measure(llm, prompts, new_tokens, None, None)
    replies = {tuple(p): plain.tokens[f"r{i}"] for i, p in enumerate(prompts)}
    wrong = Contrary(replies, llm.config.vocab_size)
    return {
        "off": (None, None),
        "quote: lookup": ("lookup", None),
        "worst: adaptive": (wrong, None),
        "worst: no pause": (wrong, NO_PAUSE),
    }


def summarize(name: str, batch: int, runs: list[Run], base: list[Run]) -> dict:
    rate = statistics.median(r.decode_tok_s for r in runs)
    speedup = statistics.median(r.decode_tok_s / b.decode_tok_s for r, b in zip(runs, base))  # paired by run
    last = runs[-1]
    return {
        "config": name,
        "batch": batch,
        "decode_tok_s": round(rate, 1),
        "speedup": round(speedup, 3),
        "acceptance": round(last.accepted / last.drafted, 3) if last.drafted else None,
        "mean_accepted": round(last.accepted / last.steps, 2) if last.steps else None,
        "verify_steps": last.steps,
        "same_tokens": all(r.tokens == base[0].tokens for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--task", choices=["quote", "heldout"], default="quote")
    ap.add_argument("--draft", default="auto", help="heldout: the model drafter (default: the model's -assistant)")
    ap.add_argument("--source", choices=["kjv", "fortunes", "pydocs"], default=None, help="heldout: one source only")
    ap.add_argument(
        "--clock", choices=list(CLOCKS), default="wall",
        help="cpu: time by this process's CPU time, which other work on the machine disturbs less (use it with "
        "HEARTHLM_THREADS=1: one thread's CPU time is its run time on a quiet core)",
    )  # fmt: skip
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    llm = LLM(args.model, dtype=args.dtype)
    if args.task == "heldout":
        prompts = [llm.tokenizer.encode(p) for p in heldout_prompts(args.prompts, args.source)]
        table = heldout_configs(llm, prompts, args.new_tokens, args.draft)
    else:
        prompts = [llm.tokenizer.encode(quote_prompt(p)) for p in passages(args.prompts)]
    measure(llm, prompts[:1], 8, "lookup", None)  # warm-up
    if args.task == "quote":
        table = configs(llm, prompts, args.new_tokens)
    runs: dict[tuple[str, int], list[Run]] = {(c, b): [] for c in table for b in (1, 4)}
    groups = {b: [prompts[i : i + b] for i in range(0, len(prompts), b)] for b in (1, 4)}
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("speculative", total=args.runs * len(table) * sum(len(g) for g in groups.values()))
        for r in range(args.runs):
            order = list(table)[r % len(table) :] + list(table)[: r % len(table)]  # each run starts elsewhere
            for batch, parts in groups.items():
                done: dict[str, list[Run]] = {c: [] for c in table}
                for part in parts:  # every configuration on one prompt group, back to back: load drifts less
                    for name in order:
                        done[name].append(measure(llm, part, args.new_tokens, *table[name]))
                        bar.advance(task)
                for name, parts_done in done.items():
                    runs[(name, batch)].append(combine(parts_done))
    rows = [summarize(c, b, r, runs[("off", b)]) for (c, b), r in runs.items()]
    report(rows, args, llm)


def report(rows: list[dict], args: argparse.Namespace, llm: LLM) -> None:
    task = (
        args.task + (f" ({args.source})" if args.source else "") + (", CPU-time clock" if args.clock == "cpu" else "")
    )
    t = Table(title=f"speculative decoding, {llm.path.name} ({args.dtype}), {task}, {args.new_tokens} new tokens")
    for col in ("config", "batch", "decode tok/s", "speedup", "acceptance", "mean accepted", "verify steps", "same"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    Console().print(t)
    RESULTS.mkdir(exist_ok=True)
    name = f"speculative-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "load_average": os.getloadavg()}  # fmt: skip
    record = {"command": " ".join(sys.argv), "machine": machine, "model": str(llm.path), "rows": rows}
    (RESULTS / name).write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {RESULTS / name}")


if __name__ == "__main__":
    main()
