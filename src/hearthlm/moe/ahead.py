"""Fetch ahead of the experts' compute, on the pool's fetch thread (off by default: benchmarks/moe.py says
when it pays). Hooks on the routers of the MoE layers:

- a layer's own routing, as soon as its router has run: its misses are read while the layer computes what
  comes between (Gemma 4 routes before its dense MLP) and its experts in order;
- with `prefetch`, a forecast of the next MoE layer's experts: its router applied to this layer's router input
  (the residual stream changes little from one layer to the next), its top-k by tokens routed (at batch 1,
  exactly its top-k). The missing ones are fetched into slots reserved until that layer's step. The actual
  routing still decides what runs, so a wrong forecast costs only the bytes it read, which the pool counts
  with the others and apart (prefetch_bytes).
"""

from __future__ import annotations

import re

import torch

from .pool import ExpertPool


class Ahead:
    def __init__(self, model: torch.nn.Module, pool: ExpertPool, prefetch: bool):
        from ..layers.moe import Experts

        routers = {}
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                layer = int(re.search(r"(?:^|\.)layers\.(\d+)\.", name)[1])
                routers[layer] = _router(model, name)
        self.pool, self.top_k = pool, model.config.experts_per_token
        layers = sorted(routers)
        following = dict(zip(layers, layers[1:])) if prefetch else {}
        self.hooks = [
            routers[layer].register_forward_hook(self._hook(layer, following.get(layer), routers)) for layer in layers
        ]
        pool.start_thread()

    def _hook(self, layer: int, following: int | None, routers: dict[int, torch.nn.Module]):
        experts, owned = self.pool.num_experts, self.pool.owned  # the pool serves `owned` (all but under --ep)

        def hook(module, args, output) -> None:
            counts = torch.bincount(output[0].reshape(-1), minlength=experts).tolist()
            active = [e for e in owned if counts[e]]
            self.pool.announce(layer, active, [counts[e] for e in active], output[0].shape[0])
            if following is not None:
                index, _ = routers[following].forward(args[0])  # .forward: not its own hook
                counted = torch.bincount(index.reshape(-1), minlength=experts)[owned.start : owned.stop]
                top = torch.topk(counted, min(self.top_k, len(owned)))
                predicted = sorted(owned.start + e for e, c in zip(top.indices.tolist(), top.values.tolist()) if c)
                self.pool.forecast(following, predicted, [(layer, e) for e in active])

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.pool.stop_thread()


def _router(model: torch.nn.Module, experts: str) -> torch.nn.Module:
    """The router of the Experts module named `experts`: its sibling, or a sibling of the module that wraps it
    on a rank of a split model (distributed/experts.py)."""
    owner = experts.rpartition(".")[0]
    while not hasattr(model.get_submodule(owner), "router"):
        owner = owner.rpartition(".")[0]
    return model.get_submodule(owner).router


def enable(model: torch.nn.Module, prefetch: bool = False) -> Ahead:
    """Fetch ahead for a model loaded with an expert budget (`prefetch`: the next layer's forecast too);
    `.close()` stops it."""
    pool = getattr(model, "expert_pool", None)
    if pool is None:
        raise ValueError("fetching ahead needs a model loaded with an expert budget")
    return Ahead(model, pool, prefetch)
