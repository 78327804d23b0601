"""Routed experts: stacked weights [E, out, in] and a sort/gather dispatch.

Each expert runs once per step on every token routed to it (a batch shares one pass over each
expert's weights), which is what makes decode memory-bound on the active experts only. Under an expert
budget the weights come from `source` (moe/pool.py) instead of the stacked parameters, in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear, linear
from .mlp import act_mul, activation


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)
        activation(act)  # an unknown name fails here, at build time
        self.act = act
        self.num_experts = num_experts  # the experts this module holds: ids [first, first + num_experts)
        self.first = 0  # > 0 on a rank that holds a later share of the experts (distributed/experts.py)
        self.source = None  # moe.pool.LayerExperts when the experts live in a slow tier (an expert budget)

    def weights(self, active: list[int], counts: list[int], tokens: int):
        """(gate_up, down) of each expert in `active` (ids of this module's own experts), in order; `counts`: the
        tokens routed to each, of the step's `tokens`."""
        if self.source is not None:
            return self.source.weights([self.first + e for e in active], counts, tokens)
        return ((self.gate_up[e], self.down[e]) for e in active)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, H]; index, weight [N, K] (expert ids and their mixing weights) -> [N, H]: the sum over the
        experts this module holds (all of them, except under expert parallelism)."""
        top_k = index.shape[1]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        every = torch.bincount(flat, minlength=self.first + self.num_experts).tolist()
        counts = every[self.first : self.first + self.num_experts]
        active = [e for e, c in enumerate(counts) if c]
        out = torch.zeros_like(x)
        start = sum(every[: self.first])  # the picks of earlier experts come first in `order`
        for expert, (gate_up, down) in zip(active, self.weights(active, [counts[e] for e in active], x.shape[0])):
            count = counts[expert]
            picks = order[start : start + count]
            start += count
            tokens = picks // top_k
            h = linear(act_mul(linear(x[tokens], gate_up), self.act), down)
            h = h * weight.reshape(-1)[picks, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out


class SoftmaxTopKRouter(nn.Module):
    """Mixtral / Qwen3-MoE routing: softmax over all experts, keep the top k, optionally renormalize."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.proj = Linear(hidden, num_experts, bias=False)
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.proj(x).float(), dim=-1)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight.to(x.dtype)


class SparseMoE(nn.Module):
    """Router + experts, for families whose MoE block replaces the dense MLP."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, act: str, normalize: bool):
        super().__init__()
        self.router = SoftmaxTopKRouter(hidden, num_experts, top_k, normalize)
        self.experts = Experts(num_experts, hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        index, weight = self.router(flat)
        return self.experts(flat, index, weight).reshape(shape)
