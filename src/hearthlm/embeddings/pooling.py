"""From per-token states to one unit vector per row: pooling, L2 normalisation, Matryoshka truncation."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last", "cls")


def pool(states: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """states [B, T, E] (rows right-padded), lengths [B] -> [B, E] float32. "mean": the average over a row's
    tokens; "last": its last token; "cls": its first."""
    states = states.float()
    if how == "mean":
        real = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]  # [B, T]
        return (states * real[..., None]).sum(dim=1) / lengths[:, None].to(states.dtype)
    if how == "last":
        return states[torch.arange(states.shape[0], device=states.device), lengths - 1]
    if how == "cls":
        return states[:, 0]
    raise ValueError(f"unknown pooling '{how}'; use one of {', '.join(POOLINGS)}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def truncate_dims(x: torch.Tensor, dims: int | None) -> torch.Tensor:
    """Matryoshka: keep the first `dims` components of each unit row and renormalise (None: unchanged)."""
    return x if dims is None or dims == x.shape[-1] else normalize(x[..., :dims])
