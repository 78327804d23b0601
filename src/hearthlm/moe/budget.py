"""`expert_budget`: bytes ('6GB', '512MiB', 1_000_000) or a fraction of all expert bytes (0.25, '0.25', '25%')."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class BudgetError(ValueError):
    """An expert budget that cannot be parsed, or one too small to run the model."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of `bytes` and `fraction` (of all expert bytes, in (0, 1]) is set. `share` = (rank, ranks):
    this process holds only rank `rank`'s run of each layer's experts, ranks dividing them evenly (expert
    parallelism, distributed/experts.py), and the budget counts those alone."""

    bytes: int | None = None
    fraction: float | None = None
    share: tuple[int, int] = (0, 1)

    def owned(self, experts: int) -> range:
        """The experts of a layer, of `experts`, that this process holds."""
        rank, ranks = self.share
        if experts % ranks:
            raise BudgetError(f"{experts} experts do not divide among {ranks} ranks")
        part = experts // ranks
        return range(rank * part, (rank + 1) * part)

    def resolve(self, total: int) -> int:
        """The budget in bytes, for experts that take `total` bytes in all."""
        return self.bytes if self.bytes is not None else int(self.fraction * total)

    def __str__(self) -> str:
        return f"{self.fraction:.0%}" if self.fraction is not None else human_bytes(self.bytes)


def parse_budget(value: str | float | int | Budget) -> Budget:
    """An int is bytes; a float a fraction; a string either ('6GB', '512MB', '1.5GiB', '25%', '0.25')."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise BudgetError(f"expert budget {value!r}: give bytes ('6GB'), a fraction (0.25) or a percentage ('25%')")
    if isinstance(value, int):
        return _bytes(value, str(value))
    if isinstance(value, float):
        return _fraction(value, str(value))
    text = str(value).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        return _fraction(float(m[1]) / 100, value)
    if re.fullmatch(r"\d*\.\d+", text):
        return _fraction(float(text), value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if m is None or m[2] not in _UNITS:
        raise BudgetError(
            f"expert budget '{value}' not understood: give bytes ('6GB', '512MB', '2GiB'), "
            "a fraction of all expert bytes ('0.25') or a percentage ('25%')"
        )
    return _bytes(int(float(m[1]) * _UNITS[m[2]]), value)


def parse_bytes(value: str | int, what: str) -> int:
    """A size in bytes: an int, or a string such as '12GB', '800MB', '2GiB'; `what` names it in the error."""
    text = str(value).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if m is None or m[2] not in _UNITS or float(m[1]) <= 0:
        raise ValueError(f"{what} '{value}' not understood: give a size such as '12GB', '800MB' or '2GiB'")
    return int(float(m[1]) * _UNITS[m[2]])


def _fraction(f: float, text: object) -> Budget:
    if not 0 < f <= 1:
        raise BudgetError(f"expert budget '{text}': a fraction must be in (0, 1] (a percentage in (0%, 100%])")
    return Budget(fraction=f)


def _bytes(n: int, text: object) -> Budget:
    if n <= 0:
        raise BudgetError(f"expert budget '{text}': must be more than 0 bytes")
    return Budget(bytes=n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError
