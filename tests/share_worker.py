"""One rank of tests/test_rank_reads.py, loading with every page of the checkpoint that lies wholly outside its
share made unreadable (PROT_NONE): a read of any of them through the mapping kills the process with SIGSEGV, and a
pread that reaches into one ends it with exit status 3. Run as
`python tests/share_worker.py FOLDER PAGES.json RANK WORLD SPLIT OUT.pt` (RANK -1: load the whole model, the
test's proof that the protection bites); saves the rank's state dict to OUT.pt."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import torch

from hearthlm import LLM
from hearthlm.distributed.mesh import Mesh
from hearthlm.weights import safetensors

PROT_NONE = 0


def protect(forbidden: dict[str, list[list[int]]]) -> None:
    """Make each mapped file's forbidden byte ranges (page-aligned, from the file's start) unreadable as soon as
    the loader maps the file."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    real = safetensors.SafetensorsFile.__init__

    def mapped(self, path: Path) -> None:
        real(self, path)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        for start, end in forbidden.get(path.name, []):
            if libc.mprotect(base + start, end - start, PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")

    safetensors.SafetensorsFile.__init__ = mapped
    preadv = os.preadv

    def checked(fd: int, buffers, offset: int, *flags) -> int:
        name, size = Path(os.readlink(f"/proc/self/fd/{fd}")).name, sum(memoryview(b).nbytes for b in buffers)
        if any(offset < end and start < offset + size for start, end in forbidden.get(name, [])):
            sys.stderr.write(f"read bytes [{offset}, {offset + size}) of {name}, which are not the rank's\n")
            os._exit(3)
        return preadv(fd, buffers, offset, *flags)

    os.preadv = checked


def main(folder: str, pages: str, rank: int, world: int, split: str, out: str) -> None:
    protect(json.loads(Path(pages).read_text()))
    mesh = None if rank < 0 else Mesh(rank, world, split=split)
    llm = LLM(folder, dtype="float32", mesh=mesh)
    torch.save(llm.model.state_dict(), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
