"""Soft-capping: cap * tanh(x / cap), which Gemma applies to its final logits to keep them within (-cap, cap)."""

from __future__ import annotations

import torch


def softcap_(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """x = cap * tanh(x / cap) in place (x itself when cap is 0 or None); returns x. In place: for 16 rows of a 262k
    vocabulary the two temporaries of the out-of-place form cost ~20% more here."""
    return x.div_(cap).tanh_().mul_(cap) if cap else x
