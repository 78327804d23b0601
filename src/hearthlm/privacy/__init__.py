"""Routing privacy (issue 23): what an MoE model's expert use gives away, measured per attacker model, and the
switches that close each channel (they live where they act: moe/private.py, moe/noise.py).

    from hearthlm.privacy import audit
    for r in audit("hearth-demo-moe", budget="25%", mitigations="private_reads"):
        print(r.attacker, r.score)

Attackers: A1 same machine, can read the model file (page-cache residency, probed by timing reads from its own
process); A2 same machine, cannot read it (/proc I/O counters and CPU time); A3 another API client (its own
requests' latencies); A4 whoever sees the routing (per-token expert ids: the upper bound).
"""

from .audit import ATTACKERS, MITIGATIONS, Result, audit, parse_mitigations
from .classify import Score, cross_validate, wilson
from .padded import pad_experts

__all__ = [
    "ATTACKERS", "MITIGATIONS", "Result", "Score", "audit", "cross_validate", "pad_experts", "parse_mitigations",
    "wilson",
]  # fmt: skip
