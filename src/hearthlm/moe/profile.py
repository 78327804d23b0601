"""Expert usage profile: how often each expert of each MoE layer is routed to on a set of prompts.

`hearth moe-profile MODEL --prompts FILE` writes it next to the model (moe_profile.json in the folder,
NAME.moe_profile.json beside a .gguf); an expert budget then seeds its policy from it and starts with its
hottest experts resident, instead of learning them from cold misses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .policy import HALF_LIFE, Key

FILE = "moe_profile.json"


def profile_path(model: Path) -> Path:
    return model.with_name(f"{model.stem}.{FILE}") if model.suffix == ".gguf" else model / FILE


class Recorder:
    """Counts routed tokens per (layer, expert) while installed (forward pre-hooks on the Experts modules)."""

    def __init__(self, model: torch.nn.Module):
        from ..layers.moe import Experts

        self.counts: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.top_k = model.config.experts_per_token
        self.hooks = []
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                layer = int(re.search(r"(?:^|\.)layers\.(\d+)\.", name)[1])
                self.counts[layer] = torch.zeros(model.config.num_experts, dtype=torch.long)  # the router's ids
                self.hooks.append(module.register_forward_pre_hook(self._hook(layer)))
        self.first = min(self.counts) if self.counts else None

    def _hook(self, layer: int):
        def hook(module, args):
            index = args[1]
            if layer == self.first:
                self.tokens += index.shape[0]
            self.counts[layer] += torch.bincount(index.reshape(-1).cpu(), minlength=len(self.counts[layer]))

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def to_json(self, model_name: str) -> dict:
        layers = {str(k): v.tolist() for k, v in sorted(self.counts.items())}
        return {"model": model_name, "tokens": self.tokens, "top_k": self.top_k, "layers": layers}


def write(model: Path, data: dict) -> Path:
    from ..store import write_private

    path = profile_path(model)
    write_private(path, json.dumps(data) + "\n")  # which experts the profiled prompts used: owner-only
    return path


def load_prior(model: Path) -> dict[Key, float] | None:
    """The profile beside `model` as policy counts: each expert's share of the tokens, scaled to the count it
    would settle at if used at that rate (so that live usage outweighs it after about a half-life)."""
    path = profile_path(model)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        tokens = max(1, int(data["tokens"]))
        layers = {int(k): [float(c) for c in v] for k, v in data["layers"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a valid MoE profile ({e}); run `hearth moe-profile` again or delete it"
        ) from None
    steady = 1 / (1 - 0.5 ** (1 / HALF_LIFE))
    return {(layer, e): c / tokens * steady for layer, counts in layers.items() for e, c in enumerate(counts) if c}
