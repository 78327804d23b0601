"""The routing-privacy audit: labelled prompts through the model, each attacker's observation of every request,
and a cross-validated classifier per attacker that tries to name the prompt's topic from it.

A1, A2 and A4 watch a victim process (victim.py) that answers each prompt with a fresh load, as one
`hearth run --expert-budget` per prompt would: A1 from its own process (probe.py), A2 from /proc, A4 from the
routing the victim records. A3 is another client of one long-lived model (a server): after each victim request
it sends one fixed probe prompt per topic and times them; the pool they share is the channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import observers, probe, topics
from .classify import Score, cross_validate
from .observers import Worker

ATTACKERS = ("A1", "A2", "A3", "A4")
MITIGATIONS = ("defaults", "private_reads", "fixed_shape", "isolate", "noise")


@dataclass
class Observations:
    """Per attacker, one feature row per request; labels shared."""

    labels: list[int] = field(default_factory=list)
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, attacker: str, row: np.ndarray) -> None:
        self.rows.setdefault(attacker, []).append(np.asarray(row, dtype=np.float64))

    def score(self, attacker: str, folds: int = 5) -> Score:
        return cross_validate(np.stack(self.rows[attacker]), np.array(self.labels), k=folds)


def parse_mitigations(spec: str | None) -> dict:
    """'private_reads,fixed_shape,noise=2' -> {"private_reads": True, "fixed_shape": True, "noise": 2.0}.
    "defaults": what `hearth run --expert-budget` does unasked (`--private-reads auto`: private reads only where
    another user can read the checkpoint)."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, value = item.partition("=")
        name = name.replace("-", "_")
        if name not in MITIGATIONS:
            raise ValueError(f"unknown mitigation '{name}': choose from {', '.join(MITIGATIONS)} (noise=SCALE)")
        if name == "noise" and not value:
            raise ValueError("noise needs a scale in router-logit units: noise=1.0")
        out[name] = float(value) if name == "noise" else True
    return out


def observe_processes(
    model: Path,
    prompts: list[topics.Prompt],
    budget: str | None,
    mitigations: dict,
    max_tokens: int,
    attackers: set[str],
    tick: Callable[[], None] = lambda: None,
    evict: bool = False,
) -> Observations:
    """A1, A2 and A4 on one victim process per audit, one fresh load per prompt. `evict`: the file's pages leave
    the page cache before each request whether or not A1 can drop them (see `audit`)."""
    obs = Observations()
    victim = Worker("hearthlm.privacy.victim", str(model))
    prober = None
    if "A1" in attackers:
        prober = Worker("hearthlm.privacy.probe", str(model / "model.safetensors"), True, probe.__file__)
    request = {"max_tokens": max_tokens, "chat": True, "budget": budget, "mitigations": mitigations}
    try:
        for p in prompts:
            if prober is not None:
                prober.ask({"op": "drop"})
            if evict:  # the auditor's own access, standing in for memory pressure
                probe.drop_path(model / "model.safetensors")
            before, start = observers.proc_counters(victim.pid), time.perf_counter()
            reply = victim.ask({**request, "prompt": p.text})
            seconds = time.perf_counter() - start
            after = observers.proc_counters(victim.pid)
            if prober is not None:
                obs.add("A1", observers.a1_features(prober.ask({"op": "probe"})))
            obs.add("A2", observers.a2_features(before, after, seconds))
            obs.add("A4", observers.a4_features(reply["routing"]))
            obs.labels.append(p.label)
            tick()
    finally:
        victim.close()
        if prober is not None:
            prober.close()
    return obs


def observe_client(
    model: Path,
    prompts: list[topics.Prompt],
    probes: list[str],
    budget: str | None,
    mitigations: dict,
    max_tokens: int,
    tick: Callable[[], None] = lambda: None,
) -> Observations:
    """A3: the victim's request, then the attacker's probe requests on the same model, timed."""
    from ..api import LLM, SamplingParams
    from ..moe import private
    from .victim import apply, privacy_options

    llm = LLM(model, expert_budget=budget, moe_profile=False, privacy=privacy_options(mitigations))
    noise = apply(llm, mitigations)
    victim = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0)
    obs = Observations()
    for text in probes:  # warm-up: the kernels and the page cache, as a running server's
        llm.chat([{"role": "user", "content": text}], one)
    for p in prompts:
        llm.chat([{"role": "user", "content": p.text}], victim)
        if mitigations.get("isolate"):
            private.clear(llm.model.expert_pool)  # the next client starts from an empty pool
        latencies = []
        for text in probes:
            start = time.perf_counter()
            llm.chat([{"role": "user", "content": text}], one)
            latencies.append(time.perf_counter() - start)
        obs.add("A3", observers.a3_features(latencies))
        obs.labels.append(p.label)
        tick()
    if noise is not None:
        noise.close()
    return obs


@dataclass
class Result:
    mitigations: str
    attacker: str
    score: Score


def audit(
    model: str | Path | None = "hearth-demo-moe",
    budget: str | None = "25%",
    mitigations: str | None = None,
    attackers: tuple[str, ...] = ATTACKERS,
    topic_file: str | Path | None = None,
    per_topic: int | None = None,
    max_tokens: int = 8,
    progress=None,
    evict: bool = False,
) -> list[Result]:
    """Run the audit on `model` with one set of mitigations ('private_reads,fixed_shape', 'noise=2', ...) and
    return each attacker's held-out accuracy. `progress`: a rich Progress to report on.

    `evict`: before each request the checkpoint's pages leave the page cache even where A1 cannot drop them (an
    owner-only file): what memory pressure does to a file larger than the free memory, or what an attacker who
    fills memory could force. The auditor drops them itself; the row is labelled "+evict"."""
    from ..store import resolve

    path = resolve(model)
    wanted = set(attackers) - set(ATTACKERS)
    if wanted:
        raise ValueError(f"unknown attacker(s) {sorted(wanted)}: choose from {', '.join(ATTACKERS)}")
    if "A1" in attackers and not (path / "model.safetensors").exists():
        raise ValueError(f"{path}: A1 probes a single model.safetensors file; audit it with --attackers A2,A3,A4")
    switches = parse_mitigations(mitigations)
    names, prompts = topics.load(topic_file, per_topic)
    probes = [next(p.text for p in prompts if p.label == c) for c in range(len(names))]
    label = (mitigations or "none") + " +evict" * evict
    task = progress.add_task(f"audit ({label})", total=len(prompts) * (1 + ("A3" in attackers))) if progress else None
    tick = (lambda: progress.advance(task)) if progress else (lambda: None)
    results = []
    if {"A1", "A2", "A4"} & set(attackers):
        obs = observe_processes(path, prompts, budget, switches, max_tokens, set(attackers), tick, evict)
        results += [Result(label, a, obs.score(a)) for a in ("A1", "A2", "A4") if a in attackers]
    if "A3" in attackers:
        obs = observe_client(path, prompts, probes, budget, switches, max_tokens, tick)
        results.append(Result(label, "A3", obs.score("A3")))
    return sorted(results, key=lambda r: r.attacker)
