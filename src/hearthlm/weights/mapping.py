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


Source = str | Cat | Stack


def names_in(source: Source) -> list[str]:
    if isinstance(source, str):
        return [source]
    return [n for part in source.parts for n in names_in(part)]
