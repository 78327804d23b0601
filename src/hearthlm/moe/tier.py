"""The slow tier: where an MoE layer's experts live when they are not in a slot.

On CPU it is the memory-mapped checkpoint itself: nothing is read at load. A fetch reads one expert's bytes
from the file into a slot with pread where they are stored as they run (no page of the mapping is touched);
otherwise it copies them from the mapping, converting the dtype or quantizing exactly as the full load would,
and drops those pages from the process. Either way memory holds the slots, the page cache the rest.
A checkpoint that `hearth quantize` wrote is read as stored: the quantized copy on disk, written once.
A miss that is not worth a slot runs from `read(e)`: views of the mapping where the expert is stored as it
runs (zero copy: the bytes are read once either way; the pages stay mapped, the page cache's to keep or
reclaim), else new tensors built as for a slot.
Beside a GPU the slow tier is host memory (HostTier): the experts built once in their final format."""

from __future__ import annotations

import torch

from ..quant.quantize import QuantSpec, quantizable, quantize
from ..quant.tensor import QuantTensor, combine
from ..weights.mapping import Cat, Source, Stack

Weight = torch.Tensor | QuantTensor


def copy_weight(dst: Weight, src: Weight, row: int = 0, non_blocking: bool = False, ckpt=None) -> int:
    """Copy src into rows [row, row + len(src)) of dst (same format); returns the rows copied. With `ckpt`, src
    is a view of its mapping: read straight from the file where the bytes are the same, else copied
    (converting the dtype) and the mapping's pages dropped after."""
    n = src.shape[0]
    if isinstance(dst, QuantTensor):
        assert isinstance(src, QuantTensor) and dst.layout == src.layout, "slot and expert formats differ"
        pairs = [
            (d[row : row + n], s)
            for d, s in ((dst.qdata, src.qdata), (dst.scales, src.scales), (dst.mins, src.mins))
            if d is not None
        ]
    else:
        pairs = [(dst[row : row + n], src)]
    for d, s in pairs:
        if ckpt is None:
            d.copy_(s, non_blocking=non_blocking)
        elif not ckpt.read_into(s, d):
            d.copy_(s)
            ckpt.release_view(s)
    return n


def _parts(w: Weight) -> list[torch.Tensor]:
    return [t for t in ((w.qdata, w.scales, w.mins) if isinstance(w, QuantTensor) else (w,)) if t is not None]


class CheckpointTier:
    """One MoE layer's experts in the mapped checkpoint: gate_up and down each a Stack of per-expert sources
    (per-expert tensors, gate and up concatenated) or the name of a stacked [E, out, in] tensor."""

    def __init__(self, ckpt, sources: tuple[Source, Source], dtype: torch.dtype, spec: QuantSpec | None):
        self.ckpt, self.sources, self.dtype = ckpt, sources, dtype
        self._stacked = {s: ckpt.get(s) for s in sources if isinstance(s, str)}  # views of the mapping
        first = [self._pieces(s, 0) for s in sources]
        # Quantize on fetch where the full load would quantize (a float file loaded with --quant).
        self.spec = [
            spec if spec is not None and all(isinstance(p, torch.Tensor) for p in ps) and quantizable(_cat(ps), spec)
            else None
            for ps in first
        ]  # fmt: skip
        # Where one piece is stored as it runs, an expert can run from the mapping itself (zero copy).
        self.in_place = all(
            len(ps) == 1 and q is None and (isinstance(ps[0], QuantTensor) or ps[0].dtype == dtype)
            for ps, q in zip(first, self.spec)
        )
        self.private = None  # moe/private.py's PrivateReads: every read into private memory, its pages dropped

    def _pieces(self, source: Source, e: int) -> list[Weight]:
        if isinstance(source, str):
            return [self._stacked[source][e]]
        assert isinstance(source, Stack)
        part = source.parts[e]
        names = [part] if isinstance(part, str) else list(part.parts) if isinstance(part, Cat) else None
        assert names is not None and all(isinstance(n, str) for n in names), f"unsupported expert source {part}"
        return [self.ckpt.get(n) for n in names]

    def read(self, e: int) -> tuple[Weight, Weight]:
        """Expert e's (gate_up, down) in the running format: views of the mapping where it is stored that way
        (`in_place`), else new tensors (the pages they were built from dropped)."""
        if self.private is not None:
            return self.private.read(self, e)
        if self.in_place:
            return self._pieces(self.sources[0], e)[0], self._pieces(self.sources[1], e)[0]
        out = []
        for source, spec in zip(self.sources, self.spec):
            pieces = self._pieces(source, e)
            out.append(self._build(e, pieces, spec))
            if _parts(out[-1])[0].data_ptr() != _parts(pieces[0])[0].data_ptr():  # a copy: the pages can go
                for t in (t for p in pieces for t in _parts(p)):
                    self.ckpt.release_view(t)
        return out[0], out[1]

    def _build(self, e: int, pieces: list[Weight], spec: QuantSpec | None) -> Weight:
        if spec is not None:
            return quantize(_cat(pieces), spec)
        if not isinstance(pieces[0], QuantTensor):
            return _cat(pieces).to(self.dtype)
        try:
            w = combine(pieces, stack=False) if len(pieces) > 1 else pieces[0]
        except ValueError as err:
            raise ValueError(f"{self.ckpt.folder}: expert {e}: {err}") from None
        if not isinstance(w, QuantTensor):  # a RowConcat: no slot can hold it
            kinds = sorted({p.extra_repr() for p in pieces})
            raise ValueError(
                f"{self.ckpt.folder}: expert {e} stores gate and up in different formats ({kinds}); "
                "an expert budget needs one format per expert matrix: load the model without one"
            )
        return w

    def load(self, e: int, slot: tuple[Weight, Weight]) -> None:
        """Copy expert e into a slot, then drop the file pages it was read from."""
        for source, spec, dst in zip(self.sources, self.spec, slot):
            pieces = self._pieces(source, e)
            if spec is not None:
                copy_weight(dst, quantize(_cat(pieces), spec))
                for p in pieces:
                    self.ckpt.release_view(p)
            else:
                _fill(dst, pieces, self.private or self.ckpt)
        if self.private is not None:
            self.private.drop(self, e)

    def views(self, e: int) -> list[Weight]:
        """Expert e's pieces as views of the mapping (what it occupies in the file)."""
        return [p for source in self.sources for p in self._pieces(source, e)]


def empty_like(w: Weight, n: int, device: torch.device | None = None) -> Weight:
    """A stack of n uninitialised weights of w's format: [n, *w.shape]."""
    new = lambda t: torch.empty((n, *t.shape), dtype=t.dtype, device=device or t.device)  # noqa: E731
    if isinstance(w, QuantTensor):
        return QuantTensor(new(w.qdata), new(w.scales), None if w.mins is None else new(w.mins), w.bits, w.group)
    return new(w)


def layout(w: Weight) -> tuple:
    """What a slot must match to hold w: its shape and storage format."""
    if isinstance(w, QuantTensor):
        return (tuple(w.shape), *w.layout, w.qdata.dtype, w.scales.dtype)
    return (tuple(w.shape), w.dtype)


def nbytes(w: Weight) -> int:
    return sum(t.numel() * t.element_size() for t in _parts(w))


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _fill(dst: Weight, pieces: list[Weight], ckpt=None) -> Weight:
    row = 0
    for p in pieces:
        row += copy_weight(dst, p, row, ckpt=ckpt)
    return dst


class HostTier:
    """Experts held in (pinned) host memory in their final format, for a model on a GPU (checked on CUDA by
    benchmarks/cuda_check.sh, which runs tests/test_moe_budget.py there)."""

    def __init__(self, gate_up: Weight, down: Weight, device: torch.device):
        self.stacks = tuple(_pin(w) for w in (gate_up, down))
        self.device = device

    def read(self, e: int) -> tuple[Weight, Weight]:
        """Expert e copied to the device, outside the slots (a miss not worth a slot)."""
        return tuple(_to(w[e], self.device) for w in self.stacks)

    def load(self, e: int, slot: tuple[Weight, Weight]) -> None:
        for dst, src in zip(slot, self.stacks):
            copy_weight(dst, src[e], non_blocking=True)


def _to(w: Weight, device: torch.device) -> Weight:
    if isinstance(w, QuantTensor):
        return QuantTensor(
            *(t.to(device) if t is not None else None for t in (w.qdata, w.scales, w.mins)), w.bits, w.group
        )
    return w.to(device)


def _pin(w: Weight) -> Weight:
    if not torch.cuda.is_available():
        return w
    if isinstance(w, QuantTensor):
        return QuantTensor(
            *(t.pin_memory() if t is not None else None for t in (w.qdata, w.scales, w.mins)), w.bits, w.group
        )
    return w.pin_memory()
