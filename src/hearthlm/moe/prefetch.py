"""Prefetch: while an MoE layer runs, fetch on a thread the experts that the next MoE layer will likely use.

The forecast applies the next layer's router to this layer's router input: the residual stream changes little
from one layer to the next. It names the next layer's top-k experts by tokens routed (at batch 1, exactly its
top-k); the pool fetches the missing ones into slots reserved until that layer's step (pool.forecast). The
actual routing still decides what runs, so a wrong forecast costs only the bytes it fetched, which the pool
counts with the others (and apart, as prefetch_bytes). Off by default: see benchmarks/moe.py for when it pays.
"""

from __future__ import annotations

import re

import torch

from .pool import ExpertPool


class Prefetcher:
    def __init__(self, model: torch.nn.Module, pool: ExpertPool):
        from ..layers.moe import Experts

        routers = {}
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                layer = int(re.search(r"(?:^|\.)layers\.(\d+)\.", name)[1])
                routers[layer] = model.get_submodule(name.rpartition(".")[0]).router  # the Experts' sibling
        self.pool, self.top_k = pool, model.config.experts_per_token
        layers = sorted(routers)
        self.hooks = [
            routers[a].register_forward_hook(self._hook(a, b, routers[b])) for a, b in zip(layers, layers[1:])
        ]
        pool.start_thread()

    def _hook(self, layer: int, following: int, router: torch.nn.Module):
        def hook(module, args, output) -> None:
            busy = [(layer, e) for e in torch.unique(output[0]).tolist()]
            index, _ = router.forward(args[0])  # .forward: not its own hook
            counts = torch.bincount(index.reshape(-1), minlength=self.pool.num_experts)
            top = torch.topk(counts, self.top_k)
            predicted = sorted(e for e, c in zip(top.indices.tolist(), top.values.tolist()) if c)
            self.pool.forecast(following, predicted, busy)

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.pool.stop_thread()


def enable(model: torch.nn.Module) -> Prefetcher:
    """Prefetch the experts of a model loaded with an expert budget; `.close()` stops it."""
    pool = getattr(model, "expert_pool", None)
    if pool is None:
        raise ValueError("prefetch needs a model loaded with an expert budget")
    return Prefetcher(model, pool)
