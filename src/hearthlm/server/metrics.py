"""Prometheus metrics of the server, written in the text exposition format by hand.

Why not prometheus_client: a dozen series need ~80 lines, and its process-global registry would leak between
the servers that tests start in one process; tests check the output with prometheus_client's own parser."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: str = "") -> list[str]:
        """`labels`: the series' own labels, `key="value",...`, written before `le` as prometheus_client does."""
        out, total, sep = [], 0, "," if labels else ""
        for le, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        own = f"{{{labels}}}" if labels else ""
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}', f"{name}_sum{own} {self.sum}",
                f"{name}_count{own} {self.count}"]  # fmt: skip
        return out


def label(value: str) -> str:
    """A label value escaped as the text format wants it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class ModelCounts:
    """The request, token and latency counters of one model."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    engine_requests: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))


# (name, help, the ModelCounts field) of the per-model counters
_COUNTERS = [
    ("hearth_prompt_tokens_total", "Prompt tokens of finished requests.", "prompt_tokens"),
    ("hearth_generation_tokens_total", "Generated tokens.", "generated_tokens"),
    ("hearth_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.", "cached_tokens"),
    ("hearth_engine_requests_total", "Engine requests started (one per choice).", "engine_requests"),
]
_HISTOGRAMS = [
    ("hearth_time_to_first_token_seconds", "Time from request to first token.", "ttft"),
    ("hearth_time_per_output_token_seconds", "Time between output tokens.", "tpot"),
]


class Metrics:
    """Counters updated by the server as requests run, each labelled with the model it ran on (`model`; "" for
    an HTTP request that named no model); render() adds the engine's gauges, summed over the loaded models, at
    scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int, str]] = Counter()  # (route, status, model)
        self.models: dict[str, ModelCounts] = {}

    def _of(self, model: str) -> ModelCounts:
        return self.models.setdefault(model, ModelCounts())

    def request(self, route: str, status: int, model: str = "") -> None:
        with self._lock:
            self.requests[(route, status, model)] += 1

    def started(self, model: str) -> None:
        with self._lock:
            self._of(model).engine_requests += 1

    def observe_tokens(self, stream, now: float, n: int) -> None:
        """`n` tokens of `stream` arrived at `now` (perf_counter seconds)."""
        with self._lock:
            counts = self._of(stream.model.name)
            if stream.t_first is None:
                stream.t_first = now
                counts.ttft.observe(now - stream.t_start)
                n -= 1
            elif n:
                counts.tpot.observe((now - stream.t_last) / n, n)
            stream.t_last = now

    def finished(self, stream) -> None:
        with self._lock:
            counts = self._of(stream.model.name)
            counts.prompt_tokens += stream.prompt_tokens
            counts.generated_tokens += stream.completion_tokens
            counts.cached_tokens += stream.cached_tokens

    def _model_series(self, series) -> None:
        reqs = [
            f'hearth_requests_total{{route="{r}",status="{s}",model="{label(m)}"}} {n}'
            for (r, s, m), n in sorted(self.requests.items())
        ]
        series("hearth_requests_total", "counter", "HTTP requests by route, status and model.", reqs)
        models = sorted(self.models.items())
        for name, help_, attr in _COUNTERS:
            series(name, "counter", help_, [f'{name}{{model="{label(m)}"}} {getattr(c, attr)}' for m, c in models])
        for name, help_, attr in _HISTOGRAMS:
            lines = [line for m, c in models for line in getattr(c, attr).lines(name, f'model="{label(m)}"')]
            series(name, "histogram", help_, lines)

    def render(self, stats: Any | None, moe: Any | None = None) -> str:
        """`stats`: the engine's; `moe`: the expert pool's MoEStats under an expert budget (aggregate counters:
        never which experts ran, which would tell what users asked)."""
        out: list[str] = []

        def series(name: str, kind: str, help_: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines])

        with self._lock:
            self._model_series(series)
        if stats is not None:
            gauges = {
                "hearth_requests_waiting": ("Requests queued in the engine.", stats.waiting),
                "hearth_requests_running": ("Requests being decoded.", stats.running),
                "hearth_kv_blocks_used": ("KV cache blocks in use.", stats.kv_blocks_used),
                "hearth_kv_blocks_total": ("KV cache blocks in all.", stats.kv_blocks_total),
                "hearth_kv_bytes_reserved": (
                    "KV cache size in bytes; a block takes memory only once it is first written.",
                    getattr(stats, "kv_bytes_reserved", 0),
                ),
                "hearth_kv_bytes_resident": (
                    "KV cache bytes written at least once: what the cache adds to resident memory.",
                    getattr(stats, "kv_bytes_resident", 0),
                ),
            }
            for name, (help_, value) in gauges.items():
                series(name, "gauge", help_, [f"{name} {value}"])
            series(
                "hearth_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens the engine found cached.",
                [f"hearth_prefix_cache_hit_tokens_total {stats.prefix_hit_tokens}"],
            )
            series(
                "hearth_preemptions_total",
                "counter",
                "Requests preempted for KV space.",
                [f"hearth_preemptions_total {stats.preemptions}"],
            )
            for name, kind, help_, value in _draft_series(stats):
                series(name, kind, help_, [f"{name} {value}"])
        if moe is not None:
            for name, kind, help_, value in _moe_series(moe):
                series(name, kind, help_, [f"{name} {value}"])
        return "\n".join(out) + "\n"


def _draft_series(s: Any) -> list[tuple[str, str, str, float]]:
    """Speculative decoding's totals (engine/speculative.py); an engine without them reports zeros."""
    drafted, accepted = getattr(s, "drafted_tokens", 0), getattr(s, "accepted_tokens", 0)
    rate = accepted / drafted if drafted else 0.0
    return [
        ("hearth_draft_tokens_total", "counter", "Draft tokens verified (speculative decoding).", drafted),
        ("hearth_draft_accepted_tokens_total", "counter", "Draft tokens the model accepted.", accepted),
        ("hearth_draft_steps_total", "counter", "Verify steps (one per request and step with a draft).",
         getattr(s, "draft_steps", 0)),
        ("hearth_draft_acceptance_rate", "gauge", "Accepted / verified draft tokens since start.", rate),
    ]  # fmt: skip


def _moe_series(s: Any) -> list[tuple[str, str, str, float]]:
    return [
        ("hearth_moe_expert_hits_total", "counter", "Expert uses served from a slot.", s.hits),
        ("hearth_moe_expert_misses_total", "counter", "Expert uses read from the slow tier.", s.misses),
        ("hearth_moe_expert_unslotted_total", "counter", "Misses run from the slow tier without a slot.", s.transient),
        ("hearth_moe_fetched_bytes_total", "counter", "Bytes read from the slow tier.", s.bytes_fetched),
        ("hearth_moe_fetch_seconds_total", "counter", "Time decoding waited on expert fetches.", s.fetch_seconds),
        ("hearth_moe_prefetches_total", "counter", "Experts fetched ahead of their layer.", s.prefetches),
        ("hearth_moe_prefetches_used_total", "counter", "Prefetched experts that their layer used.", s.prefetch_used),
        ("hearth_moe_prefetched_bytes_total", "counter", "Bytes read by prefetches.", s.prefetch_bytes),
        ("hearth_moe_tokens_total", "counter", "Token positions through the MoE layers.", s.tokens),
        ("hearth_moe_expert_slots", "gauge", "Experts the pool holds.", s.slots),
    ]
