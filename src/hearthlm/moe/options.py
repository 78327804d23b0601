"""The routing-privacy switches of one loaded model (issue 23, docs/privacy.md), as one small options object:
`hearth run/chat/serve --private-reads auto|on|off --fixed-shape [--isolate-clients]` and `LLM(privacy=...)`.

They act on the expert pool, so they need an expert budget; `check` refuses them without one (a protection
that was asked for and silently does nothing is worse than an error). `apply` turns them on after the load and
returns the line the load message prints: which mode was chosen and why.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PrivacyOptions:
    """`private_reads`: "on" reads cold experts into private memory and keeps the file's pages out of the page
    cache (closes A1); "off" reads through the page cache; "auto": on when users other than the owner can reach
    the checkpoint's weight files, else off. `fixed_shape`: every MoE layer step reads the same number of
    experts (A2, A3). `isolate_clients`: the server never lets one client's requests share the expert pool with
    another's (A3; engine/scheduler.py)."""

    private_reads: str = "auto"
    fixed_shape: bool = False
    isolate_clients: bool = False

    def __post_init__(self):
        if self.private_reads not in MODES:
            raise ValueError(f"private_reads must be one of {', '.join(MODES)}, got {self.private_reads!r}")

    def asked(self) -> list[str]:
        """The switches set away from their defaults, as flags (for error messages)."""
        return [
            flag
            for flag, on in (
                (f"--private-reads {self.private_reads}", self.private_reads != "auto"),
                ("--fixed-shape", self.fixed_shape),
                ("--isolate-clients", self.isolate_clients),
            )
            if on
        ]


def check(options: PrivacyOptions | None, budget) -> None:
    """Refuse switches that have nothing to act on: without an expert budget there is no pool to read into."""
    if options is None or budget is not None or not options.asked():
        return
    raise ValueError(
        f"{', '.join(options.asked())}: the routing-privacy switches act on the expert pool, which exists only "
        "under an expert budget: add --expert-budget (e.g. 25%), or drop them"
    )


def weight_files(path: Path) -> list[Path]:
    """The files that hold a checkpoint's tensors: a .gguf file, or a folder's *.safetensors."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def readable_by_others(path: str | Path) -> bool:
    """Whether a user other than the owner can open the file: it has a group or other read bit and every folder
    above it a group or other search bit. Conservative (group and other are not told apart); root reads all."""
    path = Path(path).resolve()
    if not os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    return all(os.stat(d).st_mode & (stat.S_IXGRP | stat.S_IXOTH) for d in path.parents)


def choose(options: PrivacyOptions, path: Path, on_host: bool) -> tuple[bool, str]:
    """(private reads on?, why) for a model loaded from `path`; `on_host`: experts held in host memory (a GPU)."""
    if on_host:
        if options.private_reads == "on":
            raise ValueError(
                "--private-reads on: beside a GPU the experts are held in host memory and never read from the "
                "file after the load, so there is nothing to make private; drop the flag"
            )
        return False, "off (experts held in host memory beside the GPU; the file is not read after the load)"
    if options.private_reads != "auto":
        return options.private_reads == "on", f"{options.private_reads} (asked)"
    shared = [f.name for f in weight_files(path) if readable_by_others(f)]
    if shared:
        return True, f"on ({shared[0]} is readable by other users)"
    return False, "off (only its owner can read the checkpoint: misses are served from the page cache)"


def apply(model, options: PrivacyOptions, path: Path) -> str:
    """Turn the switches on for `model`'s expert pool; -> the line for the load message."""
    from . import private
    from .tier import HostTier

    pool = model.expert_pool
    on, why = choose(options, path, any(isinstance(t, HostTier) for t in pool.tiers.values()))
    if on:
        private.private_reads(pool)
    elif options.private_reads == "off" and any(readable_by_others(f) for f in weight_files(path)):
        warnings.warn(
            f"{path.name} is readable by other users and private reads are off: another process can tell which "
            "experts ran (and so something of what was asked) from the page cache; use --private-reads auto, or "
            f"chmod -R go-rwx {path}",
            stacklevel=2,
        )
    if options.fixed_shape:
        private.fixed_shape(pool)
    parts = [f"private reads {why}"] + ["fixed-shape fetching"] * options.fixed_shape
    parts += ["clients isolated"] * options.isolate_clients
    return "routing privacy: " + ", ".join(parts)
