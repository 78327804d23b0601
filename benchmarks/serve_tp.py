"""`hearth serve --tp`: what mirroring rank 0's engine to the other ranks costs on this machine.

    python benchmarks/serve_tp.py [--model hearth-demo] [--requests 4] [--tokens 32]

1. The message. Rank 0 broadcasts one Forward per forward (hearthlm/distributed/follow.py): the median time of
   that broadcast (broadcast_object_list on a gloo group, 2 ranks on loopback) for a decode step of 1 and of 8 rows
   at a context of 512, and for a prefill chunk of 512 tokens, with its pickled size; and, for scale, one
   all-reduce of a hidden vector (the forward itself makes two per layer).
2. Serving. `hearth serve MODEL --dtype float32` as one process and with `--tp 2`: generated tokens/s as an HTTP
   client sees them, for one stream and for `--requests` streams at once (greedy, ignore_eos).

The load average is printed with the figures: on a shared 2-core machine it moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROUNDS = 200


def _forward(rows: int, T: int, context: int):
    from hearthlm.distributed.follow import Forward

    starts = [context - T] * rows
    positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]
    tables = [{None: list(range(r * 64, r * 64 + context // 16)), 512: list(range(40))} for r in range(rows)]
    ids = torch.randint(0, 32000, (rows, T))
    return Forward([], positions, starts, tables, None, ids, 1, True)


def message_part() -> None:
    """A rank's part of the message timing; rank 0 prints JSON."""
    from hearthlm.distributed import mesh as meshes
    from hearthlm.distributed.follow import Channel

    mesh = meshes.init()
    channel = Channel()
    out = {}
    for name, (rows, T) in {"decode 1 row": (1, 1), "decode 8 rows": (8, 1), "prefill 512": (1, 512)}.items():
        message = _forward(rows, T, 512)
        times = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            channel.send(message) if mesh.first else channel.receive()
            times.append(time.perf_counter() - t0)
        out[name] = {"us": statistics.median(times) * 1e6, "bytes": len(pickle.dumps(message))}
    hidden = torch.zeros(1, 1, 256)  # for scale: one all-reduce of a hidden vector, as the forward makes two per layer
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        mesh.all_reduce(hidden)
        times.append(time.perf_counter() - t0)
    out["all_reduce 256 floats"] = {"us": statistics.median(times) * 1e6, "bytes": 1024}
    if mesh.first:
        print(json.dumps(out))
    meshes.close()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(url: str, model: str, tokens: int) -> int:
    import httpx

    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    return r.json()["usage"]["completion_tokens"]


def serving(model: str, tp: int, requests: int, tokens: int) -> dict[str, float]:
    """Start `hearth serve` (tp ranks), time one stream then `requests` at once; tokens/s of each."""
    import httpx

    port = _port()
    cmd = [sys.executable, "-m", "hearthlm.cli", "serve", model, "--port", str(port), "--dtype", "float32"]
    proc = subprocess.Popen(
        cmd + (["--tp", str(tp)] if tp > 1 else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        _generate(url, model, 4)  # warm up
        t0 = time.perf_counter()
        one = _generate(url, model, tokens)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            many = sum(pool.map(lambda _: _generate(url, model, tokens), range(requests)))
        t2 = time.perf_counter()
        return {"ranks": tp, "one_stream_tps": one / (t1 - t0), f"{requests}_streams_tps": many / (t2 - t1)}
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hearth-demo")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--message", action="store_true", help=argparse.SUPPRESS)  # a rank's part
    args = p.parse_args()
    if args.message:
        return message_part()
    from hearthlm.distributed.run import launch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    launch(2, [sys.executable, __file__, "--message"])
    for tp in (1, 2, 1, 2):  # alternating: the machine's load drifts
        print(json.dumps(serving(args.model, tp, args.requests, args.tokens)), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
