"""The soak (benchmarks/soak.py) for 60 seconds: concurrent streaming clients on every API, clients that hang up,
prompts at the context limit, an MoE model under an expert budget, invalid requests. Its invariants must hold: no
5xx, no unexpected status, no error inside a stream, no transport error, nothing running and no KV block held
once the clients stop, file descriptors flat, the server alive and then exiting 0 on SIGTERM. No timing is
asserted: latency and memory over time are reported, not judged."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SOAK = Path(__file__).parent.parent / "benchmarks" / "soak.py"


def test_soak_keeps_its_invariants(capsys):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up
    spec.loader.exec_module(soak)
    seconds = float(os.environ.get("HEARTHLM_SOAK_SECONDS", "60"))
    s = soak.run(clients=16, seconds=seconds, expert_budget="0.1", seed=22)
    with capsys.disabled():
        print("\n" + soak._text(s))
    assert soak.invariants(s) == []
    assert s["final"]["server_exit"] == 0 and s["final"]["server_tracebacks"] == 0
    assert s["outcomes"].get("disconnected") and s["outcomes"].get("expected_4xx")
