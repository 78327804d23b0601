"""The audit's results as a table for people (rich) or rows for machines (JSON)."""

from __future__ import annotations

from rich.table import Table

from .audit import Result

WHO = {
    "A1": "same machine, reads the model file (page cache)",
    "A2": "same machine, no file access (/proc I/O, CPU time)",
    "A3": "another API client (its own latencies)",
    "A4": "sees routing (per-token expert ids)",
}


def table(results: list[Result], title: str) -> Table:
    t = Table(title=title)
    for name in ("mitigations", "attacker", "who", "accuracy", "95% CI", "chance", "n", "verdict"):
        t.add_column(name, justify="right" if name in ("accuracy", "95% CI", "chance", "n") else "left")
    for r in results:
        s, (lo, hi) = r.score, r.score.ci
        verdict = "at chance" if s.at_chance else ("above chance" if lo > s.chance else "below chance")
        t.add_row(
            r.mitigations, r.attacker, WHO[r.attacker], f"{s.accuracy:.0%}", f"{lo:.0%}-{hi:.0%}",
            f"{s.chance:.0%}", str(s.n), verdict,
        )  # fmt: skip
    return t


def rows(results: list[Result]) -> list[dict]:
    return [
        {
            "mitigations": r.mitigations, "attacker": r.attacker, "accuracy": r.score.accuracy,
            "ci95": list(r.score.ci), "chance": r.score.chance, "correct": r.score.correct, "n": r.score.n,
        }
        for r in results
    ]  # fmt: skip
