"""Weight maps are data: each model parameter names the checkpoint tensor(s) it is built from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cat:
    """Concatenate tensors along dim 0 (fused qkv, gate+up)."""

    parts: tuple[Source, ...]


@dataclass(frozen=True)
class Stack:
    """Stack tensors along a new dim 0 (per-expert weights -> [E, out, in])."""

    parts: tuple[Source, ...]


@dataclass(frozen=True)
class PlusOne:
    """1 + a tensor, computed in float32 (Gemma 3's RMSNorm scales by 1 + weight, adding the 1 in float32). A
    checkpoint whose file already holds 1 + weight (llama.cpp's converter adds it) says so by `stores_plus_one`,
    and the tensor is used as stored."""

    part: str


Source = str | Cat | Stack | PlusOne


def names_in(source: Source) -> list[str]:
    if isinstance(source, str):
        return [source]
    if isinstance(source, PlusOne):
        return [source.part]
    return [n for part in source.parts for n in names_in(part)]
