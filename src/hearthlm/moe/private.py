"""Routing-privacy switches on an expert pool (issue 23; hearthlm/privacy measures what each one closes).

- Private reads (`PrivateReads`): every expert read goes into process-private memory, never computed from the
  shared mapping: with O_DIRECT where the file system takes it (no page of the file is cached at all), else a
  pread with readahead off after which the file's expert pages are dropped from the page cache (posix_fadvise
  DONTNEED, whole pages rounded outwards, so the page an expert shares with its neighbour goes too). Another
  process timing reads of the checkpoint then finds every expert cold, used or not. At enable
  time every expert's pages are dropped, including those readahead pulled in while the dense weights loaded,
  and the checkpoint's mappings are set MADV_RANDOM, so that faults on what stays mapped (a tied embedding
  table) no longer read the experts around it.
- Fixed-shape fetching (`ExpertPool.fixed_shape`): each MoE layer step reads the same number of experts from
  the slow tier, min(experts, top_k x tokens), its misses padded with decoys drawn uniformly from the others,
  so bytes read and fetch time depend on the token count alone, not on routing or on what the pool holds.
- `clear(pool)`: empty every slot; `reset(pool)`: back to the state after the load (slots, policy, warm start),
  which the engine does when the client changes under `--isolate-clients` (engine/scheduler.py).

Where the pages lie in the file comes from /proc/self/maps (the mapping that holds each view), so any
memory-mapped checkpoint works without the tier knowing its format. Linux only, as posix_fadvise is.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .options import readable_by_others  # noqa: F401  (the rule `--private-reads auto` applies)
from .tier import CheckpointTier, empty_like

PAGE = mmap.PAGESIZE
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers in whole logical blocks (4096 covers 512 too)
MADV_RANDOM = getattr(mmap, "MADV_RANDOM", 1)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def file_maps() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of every file mapping of this process, from /proc/self/maps."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, int(parts[2], 16), parts[5]))
    return maps


def no_read_around(paths: set[str]) -> None:
    """madvise(MADV_RANDOM) on this process's mappings of `paths`: a page fault on the dense weights that stay
    mapped (a tied embedding table) then reads its own page, not megabytes of experts around it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for lo, hi, _, path in file_maps():
        if path in paths and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_RANDOM) != 0:
            raise OSError(ctypes.get_errno(), f"madvise(MADV_RANDOM) on {path} failed")


def file_ranges(ptrs: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(path, offset, length) in the mapped file of each memory range (address, length), from /proc/self/maps."""
    maps = file_maps()
    out = []
    for ptr, n in ptrs:
        hit = next(((off + ptr - lo, path) for lo, hi, off, path in maps if lo <= ptr and ptr + n <= hi), None)
        if hit is None:
            raise ValueError("private reads need experts that are views of a memory-mapped checkpoint file")
        out.append((hit[1], hit[0], n))
    return out


def merge(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(path, offset, length) ranges joined where they touch or overlap: one fadvise per span of experts."""
    out: list[list] = []
    for path, start, n in sorted(ranges):
        if out and out[-1][0] == path and start <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], start + n - out[-1][1])
        else:
            out.append([path, start, n])
    return [tuple(r) for r in out]


class PrivateReads:
    """Reads of one pool's experts into private memory, never through the page cache.

    Where the file system takes O_DIRECT (ext4, xfs, btrfs; not tmpfs), each read goes from the disk to an
    aligned private buffer and on into the slot: no page of the file is cached, so there is nothing to drop after
    it. Elsewhere a buffered pread with readahead off, then every expert page of the file dropped (the read's own
    readahead may have cached neighbours)."""

    def __init__(self, pool):
        tiers = pool.tiers.values()
        if not all(isinstance(t, CheckpointTier) for t in tiers):
            raise ValueError("private reads apply to experts read from a checkpoint on CPU, not from host memory")
        self.template = pool.slots[0]  # one slot: the format every read takes
        self.ckpt = next(iter(tiers)).ckpt
        self.fds: dict[str, int] = {}
        views = [t for tier in tiers for e in pool.owned for w in tier.views(e) for t in _parts(w)]
        memory = [(v.data_ptr(), v.numel() * v.element_size()) for v in views]
        ranges = file_ranges(memory)
        self.where = dict(zip(memory, ranges))  # (address, length) of a view -> (path, offset, length)
        self.spans = merge(ranges)
        self.largest = max(n for _, _, n in ranges)
        self.direct = all(_direct_ok(path) for path, _, _ in self.spans)
        self.local = threading.local()  # each thread's aligned bounce buffer (the fetch thread reads too)
        self.copied = False  # a read went through the mapping (a dtype change): its pages need dropping
        self.ring: dict[tuple[int, int, int], mmap.mmap] = {}  # read()'s two reused buffers per weight part
        self.turn = 0
        no_read_around({path for path, _, _ in self.spans})

    def read_into(self, view, dst) -> bool:
        """copy_weight's reader: the bytes under `view` into `dst`, read on our own descriptor (O_DIRECT, else
        readahead off: an asynchronous readahead still in flight when the pages are dropped would cache the
        neighbours after the drop). False where the bytes do not run as stored (a dtype change)."""
        where = self.where.get((view.data_ptr(), view.numel() * view.element_size()))
        if where is None or dst.dtype != view.dtype or dst.shape != view.shape or not dst.is_contiguous():
            self.copied = True
            return False
        path, offset, n = where
        out = dst.view(-1).view(torch.uint8)
        if self.direct:
            out.copy_(self._read_direct(path, offset, n))
        elif os.preadv(self._fd(path), [memoryview(out.numpy())], offset) != n:
            raise ValueError(f"{path}: short read at byte {offset}: the file changed or is truncated")
        return True

    def _read_direct(self, path: str, offset: int, n: int, buf: mmap.mmap | None = None) -> torch.Tensor:
        """Bytes [offset, offset + n) of the file through O_DIRECT: whole aligned blocks into `buf` (page-aligned;
        default this thread's bounce buffer); -> a view of the asked bytes in it."""
        first = offset // ALIGN * ALIGN
        size = -(-(offset + n) // ALIGN) * ALIGN - first
        buf = buf if buf is not None else getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = mmap.mmap(-1, -(-(self.largest + 2 * ALIGN) // PAGE) * PAGE)
        got = os.preadv(self._fd(path), [memoryview(buf)[:size]], first)
        if got < offset + n - first:
            raise ValueError(f"{path}: short read at byte {offset}: the file changed or is truncated")
        return torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset - first)

    def release_view(self, view) -> None:
        self.ckpt.release_view(view)

    def read(self, tier: CheckpointTier, e: int):
        """Expert e in private memory (a miss not worth a slot). With O_DIRECT and an expert stored as it runs, the
        read lands in one of two reused buffers and the weights are views of it (no copy, no fresh pages): the
        layer uses one expert at a time, so the expert before the one being read is done with. Else new buffers
        of the slot format, filled by load()."""
        views = tier.views(e)
        if self.direct and tier._in_place and all(self._aligned(t) for w in views for t in _parts(w)):
            self.turn ^= 1
            return tuple(self._in_ring(w, i) for i, w in enumerate(views))
        slot = tuple(empty_like(w, 1)[0] for w in self.template)
        tier.load(e, slot)  # load() drops the pages
        return slot

    def _aligned(self, t: torch.Tensor) -> bool:
        """Whether a view of part `t` in a buffer lands on its element size (its file offset is a multiple)."""
        where = self.where.get((t.data_ptr(), t.numel() * t.element_size()))
        return where is not None and where[1] % t.element_size() == 0

    def _in_ring(self, view, i: int):
        """`view` (a tensor or QuantTensor of the mapping) read into ring buffers (turn, i, part)."""
        from ..quant.tensor import QuantTensor

        parts = []
        for j, t in enumerate(_parts(view)):
            path, offset, n = self.where[(t.data_ptr(), t.numel() * t.element_size())]
            key = (self.turn, i, j)
            if key not in self.ring:
                self.ring[key] = mmap.mmap(-1, -(-(self.largest + 2 * ALIGN) // PAGE) * PAGE)
            raw = self._read_direct(path, offset, n, self.ring[key])
            parts.append(raw.view(t.dtype).view(t.shape))
        if isinstance(view, QuantTensor):
            it = iter(parts)
            q, sc = next(it), next(it)
            return QuantTensor(q, sc, next(it) if view.mins is not None else None, view.bits, view.group)
        return parts[0]

    def drop(self, tier: CheckpointTier, e: int) -> None:
        """After a read of expert e: with O_DIRECT nothing is cached, unless a piece was copied from the mapping;
        otherwise take its pages out of this process and every expert page out of the page cache."""
        if not self.direct or self.copied:  # once a piece was copied from the mapping, always (rare: a dtype change)
            self.evict(tier, [e])

    def evict(self, tier: CheckpointTier, experts: list[int]) -> None:
        """Take these experts' pages out of this process, then every expert page of the file out of the page
        cache (at enable time: what the load's readahead and earlier runs cached)."""
        for e in experts:
            for view in tier.views(e):
                for t in _parts(view):
                    tier.ckpt.release_view(t)  # mapped pages are not dropped from the page cache: unmap first
        for path, start, n in self.spans:
            first = start // PAGE * PAGE
            last = -(-(start + n) // PAGE) * PAGE
            os.posix_fadvise(self._buffered_fd(path), first, last - first, os.POSIX_FADV_DONTNEED)

    def _fd(self, path: str) -> int:
        if not self.direct:
            return self._buffered_fd(path)
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
        return self.fds[path]

    def _buffered_fd(self, path: str) -> int:
        key = path + "\0buffered"  # fadvise goes through a descriptor without O_DIRECT
        if key not in self.fds:
            self.fds[key] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(self.fds[key], 0, 0, os.POSIX_FADV_RANDOM)  # read what is asked, nothing around
        return self.fds[key]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _direct_ok(path: str) -> bool:
    """Whether the file system under `path` takes O_DIRECT reads (HEARTHLM_NO_DIRECT=1 turns them off)."""
    if os.environ.get("HEARTHLM_NO_DIRECT") == "1" or not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, PAGE)
        os.preadv(fd, [memoryview(buf)[:ALIGN]], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _parts(w) -> list:
    from ..quant.tensor import QuantTensor

    return [t for t in ((w.qdata, w.scales, w.mins) if isinstance(w, QuantTensor) else (w,)) if t is not None]


def private_reads(pool, on: bool = True) -> None:
    """Turn private reads on (dropping every expert's pages now) or off (back to zero-copy reads where the
    file stores experts as they run)."""
    tiers = list(pool.tiers.values())
    if not on:
        for tier in tiers:
            if tier.private is not None:
                tier.private.close()
            tier.private = None
            tier.in_place = getattr(tier, "_in_place", tier.in_place)
        return
    reads = PrivateReads(pool)
    for tier in tiers:
        tier._in_place, tier.in_place, tier.private = tier.in_place, False, reads
        reads.evict(tier, list(pool.owned))
    for attempt in range(20):  # a readahead still in flight caches its pages after the drop: drop again
        if not any(cached(path, start, n) for path, start, n in reads.spans):
            break
        if attempt == 1:  # still cached: a large folio that an expert page shares with a mapped dense page
            unmap_clean({path for path, _, _ in reads.spans})
        time.sleep(0.01)
        reads.evict(tiers[0], [])


def unmap_clean(paths: set[str]) -> None:
    """Unmap every page of this process's mappings of `paths` where none holds a private copy (smaps: no
    anonymous pages), so that the page cache can drop them; the dense weights fault back in from the file, the
    same bytes, one page at a time (MADV_RANDOM). A mapping with private copies is left alone: unmapping would
    lose them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for lo, hi, path in _clean_maps(paths):
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"madvise(MADV_DONTNEED) on {path} failed")


def _clean_maps(paths: set[str]) -> list[tuple[int, int, str]]:
    out, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            current = (lo, hi, parts[5]) if len(parts) == 6 and parts[5] in paths else None
        elif current is not None and parts[0] == "Anonymous:" and int(parts[1]) == 0:
            out.append(current)
    return out


def cached(path: str, start: int, n: int) -> bool:
    """Whether any whole page of bytes [start, start + n) of the file is in the page cache (mincore on a mapping
    of our own, which touches no page)."""
    libc = ctypes.CDLL(None, use_errno=True)
    first, last = -(-start // PAGE) * PAGE, (start + n) // PAGE * PAGE
    if last <= first:
        return False
    vec = (ctypes.c_ubyte * ((last - first) // PAGE))()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), last - first, access=mmap.ACCESS_COPY, offset=first) as m:
        anchor = ctypes.c_char.from_buffer(m)  # the mapping's address
        ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(last - first), vec) == 0
        del anchor
    if not ok:
        raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
    return any(v & 1 for v in vec)


def fixed_shape(pool, on: bool = True, seed: int | None = None) -> None:
    """Pad every layer step's reads to min(experts, top_k x tokens) with decoys (see the module docstring).
    Decoys are drawn from the OS's entropy unless `seed` is given (tests)."""
    pool.fixed_shape = on
    pool.decoy_rng = np.random.default_rng(seed)
    if on and pool.decoy is None:
        pool.decoy = tuple(empty_like(w, 1)[0] for w in pool.slots[0])


def reset(pool) -> None:
    """Back to the pool's state after the load: empty, the policy as it was bound (its profile prior, no history),
    then the same warm start. What runs next finds the same slots and scores whatever ran before (client
    isolation, engine/scheduler.py). Costs the warm start's reads (none without a profile)."""
    clear(pool)
    pool.set_policy(pool.policy)  # bind() rebuilds the policy's state from its prior
    pool.warm(pool.start)


def clear(pool) -> None:
    """Empty every slot: the next request starts from the same pool whatever the last one routed to."""
    for slot in range(len(pool.slots)):
        pool._wait(slot)
        key = pool.owner(slot)
        if key is not None:
            del pool.where[key]
        pool.slot_row[slot] = -1
    pool.reserved.clear()
