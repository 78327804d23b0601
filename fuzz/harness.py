"""What every fuzz target shares: its command line, its seed corpus and atheris's settings.

A target module defines `test_one_input(data: bytes)` (which must only ever raise the reader's typed errors)
and `seeds()` (valid inputs to start from), and calls `main(test_one_input, seeds)`. Run one with a budget:

    python fuzz/gguf_reader.py --seconds 300      # or --runs 100000
    python fuzz/gguf_reader.py --seconds 60 --corpus fuzz/corpus/gguf_reader   # keep what it learns

An input that raises anything else, runs over 10 s or grows the process past 2 GB is a crash: atheris
prints it and writes it to crash-<hash> (under --artifacts), and the script exits non-zero. Each crash becomes
a case in tests/test_hostile_files.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    parser = argparse.ArgumentParser(description="Run one fuzz target within a budget.")
    parser.add_argument("--seconds", type=int, default=60, help="stop after this long (default 60)")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (default: no limit)")
    parser.add_argument("--corpus", type=Path, help="a folder to read and grow the corpus in (default: temporary)")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="where crash files go")
    args, rest = parser.parse_known_args()
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="hearthlm-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    options = [f"-max_total_time={args.seconds}", f"-runs={args.runs}", "-timeout=10", "-rss_limit_mb=2048",
               "-print_final_stats=1", f"-artifact_prefix={args.artifacts}/"]  # fmt: skip
    atheris.Setup([sys.argv[0], *options, *rest, str(corpus)], test_one_input)
    atheris.Fuzz()
