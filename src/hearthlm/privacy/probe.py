"""Attacker A1: a separate process that can read the checkpoint and nothing else of the victim's.

It learns where each expert lies in the file from the file itself (the safetensors header), empties the
page cache of the file's unmapped pages before a request (posix_fadvise DONTNEED, which any reader may
ask), and after it times one-byte reads of a few pages inside each expert's byte ranges, with readahead
off for its own reads (POSIX_FADV_RANDOM): about a microsecond when the page is cached, tens from disk.
Started as user `nobody` when the audit runs as root, so it holds no privilege over the victim.

Run as `python -m hearthlm.privacy.probe FILE`; it answers JSON lines on stdin:
  {"op": "drop"} -> {"ok": true};  {"op": "probe"} -> {"ns": [[read ns, ...] per expert], "experts": [[l, e]...]}
Where the file is not readable to it (an owner-only checkpoint, as `hearth pull` stores models), the attacker
learns nothing from it: it answers every op with {"denied": "<why>"} and the audit records that.
`resident()` is the owner's variant (mincore on its own mapping), used by tests as ground truth.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
import sys
import time

PAGE = mmap.PAGESIZE
PAGES_PER_RANGE = 4
_PER_EXPERT = re.compile(r"layers\.(\d+)\.(?:.*\.)?experts\.(\d+)\.")  # Mixtral, Qwen3-MoE
_STACKED = re.compile(r"layers\.(\d+)\.(?:.*\.)?experts\.[a-z_]+$")  # Gemma 4: [E, out, in]


def expert_ranges(path: str) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(layer, expert) -> its byte ranges [start, end) in the file: stacked [E, ...] expert tensors split by
    their first axis, or per-expert tensors (`...experts.{e}.w1`) taken whole."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for name, entry in header.items():
        start, end = (8 + n + o for o in entry["data_offsets"])
        if m := _PER_EXPERT.search(name):
            out.setdefault((int(m[1]), int(m[2])), []).append((start, end))
            continue
        if (m := _STACKED.search(name)) is None:
            continue
        experts = entry["shape"][0]
        step = (end - start) // experts
        for e in range(experts):
            out.setdefault((int(m[1]), e), []).append((start + e * step, start + (e + 1) * step))
    return dict(sorted(out.items()))


def probe_offsets(ranges: list[tuple[int, int]], per_range: int = PAGES_PER_RANGE) -> list[int]:
    """Page-aligned offsets spread evenly inside each range, never on a page that a neighbour shares."""
    out = []
    for start, end in ranges:
        first, last = -(-start // PAGE), end // PAGE - 1  # whole pages of this range only
        if last < first:
            continue
        count = min(per_range, last - first + 1)
        out += [(first + i * (last - first) // max(1, count - 1)) * PAGE for i in range(count)]
    return out


def drop(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_path(path: str | os.PathLike) -> None:
    """drop() for a file by name: its unmapped pages leave the page cache (any reader may ask)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop(fd)
    finally:
        os.close(fd)


def timed_reads(fd: int, offsets: list[int]) -> list[int]:
    """Nanoseconds of a one-byte pread at each offset."""
    out = []
    for off in offsets:
        t = time.perf_counter_ns()
        os.pread(fd, 1, off)
        out.append(time.perf_counter_ns() - t)
    return out


def resident(path: str, offsets: list[int]) -> list[bool]:
    """Whether each page is in the page cache, by mincore on a fresh mapping (the file owner's oracle)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)  # the mapping's address; mincore never touches the pages
        vec = (ctypes.c_ubyte * (-(-len(m) // PAGE)))()
        ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(m)), vec) == 0
        del anchor
        if not ok:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return [bool(vec[off // PAGE] & 1) for off in offsets]


def serve(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError as e:  # A1 needs to read the file; without that its attack cannot start
        for _ in sys.stdin:
            print(json.dumps({"denied": f"{e.strerror}: {path}"}), flush=True)
        return
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around the attacker's own reads
    experts = expert_ranges(path)
    offsets = {k: probe_offsets(v) for k, v in experts.items()}
    for line in sys.stdin:
        op = json.loads(line)["op"]
        if op == "drop":
            drop(fd)
            reply = {"ok": True}
        elif op == "probe":
            reply = {"experts": [list(k) for k in offsets], "ns": [timed_reads(fd, o) for o in offsets.values()]}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
