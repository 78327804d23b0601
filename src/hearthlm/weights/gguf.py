"""Reading GGUF files (llama.cpp's format): the header, the metadata and a memory-mapped view of each tensor's
bytes. What the bytes mean (GGML block types) is quant/ggml.py's business; what the names and metadata mean
for a model is gguf_model.py's.

Layout (little-endian): magic "GGUF", version (2 or 3), tensor count, metadata count; the metadata as
(key, type, value); the tensor infos as (name, dims innermost-first, GGML type, offset); then, aligned to
`general.alignment` (32 by default), the tensor data. Every count and length is checked against the file
size before it is trusted, so a truncated or corrupt file gets a GGUFError naming what is wrong, never a
crash or a huge allocation.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..quant import ggml
from .safetensors import CheckpointError

MAGIC = b"GGUF"

# Metadata value types: id -> (struct format, size) for scalars.
_SCALARS = {
    0: ("<B", 1),  # uint8
    1: ("<b", 1),  # int8
    2: ("<H", 2),  # uint16
    3: ("<h", 2),  # int16
    4: ("<I", 4),  # uint32
    5: ("<i", 4),  # int32
    6: ("<f", 4),  # float32
    7: ("<?", 1),  # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


class GGUFError(CheckpointError):
    """A .gguf file that cannot be read: names the file and what is wrong with it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF lists dims innermost first)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {len(self.buf)} — download it again"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return str(raw, "utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: `string` unrolled, since a vocabulary's tokens and merges are hundreds of
        thousands of them (Gemma 4's 777k: 1.75 s one by one, 1.0 s here)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = length(buf, pos)
            if n > end - pos - 8:
                break
            raw = buf[pos + 8 : pos + 8 + n]
            pos += 8 + n
            try:
                out.append(str(raw, "utf-8"))
            except UnicodeDecodeError:
                out.append(str(raw, "utf-8", errors="replace"))
        self.pos = pos
        if len(out) < count:
            self.string(what)  # raises the error naming where the file ends
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar(4, what)
            count = self.scalar(10, what)
            if etype == _ARRAY:  # llama.cpp refuses them too; unbounded nesting would exhaust the stack
                raise GGUFError(f"{self.path}: corrupt: {what} is an array of arrays, which GGUF readers do not accept")
            if etype in _NUMPY:
                size = _SCALARS[etype][1]
                raw = self.take(count * size, what)
                return np.frombuffer(raw, dtype=_NUMPY[etype]).tolist()
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise GGUFError(f"{self.path}: corrupt: {what} claims {count} elements, more than the file holds")
            if etype == _STRING:
                return self.strings(count, what)
            return [self.value(etype, what) for _ in range(count)]
        raise GGUFError(f"{self.path}: corrupt: {what} has unknown value type {vtype}")


def _check_overlaps(path: Path, tensors: Any) -> None:
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise GGUFError(f"{path}: corrupt: tensors '{first}' and '{second}' overlap in the file")


class GGUFFile:
    """One .gguf file: `metadata` (key -> Python value), `tensors` (name -> TensorInfo), and `raw(name)`, a
    zero-copy uint8 view of a tensor's bytes in a private memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise GGUFError(f"{self.path} not found") from None
        with f:
            size = self.path.stat().st_size
            if size < 24:
                raise GGUFError(f"{self.path}: {size} bytes is too short to be a GGUF file (truncated?)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base: int | None = None  # address of the mapping, once a view is released
        cur = _Cursor(memoryview(self._mmap), self.path)
        n_tensors, n_kv = self._read_header(cur, size)
        self.metadata = self._read_metadata(cur, n_kv)
        infos = self._read_infos(cur, n_tensors)
        alignment = self.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(
                f"{self.path}: corrupt: general.alignment = {alignment!r} is not a power of two (an integer, 32 by "
                "default) — the file is damaged; convert the model again"
            )
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors = self._place(infos, data_start, alignment, size)

    def _read_header(self, cur: _Cursor, size: int) -> tuple[int, int]:
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (the first bytes are not 'GGUF')")
        self.version = cur.scalar(4, "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (versions 2 and 3 are)")
        n_tensors = cur.scalar(10, "tensor count")
        n_kv = cur.scalar(10, "metadata count")
        if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
            raise GGUFError(
                f"{self.path}: corrupt header ({n_tensors} tensors, {n_kv} metadata entries, more than "
                f"{size} bytes can hold) — the file is damaged; download it again"
            )
        return n_tensors, n_kv

    def _read_metadata(self, cur: _Cursor, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in metadata:
                raise GGUFError(f"{self.path}: corrupt: metadata key '{key}' appears twice")
            metadata[key] = cur.value(cur.scalar(4, f"type of '{key}'"), f"metadata '{key}'")
        return metadata

    def _read_infos(self, cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        infos, seen = [], set()
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            if name in seen:
                raise GGUFError(f"{self.path}: corrupt: tensor '{name}' is listed twice")
            seen.add(name)
            n_dims = cur.scalar(4, f"dims of '{name}'")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: corrupt: tensor '{name}' claims {n_dims} dimensions (GGUF has 1 to 4)")
            dims = [cur.scalar(10, f"dims of '{name}'") for _ in range(n_dims)]
            shape = tuple(reversed(dims))
            if any(d == 0 or d >= 2**63 for d in dims) or math.prod(dims) >= 2**63:
                raise GGUFError(f"{self.path}: corrupt: tensor '{name}' has an impossible shape {shape}")
            infos.append((name, shape, cur.scalar(4, f"type of '{name}'"), cur.scalar(10, f"offset of '{name}'")))
        return infos

    def _place(self, infos: list, data_start: int, alignment: int, size: int) -> dict[str, TensorInfo]:
        """TensorInfos with absolute offsets: each aligned, inside the file, and not overlapping another."""
        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            try:
                nbytes = ggml.tensor_nbytes(ggml_type, shape)
            except ggml.GGMLTypeError as e:
                raise GGUFError(f"{self.path}: tensor '{name}': {e}") from None
            if offset % alignment:
                raise GGUFError(
                    f"{self.path}: corrupt: tensor '{name}' starts at data offset {offset}, which is not a multiple of "
                    f"the alignment {alignment}"
                )
            start = data_start + offset
            if start + nbytes > size:
                raise GGUFError(
                    f"{self.path}: tensor '{name}' ({nbytes} bytes at offset {start}) lies beyond the end of the "
                    f"file ({size} bytes): the file is truncated or corrupt — download it again"
                )
            tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
        _check_overlaps(self.path, tensors.values())
        return tensors

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def raw(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def release(self, name: str) -> None:
        """Drop the pages of a tensor that was copied out (see SafetensorsFile.release)."""
        info = self.tensors[name]
        self.release_range(info.offset, info.nbytes)

    def release_range(self, start: int, nbytes: int) -> None:
        """Drop the whole pages within bytes [start, start + nbytes) of the file from the process."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def release_view(self, view: torch.Tensor) -> None:
        """Drop the pages under a tensor that views this file's mapping; nothing for any other tensor."""
        if self._base is None:
            self._base = torch.frombuffer(self._mmap, dtype=torch.uint8, count=1).data_ptr()
        start, nbytes = view.data_ptr() - self._base, view.numel() * view.element_size()
        if 0 <= start and start + nbytes <= len(self._mmap):
            self.release_range(start, nbytes)
