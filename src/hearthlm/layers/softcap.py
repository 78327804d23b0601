"""Soft-capping: cap * tanh(x / cap), which Gemma applies to its final logits to keep them within (-cap, cap)."""

from __future__ import annotations

import torch


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap); x itself when cap is 0 or None."""
    return torch.tanh(x / cap) * cap if cap else x
