"""Memory-mapped reading of Hugging Face safetensors checkpoints (one file or an indexed set of shards).

Tensors are views into a private (copy-on-write) mmap of each file: nothing is read from disk until a
tensor is touched, so the vision and audio towers of a multimodal checkpoint never enter memory.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file (and tensor) and what is wrong."""


MAX_HEADER = 100_000_000  # bytes of JSON header, the safetensors library's own limit
# Bits per element of every dtype the safetensors format defines (those _DTYPES lacks are refused on read).
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
         "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6,
         "F6_E3M2": 6}  # fmt: skip


def _read_header(f: BinaryIO, path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """The header's length and its JSON object, each checked against the file and the format."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise CheckpointError(f"{path}: header length {n} exceeds the file size: truncated or corrupt")
    if not 2 <= n <= MAX_HEADER:
        raise CheckpointError(f"{path}: header length {n} is not between 2 and {MAX_HEADER} bytes: corrupt file")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a duplicate key
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}): corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a {type(header).__name__}, not a JSON object")
    return n, header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
        raise ValueError(f"key '{seen[0]}' appears twice")
    return out


def _check_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    """Every tensor entry well formed, its byte range the size its dtype and shape give, and the ranges
    tiling the data exactly (no overlap, no gap), as the safetensors library requires."""
    spans = []
    for name, entry in header.items():
        start, end = _entry_range(path, name, entry)
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {end} of the data, which has {data_size}: truncated or corrupt"
            )
        spans.append((start, end, name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start != at:
            what = "overlaps the tensor before it" if start < at else f"leaves a gap of {start - at} bytes before it"
            raise CheckpointError(f"{path}: corrupt: tensor '{name}' {what} (offset {start}, expected {at})")
        at = end
    if at != data_size:
        raise CheckpointError(f"{path}: corrupt: {data_size - at} bytes after the last tensor belong to none")


def _entry_range(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """A header entry's [start, end) after checking its fields; raises CheckpointError naming the tensor."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its header entry is not a JSON object: corrupt file")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (safetensors defines {', '.join(_BITS)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers: corrupt file")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [start, end]: corrupt file")
    start, end = offsets
    if not 0 <= start <= end:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] are negative or reversed: corrupt file")
    bits = _BITS[dtype] * math.prod(shape)
    if bits != 8 * (end - start):
        raise CheckpointError(
            f"{where}: {dtype} {shape} needs {-(-bits // 8)} bytes, but its data_offsets give {end - start}: corrupt file"
        )
    return start, end


class SafetensorsFile:
    """One .safetensors file: parsed header plus an mmap; `get(name)` returns a zero-copy view."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                n, header = _read_header(f, path, size)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found") from None
        header.pop("__metadata__", None)
        _check_entries(path, header, size - 8 - n)
        self._data_start = 8 + n
        self._size = size
        self._base: int | None = None
        self._fd: int | None = None
        self._exact_fd: int | None = None  # without readahead: a share's reads (read)
        self.entries: dict[str, dict] = header

    def __del__(self):
        for fd in (getattr(self, "_fd", None), getattr(self, "_exact_fd", None)):
            if fd is not None:
                os.close(fd)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = entry["shape"]
        count = 1
        for s in shape:
            count *= s
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or self._data_start + end > self._size:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' ({entry['dtype']} {shape}) does not fit its byte range: "
                "the file is truncated or corrupt"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + start)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (after it was copied): they would otherwise stay in RSS
        beside the copy. The mapping is private and never written, so a later read just faults them in again."""
        if self._mmap is not None:
            self._drop(*(self._data_start + o for o in self.entries[name]["data_offsets"]))

    def _drop(self, start: int, end: int) -> None:
        """Drop the whole pages inside bytes [start, end) of the file from this process (MADV_DONTNEED)."""
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def read_only(self, names: list[str]) -> None:
        """No readahead around a page fault on this mapping (MADV_RANDOM), and these tensors read ahead whole
        (read_ahead): a load that needs only them reads only them, not the experts stored between them."""
        if self._mmap is None or not hasattr(mmap, "MADV_RANDOM"):
            return
        self._mmap.madvise(mmap.MADV_RANDOM)
        self.read_ahead(names)

    def read_ahead(self, names: list[str]) -> None:
        """Start reading these tensors whole (MADV_WILLNEED)."""
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        for name in names:
            start, end = (self._data_start + o for o in self.entries[name]["data_offsets"])
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            if end > first:
                self._mmap.madvise(mmap.MADV_WILLNEED, first, end - first)

    def read_around(self) -> None:
        """Readahead as the kernel does it by default again (MADV_NORMAL), after read_only."""
        if self._mmap is not None and hasattr(mmap, "MADV_NORMAL"):
            self._mmap.madvise(mmap.MADV_NORMAL)

    def _offset(self, view: torch.Tensor, strided: bool = False) -> int | None:
        """Where a contiguous view of this file's mapping starts in the file; None if it is not one. `strided`:
        any view whose last dimension is contiguous, wholly inside the mapping."""
        if self._mmap is None or not (view.is_contiguous() or (strided and view.dim() and view.stride(-1) == 1)):
            return None
        if self._base is None:
            self._base = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
        start = view.data_ptr() - self._base
        last = sum((n - 1) * st for n, st in zip(view.shape, view.stride())) + 1 if view.numel() else 0
        return start if 0 <= start and start + last * view.element_size() <= self._size else None

    def read_into(self, view: torch.Tensor, dst: torch.Tensor) -> bool:
        """Read the bytes under `view` (a view of the mapping) from the file into `dst` (same dtype and size, a
        contiguous CPU tensor) with one pread: no page of the mapping is touched. False if not applicable."""
        start = self._offset(view)
        if start is None or dst.dtype != view.dtype or dst.shape != view.shape or not dst.is_contiguous():
            return False
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = memoryview(dst.view(-1).view(torch.uint8).numpy())
        n = os.preadv(self._fd, [buf], start)
        if n != len(buf):
            raise CheckpointError(f"{self.path}: short read at byte {start}: the file changed or is truncated")
        return True

    def read(self, view: torch.Tensor) -> torch.Tensor | None:
        """A copy of `view` (a view of the mapping whose last dimension is contiguous: rows, columns or matrices of
        a tensor, a rank's share of it: weights/share.py), read from the file with no page of the mapping touched
        and no readahead, so that only the view's own pages are read. Each contiguous run is one pread; the runs
        are read by READERS threads at once, since a share's columns are many short runs. None if `view` is not
        in this file's mapping."""
        start = self._offset(view, strided=True)
        if start is None:
            return None
        out = torch.empty(view.shape, dtype=view.dtype)
        if out.numel() == 0:
            return out
        if self._exact_fd is None:
            self._exact_fd = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._exact_fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf, runs, at = memoryview(out.view(-1).view(torch.uint8).numpy()), [], 0
        for offset, size in _runs(view, start):
            runs.append((offset, buf[at : at + size]))
            at += size
        batches = [runs[i : i + BATCH] for i in range(0, len(runs), BATCH)]
        if len(batches) == 1:
            self._pread(batches[0])
        else:
            list(_readers().map(self._pread, batches))
        return out

    def _pread(self, runs: list[tuple[int, memoryview]]) -> None:
        for offset, into in runs:
            if os.preadv(self._exact_fd, [into], offset) != len(into):
                raise CheckpointError(f"{self.path}: short read at byte {offset}: the file changed or is truncated")

    def release_view(self, view: torch.Tensor) -> None:
        """Drop the pages under a view of this file's mapping (one expert of a stacked tensor), as release."""
        start = self._offset(view)
        if start is not None:
            self._drop(start, start + view.numel() * view.element_size())


def _runs(view: torch.Tensor, start: int) -> list[tuple[int, int]]:
    """The file's byte runs [offset, size) under a view starting at byte `start` whose last dimension is
    contiguous, in the view's order, adjacent runs merged."""
    size = view.element_size()
    if view.is_contiguous():
        return [(start, view.numel() * size)]
    row = view.shape[-1] * size
    runs: list[list[int]] = []
    for index in itertools.product(*(range(n) for n in view.shape[:-1])):
        offset = start + sum(i * st for i, st in zip(index, view.stride())) * size
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += row
        else:
            runs.append([offset, row])
    return [(a, n) for a, n in runs]


READERS = 16  # threads reading a share's runs at once (a pread releases the interpreter lock)
BATCH = 64  # runs per task
_pool: ThreadPoolExecutor | None = None


def _readers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(READERS, thread_name_prefix="hearthlm-read")
    return _pool


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # PyTorch pickles: loading one runs its code


def pickle_advice(what: str) -> str:
    """Why a pickled checkpoint is refused, and how to turn it into safetensors."""
    return (
        f"{what} is a pickled PyTorch checkpoint, which hearthlm never loads (unpickling runs code from the file); "
        "convert it to safetensors where you trust it, e.g. `AutoModelForCausalLM.from_pretrained(folder)"
        ".save_pretrained(out, safe_serialization=True)` with transformers, or use the safetensors or GGUF "
        "release of the model"
    )


def _no_safetensors(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        return f"{folder}: " + pickle_advice(", ".join(pickles[:3]))
    return (
        f"{folder}: no *.safetensors files (and no model.safetensors.index.json); "
        "hearthlm loads safetensors checkpoints or .gguf files"
    )


def _read_index(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: tensor name -> shard file, a plain name in the same folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> file name")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", "..") or "\\" in shard:
            raise CheckpointError(
                f"{index}: shard {shard!r} is not a file name in the checkpoint folder (paths such as '../x' or "
                "'/x' are refused): the index is corrupt or malicious"
            )
    return weight_map


class Checkpoint:
    """All safetensors files of a checkpoint folder, addressed by tensor name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.exists():
            weight_map = _read_index(index)
            missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
            if missing:
                raise CheckpointError(
                    f"{folder}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}"
                    " — download them again (the index names every file the model needs)"
                )
            self._where = {k: folder / f for k, f in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(_no_safetensors(folder))
            for path in files:
                for k in SafetensorsFile(path).keys():
                    self._where[k] = path
        self._files: dict[Path, SafetensorsFile] = {}

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (nothing read)."""
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        return self._file(self._where[name]).shape(name)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def table(self, name: str) -> torch.Tensor:
        """A table the model reads a few rows at a time (its `keep_storage_dtype`), left as the file holds it: here
        every tensor is a view of the mapped file already (GGUFCheckpoint.table keeps block types in the file)."""
        return self.get(name)

    def stores_plus_one(self, name: str) -> bool:
        """Whether tensor `name` holds 1 + weight already (mapping.PlusOne): never, in a Hugging Face checkpoint."""
        return False

    def release(self, name: str) -> None:
        """See SafetensorsFile.release."""
        self._file(self._where[name]).release(name)

    def read_into(self, view: torch.Tensor, dst: torch.Tensor) -> bool:
        """See SafetensorsFile.read_into."""
        return any(f.read_into(view, dst) for f in self._files.values())

    def read(self, view: torch.Tensor) -> torch.Tensor:
        """See SafetensorsFile.read; a copy of any other tensor."""
        for f in self._files.values():
            if (out := f.read(view)) is not None:
                return out
        return view.clone(memory_format=torch.contiguous_format)

    def release_view(self, view: torch.Tensor) -> None:
        """See SafetensorsFile.release_view."""
        for f in self._files.values():
            f.release_view(view)

    def read_only(self, names: list[str]) -> None:
        """See SafetensorsFile.read_only (an expert budget's load: the dense tensors, not the experts; a rank's:
        all but the weights it reads its share of)."""
        by_file = self._by_file(names)
        for path in dict.fromkeys(self._where.values()):
            self._file(path).read_only(by_file.get(path, []))

    def read_ahead(self, names: list[str]) -> None:
        """See SafetensorsFile.read_ahead."""
        for path, some in self._by_file(names).items():
            self._file(path).read_ahead(some)

    def _by_file(self, names: list[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        return by_file

    def read_around(self) -> None:
        for f in self._files.values():
            f.read_around()

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        f = self._file(path)
        if name not in f.entries:
            raise CheckpointError(f"{path}: tensor '{name}' is listed in the index but absent from the file")
        return f.get(name)
