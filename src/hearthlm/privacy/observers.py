"""What each attacker observes, as it would obtain it, turned into a feature vector per request.

- A1 (same machine, can read the model file): probe.py's timings of reads inside each expert's byte ranges,
  run in its own process (as `nobody` when the audit runs as root).
- A2 (same machine, cannot read the file): the victim's aggregate counters in /proc/<pid>/io (bytes read
  from disk, bytes and read calls through the syscalls) and its CPU time (/proc/<pid>/stat), before and after
  the request, plus the request's wall time. /proc/<pid>/io is readable by the same user or root; an
  unprivileged stranger sees less (system-wide /proc/diskstats), so this is A2 at its strongest.
- A3 (another API client): the latencies of its own requests, sent right after the victim's (audit.py).
- A4 (sees routing): the per-layer counts of the experts the request's tokens were routed to.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


class Worker:
    """A child process that answers JSON lines (probe.py, victim.py). `as_nobody`: run `script` (stdlib only) as
    user nobody when we are root, with a Python that nobody may execute (a virtualenv under /root is not)."""

    def __init__(self, module: str, arg: str, as_nobody: bool = False, script: str | None = None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        user = _nobody() if as_nobody else None
        python = _python_for(user) if user is not None else None
        self._copy: str | None = None
        if python is None:
            user, command = None, [sys.executable, "-m", module, arg]
        else:  # nobody may not reach the installed file (a checkout under a 0700 folder): a readable copy of it
            self._copy = tempfile.mkdtemp(prefix="hearth-worker-")
            os.chmod(self._copy, 0o755)
            copy = shutil.copy(script, self._copy)
            os.chmod(copy, 0o644)
            command = [python, copy, arg]
        self.as_nobody = user is not None
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            user=user,
            group=user and pwd.getpwuid(user).pw_gid,
            cwd="/",
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.proc.args[-2]} process ended (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self._copy is not None:
            shutil.rmtree(self._copy, ignore_errors=True)


def _python_for(uid: int) -> str | None:
    """A Python interpreter that user `uid` may run, or None."""
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        try:
            if python and subprocess.run([python, "-c", ""], user=uid, cwd="/", capture_output=True).returncode == 0:
                return python
        except PermissionError:  # nobody may not even open it
            continue
    return None


def _nobody() -> int | None:
    """nobody's uid when we are root (A1 and its peers then hold no privilege over the victim), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


def proc_counters(pid: int) -> np.ndarray:
    """[read_bytes, rchar, syscr, cpu ticks] of a process: what A2 reads."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return np.array([int(io["read_bytes"]), int(io["rchar"]), int(io["syscr"]), int(stat[11]) + int(stat[12])])


def a1_features(reply: dict) -> np.ndarray:
    """Per expert, the median log10 read time of its probed pages (cached ~3, from disk ~4.7). A prober that
    may not read the file ({"denied": ...}) observed nothing: one constant feature."""
    if "denied" in reply:
        return np.zeros(1)
    return np.array([np.median(np.log10(np.maximum(1, t))) if t else 0.0 for t in reply["ns"]])


def a2_features(before: np.ndarray, after: np.ndarray, seconds: float) -> np.ndarray:
    d = (after - before).astype(np.float64)
    return np.array([np.log1p(d[0]), np.log1p(d[1]), np.log1p(d[2]), d[3], seconds])


def a4_features(routing: list[list[int]]) -> np.ndarray:
    """Each layer's expert counts as shares of its routings."""
    r = np.asarray(routing, dtype=np.float64)
    return (r / np.maximum(1, r.sum(1, keepdims=True))).reshape(-1)


def a3_features(latencies: list[float]) -> np.ndarray:
    return np.log(np.asarray(latencies))
