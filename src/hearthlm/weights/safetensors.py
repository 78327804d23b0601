"""Memory-mapped reading of Hugging Face safetensors checkpoints (one file or an indexed set of shards).

Tensors are views into a private (copy-on-write) mmap of each file: nothing is read from disk until a
tensor is touched, so the vision and audio towers of a multimodal checkpoint never enter memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

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


class SafetensorsFile:
    """One .safetensors file: parsed header plus an mmap; `get(name)` returns a zero-copy view."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: file is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                size = path.stat().st_size
                if n > size - 8:
                    raise CheckpointError(f"{path}: header length {n} exceeds the file size: truncated or corrupt")
                header = json.loads(f.read(n))
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}): corrupt file") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._size = size
        self._base: int | None = None
        self._fd: int | None = None
        self.entries: dict[str, dict] = header

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

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
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = (self._data_start + o for o in self.entries[name]["data_offsets"])
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _offset(self, view: torch.Tensor) -> int | None:
        """Where a contiguous view of this file's mapping starts in the file; None if it is not one."""
        if self._mmap is None or not view.is_contiguous():
            return None
        if self._base is None:
            self._base = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
        start = view.data_ptr() - self._base
        return start if 0 <= start and start + view.numel() * view.element_size() <= self._size else None

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

    def release_view(self, view: torch.Tensor) -> None:
        """Drop the pages under a view of this file's mapping (one expert of a stacked tensor), as release."""
        start = self._offset(view)
        if start is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = start + view.numel() * view.element_size()
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)


class Checkpoint:
    """All safetensors files of a checkpoint folder, addressed by tensor name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
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
                raise CheckpointError(
                    f"{folder}: no *.safetensors files (and no model.safetensors.index.json); "
                    "hearthlm loads safetensors checkpoints or .gguf files"
                )
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

    def release_view(self, view: torch.Tensor) -> None:
        """See SafetensorsFile.release_view."""
        for f in self._files.values():
            f.release_view(view)

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        f = self._file(path)
        if name not in f.entries:
            raise CheckpointError(f"{path}: tensor '{name}' is listed in the index but absent from the file")
        return f.get(name)
