"""Serving throughput and latency of `hearth serve` under 1 to 64 concurrent streaming clients.

    python benchmarks/serve.py [--model MODEL] [--levels 1,4,16,32,64] [--requests 4] [--max-tokens 256]
                               [--rounds 1] [--prompt-words 24] [--burst 32x96]
                               [--server-args "--max-running 16"] [--port PORT] [--json]

Starts `hearth serve MODEL` (the demo model by default) as a subprocess on a free loopback port, so that the
clients in this process do not share its interpreter lock, then runs each level: C clients each send
--requests streamed /v1/completions requests back to back (greedy, ignore_eos, seeded prompts of
--prompt-words words, logprobs=0 so each event says how many tokens it carries). Figures per level:

- output tok/s: all tokens generated at that level / the level's wall time;
- time to first token p50 / p99 / max: request sent -> first token event;
- inter-token latency p50 / p99: the gap between token events divided by the tokens the later one carries;
- and the throughput ratio of each level to the smallest (target >= 4x at 16 clients against 1).

The clients are aiohttp's, the client most serving benchmarks use: on a 2-core machine the clients share the
cores with the server, and httpx's streaming reader cost about 4x aiohttp's CPU per event here, which the
server's figures then paid for.

--rounds R runs the whole list of levels R times, one after another, and reports each level's median tok/s
and the ratios of those medians (and the ratio of every round): on a shared VM a level's throughput moves by
20-30% from minute to minute, so a level measured once, minutes apart from the one it is compared with, can
say little about their ratio.

Then the burst (--burst CxN, 0 to skip): C requests of N tokens sent at once, one per client; its slowest
first token shows whether every request is admitted while the others generate.

The machine's other load is not controlled: run it on a quiet machine. A JSON record (machine, command,
figures) goes to benchmarks/results/serve-HOST-DATE.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORDS = "and the lord said unto moses for it came to pass python module function class return value in of".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, extra: list[str], console: Console) -> subprocess.Popen:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "hearthlm.cli", "serve", *([model] if model else []), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd + ["--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    with console.status(f"starting {' '.join(cmd[2:])}"):
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start within 10 minutes")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "logprobs": 0,
    }  # fmt: skip
    t0 = time.perf_counter()
    first, last, tokens, gaps = None, None, 0, []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:500]}")
        async for line in r.content:  # one SSE line at a time
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            n = sum(len((c.get("logprobs") or {}).get("tokens", [])) for c in event["choices"])
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps += [(now - last) / n] * n
            last, tokens = now, tokens + n
    if first is None:
        raise RuntimeError("a request ended without a token")
    return {"ttft": first - t0, "gaps": gaps, "tokens": tokens}


async def run_level(
    url: str, model: str, clients: int, per_client: int, max_tokens: int, args, rng: random.Random, advance
) -> dict:
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(clients * per_client)]
    connector = aiohttp.TCPConnector(limit=clients + 4)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(k: int) -> list[dict]:
            out = []
            for j in range(per_client):
                out.append(await one_request(session, url, model, prompts[k * per_client + j], max_tokens))
                advance()
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(k) for k in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "clients": clients, "requests": len(results), "max_tokens": max_tokens, "tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall, "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "ttft_max_ms": max(ttft) * 1e3, "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
    }  # fmt: skip


def machine() -> dict:
    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ),
        platform.processor(),
    )
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def positive(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number, 1 or more")
    return n


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="what `hearth serve` takes (default: the demo model)")
    p.add_argument("--levels", default="1,4,16,32,64", help="concurrent clients per level (default 1,4,16,32,64)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (default 4)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request (default 256)")
    p.add_argument("--rounds", type=positive, default=1, help="run the levels this many times, in turn (default 1)")
    p.add_argument("--prompt-words", type=int, default=24, help="words per prompt (default 24)")
    p.add_argument("--burst", default="32x96", help="CxN: C requests of N tokens at once, after the levels (0: none)")
    p.add_argument("--server-args", default="", help="extra `hearth serve` options, e.g. '--max-running 16'")
    p.add_argument("--port", type=int, default=None, help="default: a free one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    burst = None if args.burst in ("", "0") else tuple(int(x) for x in args.burst.lower().split("x"))
    console = Console(stderr=True)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    started = datetime.now()
    proc = start_server(args.model, port, shlex.split(args.server_args), console)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        rows, burst_row = measure(url, model, levels, burst, args, console)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    record = {
        "command": shlex.join([sys.executable, *sys.argv]), "started": started.isoformat(timespec="seconds"),
        "machine": machine(), "commit": commit(), "model": model, "max_tokens": args.max_tokens,
        "server_args": args.server_args, "rounds": args.rounds, "levels": rows, **ratios(rows, levels),
        "burst": burst_row,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-{socket.gethostname()}-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return
    show(record, model, args, out)


def measure(url: str, model: str, levels: list[int], burst, args, console: Console) -> tuple[list[dict], dict | None]:
    """Every level, --rounds times in turn (rows carry their round), then the burst."""
    asyncio.run(run_level(url, model, 1, 1, 16, args, random.Random(-1), lambda: None))  # warm-up
    rng, rows, burst_row = random.Random(args.seed), [], None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    total = sum(levels) * args.requests * args.rounds + (burst[0] if burst else 0)
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("requests", total=total)
        for k in range(args.rounds):
            for c in levels:
                what = f"{c} client{'s' * (c > 1)}" + (f", round {k + 1}/{args.rounds}" if args.rounds > 1 else "")
                progress.update(task, description=what)
                level = run_level(
                    url, model, c, args.requests, args.max_tokens, args, rng, lambda: progress.advance(task)
                )
                rows.append({"round": k + 1, **asyncio.run(level)})
        if burst:
            progress.update(task, description=f"burst {burst[0]}x{burst[1]}")
            burst_row = asyncio.run(
                run_level(url, model, burst[0], 1, burst[1], args, rng, lambda: progress.advance(task))
            )
    return rows, burst_row


def ratios(rows: list[dict], levels: list[int]) -> dict:
    """Each level's median tok/s over the rounds; the ratio of those medians to the smallest level's; and the
    ratio within every round (levels measured minutes apart, side by side)."""
    base = min(levels)
    median = {c: statistics.median(r["tok_s"] for r in rows if r["clients"] == c) for c in levels}
    out = {"median_tok_s": {str(c): v for c, v in median.items()}}
    for c in levels:
        if c == base:
            continue
        out[f"ratio_{c}_vs_{base}"] = median[c] / median[base]
        per_round = {r["round"]: r["tok_s"] for r in rows if r["clients"] == c}
        out[f"ratio_{c}_vs_{base}_rounds"] = [
            per_round[r["round"]] / r["tok_s"] for r in rows if r["clients"] == base and r["round"] in per_round
        ]
    return out


def show(record: dict, model: str, args, out: Path) -> None:
    table = Table(title=f"hearth serve {model} {args.server_args}: streamed requests")
    columns = ("round", "clients", "requests", "tokens each", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
               "TTFT max ms", "ITL p50 ms", "ITL p99 ms")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    rows = record["levels"] + ([record["burst"]] if record["burst"] else [])
    for r in rows:
        table.add_row(
            str(r.get("round", "")), str(r["clients"]) + (" (burst)" if r is record["burst"] else ""),
            str(r["requests"]), str(r["max_tokens"]), f"{r['tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p99_ms']:.0f}", f"{r['ttft_max_ms']:.0f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}",
        )  # fmt: skip
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    medians = ", ".join(f"{c}: {v:.1f}" for c, v in record["median_tok_s"].items())
    console.print(f"median output tok/s by clients ({record['rounds']} round{'s' * (record['rounds'] > 1)}): {medians}")
    for key, value in record.items():
        if key.startswith("ratio_") and not key.endswith("_rounds"):
            each = ", ".join(f"{x:.2f}x" for x in record[key + "_rounds"])
            name = key[6:].replace("_vs_", " vs ")
            console.print(f"throughput {name}: {value:.2f}x (median of rounds), each round: {each}")
    console.print(f"target: >= 4x at 16 clients vs 1; wrote {out}")


def commit() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    main()
