"""Routing-privacy figures for docs/privacy.md (issue 23): each attacker's accuracy with and without each
mitigation, each mitigation's decode cost, and router noise's privacy/quality curve.

    python benchmarks/privacy.py [--per-topic 15] [--pad-mb 19] [--parts audit,defaults,a3,noise,cost,io]

A1, A2 and A4 run on the demo MoE with its experts zero-padded to --pad-mb MB each (page-cache behaviour of a
real model), readable by every user (the A1 setting); `defaults` audits what `hearth run --expert-budget` does
unasked on that copy and on an owner-only copy (as `hearth pull` stores models), with and without the page cache
emptied before each request (--evict: memory pressure); `a3` runs A3 on the demo itself and on the padded copy
(a miss then costs what a real expert's does); the router-noise curve runs on the demo itself; the cost of each
switch is decode tokens/s at a 25% expert budget on the padded copy, page cache warm (the file fits in memory), each set in its own process,
interleaved over --rounds, the median of all runs; `io`: bytes a load and a run read from disk against what they
need (/proc/self/io), page cache off and on.
Results go to benchmarks/results/privacy-<time>.json and to the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from hearthlm import LLM, SamplingParams
from hearthlm.privacy import audit, pad_experts, report
from hearthlm.privacy.curve import noise_curve
from hearthlm.store import resolve

ROOT = Path(__file__).resolve().parents[1]
SETS = [None, "private_reads", "fixed_shape", "private_reads,fixed_shape"]
# --parts defaults: (checkpoint readable by: "shared" every user / "owner" its owner, mitigations, evict)
DEFAULT_ROWS = [
    ("shared", "defaults", False),
    ("owner", "defaults", False),
    ("owner", "defaults", True),
    ("owner", "defaults,fixed_shape", True),
    ("owner", "private_reads,fixed_shape", True),
]


# Switch sets timed by --parts cost: name -> (--private-reads, --fixed-shape, environment, which padded copy). Private
# reads use O_DIRECT where the file system takes it; "buffered" forces the older pread + page drop path for
# comparison. "defaults_*": `--private-reads auto`, the CLI's default, on the copy every user can read (auto turns
# private reads on) and on the owner-only one (auto keeps the page cache).
COST_SETS = {
    "none": ("off", False, {}, "shared"),
    "defaults_owner": ("auto", False, {}, "owner"),
    "defaults_shared": ("auto", False, {}, "shared"),
    "private_reads": ("on", False, {}, "shared"),
    "private_reads_buffered": ("on", False, {"HEARTHLM_NO_DIRECT": "1"}, "shared"),
    "fixed_shape": ("off", True, {}, "shared"),
    "private_reads+fixed_shape": ("on", True, {}, "shared"),
}


def decode_speed(model: Path, name: str, runs: int, tokens: int = 16) -> list[float]:
    """Decode tokens/s of one prompt at a 25% expert budget with the switch set `name` (COST_SETS), each of `runs`
    runs after a warm-up (which also caches the pages a page-cache run reads)."""
    from hearthlm.moe.options import PrivacyOptions

    reads, fixed, _, _ = COST_SETS[name]
    llm = LLM(model, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions(reads, fixed))
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate("And it came to pass", params)
    speeds = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate("And it came to pass", params)
        speeds.append(tokens / (time.perf_counter() - start))
    return speeds


def cost(models: dict[str, Path], names: list[str], rounds: int, runs: int) -> dict:
    """Each switch set in a process of its own (private reads empty the file's page cache, which would slow a
    page-cache run in the same process), the sets interleaved round by round so that the machine's load falls on
    all alike; `models`: the padded copies by COST_SETS' last field. -> per set the median tokens/s and every run,
    with the load average before and after."""
    import os
    import subprocess
    import sys

    out: dict = {"load_before": os.getloadavg(), "runs": {n: [] for n in names}}
    for _ in range(rounds):
        for name in names:
            env = os.environ | COST_SETS[name][2]
            model = models[COST_SETS[name][3]]
            cmd = [sys.executable, __file__, "--one-cost", name, "--runs", str(runs), "--model", str(model)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out["runs"][name] += json.loads(done.stdout.strip().splitlines()[-1])
    out["load_after"] = os.getloadavg()
    out["median"] = {n: statistics.median(v) for n, v in out["runs"].items()}
    return out


def io_read(model: Path, private: str, tokens: int = 4) -> dict:
    """What a load and a run really read from disk (/proc/self/io read_bytes, the file's pages dropped first)
    against what they need: the dense weights, and the experts the pool fetched (misses x expert bytes)."""

    from hearthlm.moe.options import PrivacyOptions
    from hearthlm.privacy import probe

    path = model / "model.safetensors"
    ranges = probe.expert_ranges(str(path))
    expert_bytes = sum(b - a for r in ranges.values() for a, b in r)
    probe.drop_path(path)
    before = _read_bytes()
    llm = LLM(model, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions(private))
    loaded = _read_bytes()
    llm.generate("And it came to pass", SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    ran = _read_bytes()
    stats = llm.moe_stats()
    return {"private_reads": private, "load_read": loaded - before, "load_needed": path.stat().st_size - expert_bytes,
            "run_read": ran - loaded, "run_needed": stats.bytes_fetched, "misses": stats.misses,
            "tokens": tokens}  # fmt: skip


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def random_moe(folder: Path) -> Path:
    """Two Gemma 4 layers with 26B-A4B's routing shape (hidden 2816, 128 experts, top-8) and random weights
    (transformers' initialisation), small experts (routing does not depend on their size), the demo's tokenizer."""
    import shutil

    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    if (folder / "config.json").exists():
        return folder
    demo = resolve("hearth-demo-moe")
    cfg = json.loads((demo / "config.json").read_text())
    cfg |= {"hidden_size": 2816, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 64,
            "intermediate_size": 256, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
            "per_layer_config": {}}  # fmt: skip
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo / name, folder / name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-topic", type=int, default=15)
    ap.add_argument("--pad-mb", type=float, default=19.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", default="audit,a3,noise,cost,io")
    ap.add_argument("--sets", default=",".join(COST_SETS), help="--parts cost: COST_SETS names (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="--parts cost: interleaved rounds of every set")
    ap.add_argument("--one-cost", default=None, help=argparse.SUPPRESS)  # a child of --parts cost
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_cost:
        print(json.dumps(decode_speed(Path(args.model), args.one_cost, args.runs)))
        return
    parts = set(args.parts.split(","))
    demo = resolve("hearth-demo-moe")
    padded = pad_experts(demo, Path("/var/tmp/hearthlm-privacy") / f"hearth-demo-moe-{args.pad_mb:g}mb", args.pad_mb)
    owner = pad_experts(demo, padded.with_name(padded.name + "-owner"), args.pad_mb, owner_only=True)
    out: dict = {"per_topic": args.per_topic, "pad_mb": args.pad_mb, "cpu": _cpu()}
    console = Console(width=200)
    results = []
    with Progress(console=console, transient=True) as progress:
        if "audit" in parts:
            for m in SETS:
                results += audit(padded, "25%", m, ("A1", "A2", "A4"), None, args.per_topic, 8, progress)
                _save(out | {"audit": report.rows(results)})
        if "defaults" in parts:  # what a user gets unasked, on a shared and on an owner-only (pulled) checkpoint
            for model, m, evict in DEFAULT_ROWS:
                path = owner if model == "owner" else padded
                rows = audit(path, "25%", m, ("A1", "A2", "A4"), None, args.per_topic, 8, progress, evict)
                results += [dataclasses.replace(r, mitigations=f"{model} file: {r.mitigations}") for r in rows]
                _save(out | {"audit": report.rows(results)})
        if "a3" in parts:
            for model, label in ((demo, "demo"), (padded, f"padded {args.pad_mb:g} MB")):
                for m in (None, "isolate", "fixed_shape"):
                    rows = audit(model, "25%", m, ("A3",), None, args.per_topic, 8, progress)
                    results += [dataclasses.replace(r, mitigations=f"{label}: {r.mitigations}") for r in rows]
                    _save(out | {"audit": report.rows(results)})
    if results:  # a run of other parts leaves the day's audit rows as they are
        out["audit"] = report.rows(results)
        console.print(report.table(results, "routing privacy (demo MoE, experts padded; A3 also unpadded)"))
    if "noise" in parts:
        text = (ROOT / "benchmarks/data/heldout.txt").read_text()
        points = noise_curve(LLM(demo), [0, 0.5, 1, 2, 4, 8], text, per_topic=args.per_topic * 2)
        out["noise"] = [
            {"scale": p.scale, "a4": p.score.accuracy, "ci95": list(p.score.ci), "n": p.score.n, "kl": p.kl,
             "top1": p.top1, "ppl": p.ppl, "ppl_clean": p.ppl_clean}
            for p in points
        ]  # fmt: skip
        for p in points:
            console.print(f"noise {p.scale:g}: A4 {p.score}; KL {p.kl:.3f}, top-1 {p.top1:.1%}, ppl {p.ppl:.1f}")
    if "random" in parts:
        from hearthlm.privacy import cross_validate, topics
        from hearthlm.privacy.curve import routing_rows

        _, prompts = topics.load(per_topic=args.per_topic * 2)
        llm = LLM(random_moe(Path("/var/tmp/hearthlm-privacy/random-26b-a4b-shape")))
        score = cross_validate(routing_rows(llm, prompts), [p.label for p in prompts])
        out["random_a4"] = {"accuracy": score.accuracy, "ci95": list(score.ci), "n": score.n}
        console.print(f"random 26B-A4B-shaped router, A4: {score}")
    if "cost" in parts:
        out["cost"] = cost({"shared": padded, "owner": owner}, args.sets.split(","), args.rounds, args.runs)
        console.print(out["cost"])
    if "io" in parts:
        out["io"] = [_child_io(padded, mode) for mode in ("off", "on")]
        console.print(out["io"])
    if "plot" in parts:  # from the day's results file: the audit rows and the cost medians
        stem = ROOT / "benchmarks/results" / f"privacy-{time.strftime('%Y%m%d')}"
        day = json.loads(stem.with_suffix(".json").read_text()) | out
        console.print(f"wrote {plot(day, stem.with_suffix('.png'))}")
    print(_save(out))


# audit rows (their mitigations label) -> the COST_SETS name that timed the same switches on the same copy
COST_OF = {"none": "none", "private_reads": "private_reads", "fixed_shape": "fixed_shape",
           "private_reads,fixed_shape": "private_reads+fixed_shape", "shared file: defaults": "defaults_shared",
           "owner file: defaults": "defaults_owner"}  # fmt: skip


def plot(out: dict, path: Path) -> Path:
    """Attacker accuracy (95% interval) against decode slowdown for each switch set, one panel per attacker
    that a switch acts on (A1, A2), chance dashed: benchmarks/results/privacy-<day>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = out["cost"]["median"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, attacker in zip(axes, ("A1", "A2")):
        for row in out["audit"]:
            name = COST_OF.get(row["mitigations"])
            if row["attacker"] != attacker or name not in speed:
                continue
            slowdown = 100 * (1 - speed[name] / speed["none"])
            lo, hi = row["ci95"]
            acc = row["accuracy"]
            ax.errorbar(slowdown, 100 * acc, yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], fmt="o", capsize=3)
            ax.annotate(row["mitigations"], (slowdown, 100 * acc), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)  # fmt: skip
        ax.axhline(100 * out["audit"][0]["chance"], ls="--", color="grey", label="chance")
        ax.set(
            title=f"{attacker}: {report.WHO[attacker]}", xlabel="decode slowdown at a 25% budget, % (page cache warm)"
        )
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("attacker accuracy, %")
    fig.suptitle("routing privacy on the padded demo MoE: what each switch costs and what it leaves the attacker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _child_io(model: Path, private: str) -> dict:
    """io_read in a fresh process: /proc/self/io counts the whole process."""
    import subprocess
    import sys

    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import privacy; "
    code += f"print(json.dumps(privacy.io_read(privacy.Path({str(model)!r}), {private!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _save(out: dict) -> Path:
    path = ROOT / "benchmarks/results" / f"privacy-{time.strftime('%Y%m%d')}.json"
    old = json.loads(path.read_text()) if path.exists() else {}  # runs of other --parts the same day stay
    path.write_text(json.dumps(old | out, indent=1) + "\n")
    return path


if __name__ == "__main__":
    main()
