"""Faults (issue 22, item 6): `hearth pull` killed at random points, a full disk under pull and `hearth quantize`,
Ctrl-C during a long prefill in `hearth chat`, SIGTERM to `hearth serve` with a stream open.

Disk-full is simulated without root or a small filesystem: the write path is patched to fail with ENOSPC after
some bytes (store._write_range's file for pull, safetensors' save_file for quantize), and shutil.disk_usage is
patched for the check a pull makes before it starts."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_store import REPO, SHARDS, _ctrl_c_default, _env, hub, sources  # noqa: F401  (fixtures)

from hearthlm import store
from hearthlm.cli import main
from hearthlm.server.registry import Models

DEMO = store.DEMO_DIR / "hearth-demo"
FOLDER = "google--gemma-4-Tiny-it"
SAFETY = 600  # seconds: a net for a hung child, never an expectation of speed


def _wait(what, check, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + SAFETY
    while not check():
        assert proc is None or proc.poll() is None, f"{what}: the child ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what}: never happened"
        time.sleep(0.02)


def _only_incomplete() -> None:
    """What the store shows while a pull is unfinished: the model marked incomplete, never servable."""
    entries = [e for e in store.list_models() if e.repo_id == REPO]
    assert [e.complete for e in entries] in ([], [False])
    assert REPO not in {name for name, _ in Models(None).servable()}
    with pytest.raises(FileNotFoundError):
        store.resolve(REPO)


def _reference(tmp_path, monkeypatch, text_only: bool = False) -> Path:
    """A clean pull of the repo into a home of its own."""
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "reference"))
    folder = store.pull(REPO, progress=False, text_only=text_only)
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "home"))
    return folder


def _same(folder: Path, reference: Path) -> None:
    files = sorted(p.name for p in reference.iterdir() if p.is_file() and p.name != store.META)
    assert files == sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != store.META)
    for name in files:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


# -- hearth pull, killed ------------------------------------------------------------------------------
def test_pull_killed_at_random_points_resumes(hub, sources, tmp_path, monkeypatch):  # noqa: F811
    """SIGKILL (no handler runs) while a file streams in, at seeded random files and offsets; each next run
    resumes, the store never lists the model as complete before the end, and the result is a clean pull's."""
    reference = _reference(tmp_path, monkeypatch)
    fresh = sum(hub.sent.values())  # the bytes of a whole pull
    rng = random.Random(22)
    # A small file mid-body, the text shard mid-body, and the mixed shard while the plan reads its 8-byte header.
    targets = ["config.json", SHARDS[0], SHARDS[1]]
    partial = store.store_root() / FOLDER / store.PARTIAL
    for file in targets:
        size = len(hub.repos[REPO].files[file]) if file != SHARDS[1] else 8
        cut = rng.randrange(1, size)
        hub.release = threading.Event()  # this run's stall waits on its own event
        hub.stall[file] = cut
        before = hub.sent[file]
        proc = subprocess.Popen([sys.executable, "-m", "hearthlm.cli", "pull", REPO],
                                env=_env(hub, tmp_path) | {"HF_HUB_DOWNLOAD_TIMEOUT": "600"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _wait(f"{file} half sent", lambda f=file, b=before, c=cut: hub.sent[f] >= b + c, proc)
        proc.kill()
        proc.wait(timeout=SAFETY)
        hub.release.set()
        hub.stall.pop(file, None)
        _only_incomplete()
    # What the killed runs left: whole files moved into place and partial ones (which of the two depends on how far
    # the concurrent downloads got before each kill).
    kept = sum(
        p.stat().st_size for p in (store.store_root() / FOLDER).rglob("*") if p.is_file() and p.name != store.META
    )
    sent = sum(hub.sent.values())
    folder = store.pull(REPO, progress=False)
    _same(folder, reference)
    assert json.loads((folder / store.META).read_text())["complete"] and not partial.exists()
    assert store.resolve(REPO) == folder
    assert kept > 0 and sum(hub.sent.values()) - sent < fresh  # the last run resumed: less than a whole pull


class Killed(BaseException):
    """Stands in for the process dying: not an Exception, so no `except Exception` handles it."""


def test_pull_dies_at_every_step_and_resumes(hub, sources, tmp_path, monkeypatch):  # noqa: F811
    """In-process, the pull dies at each atomic step in turn (each os.replace of a file or of hearth.json, and the
    step's own write); after each death the store shows nothing complete and the next pull finishes it."""
    reference = _reference(tmp_path, monkeypatch)
    real = os.replace
    count = [0]

    def counting(src, dst):
        count[0] += 1
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", counting)
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "count"))
    store.pull(REPO, progress=False)
    steps = count[0]
    assert steps >= 6
    monkeypatch.setenv("HEARTHLM_HOME", str(tmp_path / "home"))
    for step in random.Random(7).sample(range(1, steps + 1), 4):
        count[0] = 0

        def dying(src, dst, step=step):
            count[0] += 1
            if count[0] == step:
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(store.os, "replace", dying)
        with pytest.raises(Killed):
            store.pull(REPO, progress=False)
        _only_incomplete()
        monkeypatch.setattr(store.os, "replace", real)
        _same(store.pull(REPO, progress=False), reference)
        store.remove(REPO)


# -- a full disk --------------------------------------------------------------------------------------
class _Full:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room: list[int]):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room[0] -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_during_pull_is_a_clear_error(hub, sources, monkeypatch, tmp_path, capsys):  # noqa: F811
    reference = _reference(tmp_path, monkeypatch)
    room = [len(hub.repos[REPO].files[SHARDS[0]]) // 2]
    real = store._write_range
    monkeypatch.setattr(store, "_write_range", lambda hub_, t, out, *a: real(hub_, t, _Full(out, room), *a))
    assert main(["pull", REPO]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err.lower() and "Traceback" not in err and "hearth pull" in err
    _only_incomplete()
    monkeypatch.setattr(store, "_write_range", real)  # space freed: the next pull resumes and finishes
    _same(store.pull(REPO, progress=False), reference)


def test_too_little_space_is_refused_before_downloading(hub, sources, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000, "total": 1, "used": 0}))
    assert main(["pull", REPO]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    folder = store.store_root() / FOLDER  # the plan read headers; no weight byte was fetched or written
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob(f"{store.PARTIAL}/*"))
    _only_incomplete()


def test_full_disk_during_quantize_leaves_nothing(tmp_path, monkeypatch, capsys):
    from hearthlm.weights import export

    out = tmp_path / "demo-int8"
    real = export.save_file

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 4096)  # some bytes went out before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    assert main(["quantize", str(DEMO), "--to", "int8", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err.lower() and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "save_file", real)
    assert main(["quantize", str(DEMO), "--to", "int8", "-o", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["demo-int8"]


# -- Ctrl-C during a long prefill in `hearth chat` --------------------------------------------------------
# The child slows its first prefill chunk down (sleeping inside the engine step, where a real long prefill spends
# its time) and says when it got there; after each reply it reports the KV blocks still in use.
CHAT = """
import sys, time
import hearthlm.cli as cli
import hearthlm.engine.engine as engine
real_run, slow = engine.run_paged, [True]
def run_paged(model, cache, seqs, n, *a, **k):
    if n != 1 and slow[0]:  # a prefill: n is one count (1 decodes) or a count per sequence
        slow[0] = False
        print("PREFILL", file=sys.stderr, flush=True)
        for _ in range(12000):
            time.sleep(0.05)
    return real_run(model, cache, seqs, n, *a, **k)
engine.run_paged = run_paged
real_reply = cli._reply
def reply(llm, history, params, err, *rest):
    out = real_reply(llm, history, params, err, *rest)
    print(f"KV {llm.engine().stats().kv_blocks_used} {len(history)}", file=sys.stderr, flush=True)
    return out
cli._reply = reply
sys.exit(cli.main(["chat", "--max-tokens", "3", "--temperature", "0"]))
"""


def test_ctrl_c_during_a_long_prefill_returns_to_the_prompt():
    proc = subprocess.Popen([sys.executable, "-c", CHAT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_ctrl_c_default)  # fmt: skip
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True).start()
    try:
        proc.stdin.write("tell me a long story " * 150 + "\n")
        proc.stdin.flush()
        _wait("the prefill", lambda: any("PREFILL" in line for line in err), proc)
        proc.send_signal(signal.SIGINT)
        _wait("the interrupted turn", lambda: any(line.startswith("KV ") for line in err), proc)
        _wait("the prompt again", lambda: "".join(out).count(">>> ") >= 2, proc)
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        _wait("the next turn", lambda: sum(line.startswith("KV ") for line in err) >= 2, proc)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=SAFETY) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    kv = [line.split() for line in err if line.startswith("KV ")]
    assert [k[1] for k in kv] == ["0", "0"], err  # the interrupted prefill left no KV block behind
    assert "Traceback" not in "".join(err) and "(stopped)" in "".join(err)


# -- SIGTERM to `hearth serve` ----------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_the_server_cleanly_with_a_stream_open():
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "hearthlm.cli", "serve", "hearth-demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait("the server", up, proc)
        body = {"model": "hearth-demo", "stream": True, "max_tokens": 1500, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=SAFETY) as r:
            stream = r.iter_lines()
            lines.append(next(stream))
            proc.send_signal(signal.SIGTERM)
            try:
                lines.extend(stream)
            except httpx.TransportError:
                pass  # cancelled at the end of the grace period: the connection closes
        code = proc.wait(timeout=SAFETY)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    assert code == 0, err
    assert "Traceback" not in err, err
    events = [json.loads(x.removeprefix("data: ")) for x in lines if x.startswith("data: {")]
    assert events and all("choices" in e or "error" in e for e in events)  # whole events only, then done or cut
    if lines[-1] == "data: [DONE]":
        assert events[-1]["choices"][0]["finish_reason"] == "length"
