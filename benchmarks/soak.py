"""A bounded soak of the HTTP server: many concurrent clients for a while, and nothing lost.

    python benchmarks/soak.py [--clients 64] [--minutes 10 | --seconds S] [--expert-budget 0.1] [--seed 0]
                              [--json PATH]

Starts a server in a child process on a free loopback port serving the store's demo models (the dense
hearth-demo, and hearth-demo-moe with --expert-budget, a share of its expert bytes, small enough that experts go
cold and are fetched as tokens need them), then runs C client tasks until the time is up. Each client picks at
random, per request:

- a streamed chat on the OpenAI, Ollama or Anthropic route (short replies, random sampling settings);
- the same, but it hangs up after the first few events (a client that goes away mid-stream);
- a completion whose prompt fills the context but for a few tokens (long prefill near the limit);
- a streamed chat to the MoE model under its expert budget;
- an invalid request (wrong role, n out of bounds, a lone surrogate, bad JSON, an unknown model, a rebinding
  Host header, a prompt past the context): it must get a 4xx.

The report (printed, and as JSON with --json; by default to benchmarks/results/soak-HOST-DATE.json): requests
served, outcomes by class (2xx, expected 4xx, unexpected 4xx, 5xx, error events inside a 200 stream, transport
errors), p50/p99 latency per time window, the server's RSS and open file descriptors over time (sampled from
/proc), and its KV blocks in use once the clients have stopped (must be 0). `invariants()` lists what must hold;
the CI test runs a 60-second version and checks them.

RSS: the KV pools are reserved at load but take memory only as blocks are first written, and the prefix cache
keeps freed blocks findable, so the engines write fresh blocks until a pool is used up: RSS climbs by the KV
cache's resident bytes (/metrics `hearth_kv_bytes_resident`) until it reaches the reserve. The report gives
RSS less those bytes; over the last half of a soak of FLAT_AFTER seconds or more, that must grow by no more
than FLAT_MB. A shorter soak is all warm-up (allocator arenas, oneDNN primitives, first shapes), so it reports
the figure without holding it to that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DENSE, MOE = "hearth-demo", "hearth-demo-moe"
CONTEXT = 2048  # the demo models' context
VOCAB = 4096
SAMPLE_EVERY = 2.0  # seconds between RSS / fd / KV samples
FLAT_AFTER = 300.0  # soaks at least this long must end flat: RSS less resident KV
FLAT_MB = 24.0  # how much that may grow over their last half (sampling noise and allocator slack)


# -- the server (child process) ---------------------------------------------------------------------------
def serve(port: int, expert_budget: str) -> None:
    """Serve the store's models on 127.0.0.1:port; the MoE demo under `expert_budget`. Runs until SIGTERM."""
    import uvicorn

    from hearthlm.server import load
    from hearthlm.server.app import create_app
    from hearthlm.server.registry import FOREVER, Models

    def loader(path, name):
        return load(str(path), name=name, expert_budget=expert_budget if name == MOE else None)

    app = create_app(Models(loader, budget=None, keep_alive=FOREVER))  # loaded all along: the end state is theirs
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()


# -- the clients ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    start: float  # seconds since the soak began
    latency: float
    result: str  # ok | expected_4xx | unexpected_4xx | 5xx | stream_error | transport | disconnected


@dataclass
class Report:
    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # {t, rss_mb, fds, kv_used}
    final: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)


def _messages(rng: random.Random) -> list[dict]:
    words = " ".join(rng.choice(["tell", "me", "about", "the", "sea", "a", "story", "why", "cats", "rain"])
                     for _ in range(rng.randint(3, 40)))  # fmt: skip
    return [{"role": "user", "content": words}]


def _valid(rng: random.Random, kind: str) -> tuple[str, dict]:
    tokens = rng.randint(1, 48)
    sampling = {"temperature": rng.choice([0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]), "seed": rng.randint(0, 99)}
    model = MOE if kind == "moe" else DENSE
    api = rng.choice(["openai", "ollama", "anthropic"]) if kind in ("chat", "disconnect") else "openai"
    if api == "ollama":
        options = {"num_predict": tokens, "temperature": sampling["temperature"], "seed": sampling["seed"]}
        return "/api/chat", {"model": model, "messages": _messages(rng), "stream": True, "options": options}
    if api == "anthropic":
        body = {"model": model, "messages": _messages(rng), "stream": True, "max_tokens": tokens}
        return "/v1/messages", {**body, "temperature": min(sampling["temperature"], 1.0)}
    return "/v1/chat/completions", {"model": model, "messages": _messages(rng), "stream": True,
                                    "max_tokens": tokens, **sampling}  # fmt: skip


def _long(rng: random.Random) -> tuple[str, dict]:
    """A prompt of token ids that fills the context but for a few tokens, and a reply that fits."""
    room = rng.randint(2, 8)
    prompt = [rng.randrange(10, VOCAB) for _ in range(CONTEXT - room)]
    return "/v1/completions", {"model": DENSE, "prompt": prompt, "max_tokens": room - 1, "stream": True}


def _invalid(rng: random.Random) -> tuple[str, bytes, dict]:
    """(path, raw body, headers) of a request that must be refused with a 4xx."""
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/chat/completions", {"model": DENSE, "messages": [{"role": "wizard", "content": "x"}]}),
        ("/v1/chat/completions", {"model": DENSE, "messages": user, "n": 0}),
        ("/api/generate", {"model": DENSE, "prompt": "hi", "options": {"num_ctx": -5}}),
        ("/v1/messages", {"model": DENSE, "messages": [], "max_tokens": 4}),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": user}),
        ("/v1/completions", {"model": DENSE, "prompt": [5] * (CONTEXT + 10)}),
    ]
    raw = [
        ("/v1/chat/completions", b'{"model": "hearth-demo", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/api/chat", b'{"model": "hearth-demo", "messages": [{"role": "user", "content": '),
        ("/v1/messages", b'{"model": "hearth-demo", "max_tokens": ' + b"9" * 5000 + b"}"),
    ]
    pick = rng.randrange(len(cases) + len(raw) + 1)
    if pick < len(cases):
        path, body = cases[pick]
        return path, json.dumps(body).encode(), {}
    if pick < len(cases) + len(raw):
        return *raw[pick - len(cases)], {}
    return "/v1/chat/completions", json.dumps({"model": DENSE, "messages": user}).encode(), {"Host": "evil.example"}


def _has_error(line: str) -> bool:
    """An error reported inside a 200 stream (SSE data or an NDJSON line)."""
    text = line.removeprefix("data: ").strip()
    if not text.startswith("{"):
        return False
    try:
        event = json.loads(text)
    except ValueError:
        return True  # a cut or garbled event
    return "error" in event and event.get("type") != "ping"


async def _one(client, url: str, rng: random.Random, t0: float) -> Outcome:
    kind = rng.choices(["chat", "disconnect", "long", "moe", "invalid"], weights=[40, 15, 8, 20, 17])[0]
    start = time.perf_counter()
    result = "ok"
    try:
        if kind == "invalid":
            path, raw, headers = _invalid(rng)
            r = await client.post(url + path, content=raw, headers=headers)
            result = (
                "expected_4xx" if 400 <= r.status_code < 500 else "5xx" if r.status_code >= 500 else "unexpected_2xx"
            )
        else:
            path, body = _long(rng) if kind == "long" else _valid(rng, kind)
            cut = rng.randint(1, 3) if kind == "disconnect" else None
            async with client.stream("POST", url + path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    result = "5xx" if r.status_code >= 500 else "unexpected_4xx"
                else:
                    seen = 0
                    async for line in r.aiter_lines():
                        if _has_error(line):
                            result = "stream_error"
                        seen += 1
                        if cut is not None and seen >= cut:
                            result = "disconnected"
                            break  # leaving the block closes the connection mid-stream
    except Exception as e:  # noqa: BLE001 (a soak counts every kind of failure)
        result = f"transport:{type(e).__name__}"
    return Outcome(kind, start - t0, time.perf_counter() - start, result)


async def _client(client, url: str, seed: int, t0: float, deadline: float, out: list[Outcome]) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        out.append(await _one(client, url, rng, t0))


# -- the server's state, from outside ---------------------------------------------------------------------
def _proc(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def _metrics(client, url: str) -> dict[str, float]:
    text = (await client.get(url + "/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def _sampler(client, url: str, pid: int, t0: float, deadline: float, samples: list[dict]) -> None:
    while time.perf_counter() < deadline:
        rss, fds = _proc(pid)
        m = await _metrics(client, url)
        kv_mb = m.get("hearth_kv_bytes_resident", 0) / 2**20
        samples.append({"t": round(time.perf_counter() - t0, 1), "rss_mb": round(rss, 1), "fds": fds,
                        "kv_used": m.get("hearth_kv_blocks_used", 0), "kv_resident_mb": round(kv_mb, 1),
                        "rss_less_kv_mb": round(rss - kv_mb, 1)})  # fmt: skip
        await asyncio.sleep(SAMPLE_EVERY)


async def _settle(client, url: str, pid: int, fds_before: int) -> dict:
    """Once the clients stop and hang up: wait until no request runs, no KV block is held (aborts land on the
    engines' next steps) and the clients' sockets are closed (up to a few beyond `fds_before`, the count before
    the soak), then the final state. The wait is bounded: a leak shows as the state it ends in."""
    deadline = time.perf_counter() + 120
    while True:
        m = await _metrics(client, url)
        busy = m.get("hearth_requests_running", 0) + m.get("hearth_requests_waiting", 0)
        rss, fds = _proc(pid)
        done = busy == 0 and m.get("hearth_kv_blocks_used", 0) == 0 and fds <= fds_before + 4
        if done or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.2)
    return {"rss_mb": round(rss, 1), "fds": fds, "kv_used": m.get("hearth_kv_blocks_used", 0),
            "running": busy, "alive": (await client.get(url + "/health")).status_code == 200,
            "moe": {k: v for k, v in m.items() if k.startswith("hearth_moe_")}}  # fmt: skip


async def soak(url: str, pid: int, clients: int, seconds: float, seed: int) -> Report:
    import httpx

    report = Report(clients, seconds)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for model in (DENSE, MOE):  # load both before the clock starts
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            (await client.post(url + "/v1/chat/completions", json=body)).raise_for_status()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        tasks = [_client(client, url, seed * 1000 + i, t0, deadline, report.outcomes) for i in range(clients)]
        await asyncio.gather(_sampler(client, url, pid, t0, deadline, report.samples), *tasks)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=1)) as client:
        # The clients' connections are closed now: what the server still holds is its own.
        report.final = await _settle(client, url, pid, report.samples[0]["fds"] if report.samples else 0)
    return report


# -- the report ------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(report: Report) -> dict:
    by_class: dict[str, int] = {}
    for o in report.outcomes:
        key = "transport" if o.result.startswith("transport") else o.result
        by_class[key] = by_class.get(key, 0) + 1
    by_kind: dict[str, int] = {}
    for o in report.outcomes:
        by_kind[o.kind] = by_kind.get(o.kind, 0) + 1
    width = max(report.seconds / 10, 6.0)
    windows = []
    for k in range(int(report.seconds // width) + 1):
        lat = [o.latency for o in report.outcomes if k * width <= o.start < (k + 1) * width and o.result == "ok"]
        if lat:
            windows.append({"from_s": round(k * width), "requests": len(lat), "p50_s": round(_pct(lat, 0.5), 3),
                            "p99_s": round(_pct(lat, 0.99), 3)})  # fmt: skip
    served = sum(1 for o in report.outcomes if o.result in ("ok", "disconnected"))
    return {
        "clients": report.clients, "seconds": report.seconds, "requests": len(report.outcomes), "served": served,
        "outcomes": by_class, "kinds": by_kind, "latency_windows": windows, "samples": report.samples,
        "final": report.final,
    }  # fmt: skip


def growth_at_end(s: dict) -> float | None:
    """MB by which RSS less the resident KV cache grew over the soak's last half (None: too few samples):
    the median of the last fifth of the samples against the median of the fifth before the half."""
    xs = [x["rss_less_kv_mb"] for x in s["samples"] if "rss_less_kv_mb" in x]
    if len(xs) < 10:
        return None
    fifth = len(xs) // 5
    mid = len(xs) // 2

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    return round(median(xs[-fifth:]) - median(xs[mid - fifth : mid]), 1)


def invariants(s: dict) -> list[str]:
    """What a soak must show; each broken one is a line."""
    bad = []
    outcomes = s["outcomes"]
    for cls in ("5xx", "unexpected_4xx", "unexpected_2xx", "stream_error", "transport"):
        if outcomes.get(cls):
            bad.append(f"{outcomes[cls]} requests ended as {cls}")
    if not s["served"]:
        bad.append("no request was served")
    for kind in ("chat", "disconnect", "long", "moe", "invalid"):
        if not s["kinds"].get(kind):
            bad.append(f"no {kind} request was made")
    final = s["final"]
    if final.get("kv_used") != 0 or final.get("running") != 0:
        bad.append(f"after the clients stopped: {final.get('kv_used')} KV blocks used, {final.get('running')} running")
    if not final.get("alive"):
        bad.append("the server did not answer /health at the end")
    if s["samples"] and final.get("fds", 0) > s["samples"][0]["fds"] + 16:
        bad.append(f"open file descriptors grew from {s['samples'][0]['fds']} to {final['fds']}")
    grew = growth_at_end(s)
    if s["seconds"] >= FLAT_AFTER and (grew is None or grew > FLAT_MB):
        bad.append(f"RSS less the resident KV cache grew {grew} MB over the last half (at most {FLAT_MB:.0f})")
    if not final.get("moe", {}).get("hearth_moe_expert_misses_total"):
        bad.append("the MoE model never fetched a cold expert (is its expert budget in effect?)")
    return bad


def _text(s: dict) -> str:
    lines = [f"soak: {s['clients']} clients, {s['seconds']:.0f} s: {s['requests']} requests, {s['served']} served",
             f"outcomes: {s['outcomes']}", f"kinds: {s['kinds']}", "latency of completed requests (s):"]  # fmt: skip
    lines += [f"  from {w['from_s']:>5} s: {w['requests']:>5} requests, p50 {w['p50_s']:.3f}, p99 {w['p99_s']:.3f}"
              for w in s["latency_windows"]]  # fmt: skip
    samples = s["samples"]
    if samples:
        picks = samples[:: max(1, len(samples) // 10)] + samples[-1:]
        lines.append("server (t: RSS = resident KV + the rest, fds, KV blocks used): " + ", ".join(
            f"{x['t']:.0f}s: {x['rss_mb']:.0f} = {x['kv_resident_mb']:.0f} + {x['rss_less_kv_mb']:.0f} MB, "
            f"{x['fds']} fd, {x['kv_used']:.0f} kv" for x in picks))  # fmt: skip
        lines.append(f"RSS less resident KV, growth over the last half: {growth_at_end(s)} MB")
    f = s["final"]
    misses = f.get("moe", {}).get("hearth_moe_expert_misses_total", 0)
    lines.append(f"end: RSS {f.get('rss_mb')} MB, {f.get('fds')} fds, KV blocks used {f.get('kv_used'):.0f}, "
                 f"running {f.get('running'):.0f}; MoE expert misses {misses:.0f}")  # fmt: skip
    bad = invariants(s)
    lines.append("invariants: " + ("all hold" if not bad else "BROKEN: " + "; ".join(bad)))
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(clients: int, seconds: float, expert_budget: str, seed: int) -> dict:
    """Start the server, soak it, stop it (SIGTERM: it must exit 0); the summary, with the server's exit code."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--expert-budget", expert_budget]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the soak server did not start: {proc.communicate()[1][-3000:]}")
            time.sleep(0.1)
        s = summary(asyncio.run(soak(url, proc.pid, clients, seconds, seed)))
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    err = proc.stderr.read()
    s["final"]["server_exit"] = code
    s["final"]["server_tracebacks"] = err.count("Traceback")
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    p.add_argument("--expert-budget", default="0.1", help="the MoE demo's expert budget (default 0.1 of its experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="where to write the JSON report (default benchmarks/results/)")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the child: serve on this port
    args = p.parse_args()
    if args.serve is not None:
        return serve(args.serve, args.expert_budget)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    s = run(args.clients, seconds, args.expert_budget, args.seed)
    s["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    s["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print(_text(s))
    host = platform.node().split(".")[0] or "host"
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results" / f"soak-{host}-{datetime.now():%Y%m%d-%H%M%S}.json")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s, indent=1) + "\n")
    print(f"report: {path}")
    bad = invariants(s) + ([f"the server exited {s['final']['server_exit']}"] if s["final"]["server_exit"] else [])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
