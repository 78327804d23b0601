"""What one rank of a split model reads and holds while it loads: rank 1 of 2 under --tp, --ep (with --experts) and
--pp, against one process loading the whole model, each in a fresh process with the checkpoint dropped from the
page cache first.

    python benchmarks/rank_load.py [--hidden 1024 --layers 8] [--experts 8]

Builds the random float32 checkpoint benchmarks/parallel.py uses. For each load it prints:
- file MB in memory: the checkpoint's pages in the page cache after the load (mincore), i.e. what was read from
  disk, readahead included;
- peak MiB: the growth of the process's peak resident memory (VmHWM) during the load;
- kept MiB: the growth of its resident memory after the load;
- seconds to load.
--warm leaves the file in the page cache (then "file MB read" is all of it).
"--tp, whole layers" is the split as it loaded before ranks read their shares alone: each layer read whole, then
split (the benchmark reproduces it by giving the loader no shares).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from parallel import build


def _status(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def drop_cache(folder: Path) -> None:
    """Drop the checkpoint's files from the page cache (they are clean and no process maps them)."""
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(folder: Path) -> int:
    """Bytes of the checkpoint's files in the page cache: mincore over a fresh private mapping of each (it has no
    pages of its own yet, so mincore reports the file's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    total = 0
    for file in folder.glob("*.safetensors"):
        size = file.stat().st_size
        with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            window = ctypes.c_char.from_buffer(m)
            if libc.mincore(ctypes.addressof(window), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            del window
            total += sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
    return total


def measure(folder: str, split: str, warm: bool) -> None:
    """One load in this process; prints its figures as JSON."""
    from hearthlm import LLM
    from hearthlm.distributed import tensor_parallel
    from hearthlm.distributed.mesh import Mesh

    if split == "tp-whole-layers":
        tensor_parallel.TensorParallelLoad.share = lambda self, name: None
    mesh = None if split == "whole" else Mesh(1, 2, split=split.split("-")[0])
    if not warm:
        drop_cache(Path(folder))
    rss0, hwm0 = _status("VmRSS"), _status("VmHWM")
    t0 = time.perf_counter()
    llm = LLM(folder, dtype="float32", mesh=mesh)
    seconds = time.perf_counter() - t0
    figures = {
        "split": split,
        "file_mb_read": cached_bytes(Path(folder)) / 1e6,
        "peak_mib": (_status("VmHWM") - max(hwm0, rss0)) / 2**20,
        "kept_mib": (_status("VmRSS") - rss0) / 2**20,
        "seconds": seconds,
    }
    del llm
    print(json.dumps(figures))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=0, help="a Mixtral-shaped model with this many experts (top-2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warm", action="store_true", help="leave the file in the page cache (a load read before)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--split", default="whole", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        return measure(a.measure, a.split, a.warm)
    import subprocess

    splits = ["whole", "tp", "tp-whole-layers", "pp"] + ["ep"] * bool(a.experts)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # not a tmpfs: its pages never leave memory
        build(Path(tmp), a.hidden, a.layers, a.experts)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 1e6
        shape = f"Mixtral-shaped, {a.experts} experts" if a.experts else "Llama-shaped"
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"# {shape}, hidden {a.hidden}, {a.layers} layers, fp32, {size:.1f} MB; {' '.join(sys.argv)}")
        cache = "left in the page cache" if a.warm else "dropped from the page cache first"
        print(f"# rank 1 of 2; each load in a fresh process, the file {cache}")
        print(f"{'load':<18}{'file MB read':>14}{'peak MiB':>10}{'kept MiB':>10}{'seconds':>9}")
        for _ in range(a.rounds):
            for split in splits:
                cmd = [sys.executable, __file__, "--measure", tmp, "--split", split] + ["--warm"] * a.warm
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
                f = json.loads(out)
                name = {"whole": "one process", "tp-whole-layers": "--tp, whole layers"}.get(split, f"--{split}")
                print(
                    f"{name:<18}{f['file_mb_read']:>14.1f}{f['peak_mib']:>10.0f}{f['kept_mib']:>10.0f}{f['seconds']:>9.2f}"
                )


if __name__ == "__main__":
    main()
