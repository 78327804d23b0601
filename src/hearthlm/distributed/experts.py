"""Routed experts over several ranks, two ways. The router runs whole on every rank: after each all-reduce every
rank holds the full hidden state, so every rank computes the same routing and needs no message to learn it.

- **Expert parallelism** (`--ep N`): rank r of N holds experts [r E/N, (r+1) E/N) whole. It runs the tokens routed
  to its own experts and adds zeros for the rest; one all-reduce per MoE block sums the ranks' parts. Because
  every rank already holds every token, that all-reduce is both the send (a token reaches the rank of its
  expert) and the return (the expert's output reaches every rank): one message where a dispatch with sharded
  activations would need two all-to-alls.
- **Tensor parallelism** (`--tp N`): every rank holds every expert, each at 1/N of its width (the same column
  split as a dense MLP: gate and up by output rows, down by input columns), and one all-reduce sums them.

Expert parallelism reads whole experts, so a rank reads only the experts its tokens picked among its own; tensor
parallelism has every rank read a slice of each picked expert. Both give every rank the same bytes to hold.

Under an expert budget (`--expert-budget`) each rank of `--ep` loads with `rank_budget`: its pool serves its own
experts alone, and the budget counts those (25% means a quarter of the rank's experts). Width splits under a
budget are refused: the pool reads whole experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..layers.moe import Experts
from ..moe.budget import Budget, parse_budget
from ..weights.share import Share, column_unit, take
from .mesh import Mesh
from .shards import even, set_weight

MODES = ("tp", "ep")


class SummedExperts(nn.Module):
    """A rank's part of a layer's experts (a share of the experts, or of each expert's width) and the all-reduce
    that adds the other ranks' parts: what the model's `experts` was, with the same call."""

    def __init__(self, experts: Experts, mesh: Mesh):
        super().__init__()
        self.part = experts
        self.mesh = mesh

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.mesh.all_reduce(self.part(x, index, weight).contiguous())


def problems(experts: Experts, world: int, mode: str) -> list[str]:
    """Why this layer's experts cannot be split `mode`-wise over `world` ranks (empty: they can)."""
    if experts.source is not None and mode != "ep":
        return ["its experts are under an expert budget, whose pool reads whole experts: split them with --ep N"]
    if mode == "ep":
        n = experts.num_experts
        return [] if n % world == 0 else [f"{n} experts do not divide among {world} ranks"]
    width = experts.down.shape[-1]
    if width % world:
        return [f"the experts' width {width} does not divide among {world} ranks"]
    if (unit := column_unit(experts.down)) > 1 and (width // world) % unit:
        return [f"the experts' down projection ({width} columns) split {world} ways cuts its groups of {unit}"]
    return []


def expert_shares(experts: Experts, mesh: Mesh, mode: str, name: str) -> dict[str, Share]:
    """What rank `mesh.rank` keeps of the experts named `name` (their stacked gate_up and down), by parameter name:
    its run of the experts, whole ("ep"), or every expert's slice of the width ("tp": gate and up rows, down
    columns)."""
    if mode == "ep":
        run = Share(items=even(experts.num_experts, mesh.world, mesh.rank))
        return {f"{name}.gate_up": run, f"{name}.down": run}
    width = experts.down.shape[-1]
    lo, hi = even(width, mesh.world, mesh.rank)
    rows = ((lo, hi), (width + lo, width + hi))  # each expert's gate_up rows: [gate | up]
    return {f"{name}.gate_up": Share(rows=rows), f"{name}.down": Share(cols=(lo, hi))}


def shard_experts(experts: Experts, mesh: Mesh, mode: str, name: str, shares: dict[str, Share],
                  taken: set[str]) -> SummedExperts:  # fmt: skip
    """Keep rank `mesh.rank`'s part of `experts` (in place: `shares`, but for the weights in `taken`, which loaded as
    their share already) and wrap it in the all-reduce."""
    if mode == "ep" and experts.source is not None:  # under a budget: the pool, loaded with rank_budget, serves
        if experts.source.pool.owned != range(*shares[f"{name}.down"].items):  # the rank's experts alone
            raise ValueError(f"{name}: the expert pool was not loaded for rank {mesh.rank}'s share: use rank_budget")
    else:
        for attr in ("gate_up", "down"):
            if f"{name}.{attr}" not in taken:
                set_weight(experts, attr, take(getattr(experts, attr), shares[f"{name}.{attr}"], f"{name}.{attr}"))
    if mode == "ep":
        experts.first, end = shares[f"{name}.down"].items
        experts.num_experts = end - experts.first
    return SummedExperts(experts, mesh)


def rank_budget(budget: str | float | Budget | None, mesh: Mesh | None) -> Budget | str | float | None:
    """The expert budget a rank loads with: under --ep, the same budget over the rank's share of the experts."""
    if budget is None or mesh is None or mesh.split != "ep":
        return budget
    return dataclasses.replace(parse_budget(budget), share=(mesh.rank, mesh.world))
