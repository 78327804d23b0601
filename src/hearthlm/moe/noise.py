"""Router noise: Laplace noise of scale b added to every router logit before the top-k (issue 23's last
mitigation). It changes which experts run, and so the outputs: unlike the other switches it trades quality
for privacy against whoever sees the routing itself (attacker A4), and it is off unless asked for.

Scale b is in router-logit units. On the demo MoE, b = 2 already brings a topic classifier on the routing to
chance and doubles perplexity (docs/privacy.md has the curve). This is a noise mechanism, not a
differential-privacy guarantee: the logits are not clipped, so no epsilon follows from b.
"""

from __future__ import annotations

import secrets

import torch


class RouterNoise:
    """Forward hooks on the routers' logit projections of every MoE layer of `model`; `.close()` removes them."""

    def __init__(self, model: torch.nn.Module, scale: float, seed: int | None = None):
        from ..layers.moe import Experts

        if scale < 0:
            raise ValueError(f"router noise scale {scale}: must be >= 0")
        self.scale = float(scale)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        projs = []
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                router = getattr(model.get_submodule(name.rpartition(".")[0]), "router", None)
                if router is None or not hasattr(router, "proj"):
                    raise ValueError(f"{name}: no router with a logit projection beside these experts")
                projs.append(router.proj)
        if not projs:
            raise ValueError("router noise needs a mixture-of-experts model")
        self.hooks = [p.register_forward_hook(self._hook) for p in projs]

    def _hook(self, module, args, logits: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return logits
        u = torch.rand(logits.shape, generator=self.generator, dtype=torch.float32) - 0.5  # (-0.5, 0.5)
        noise = -self.scale * torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, b) by inversion
        return logits + noise.to(logits.device, logits.dtype)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
