"""The victim: a process that answers one prompt at a time as `hearth run MODEL --expert-budget B` would, each
with a fresh load (the pool starts cold, the mapping is closed after), with the mitigations asked for.

It also records what attacker A4 sees, the experts each token was routed to, as per-layer counts. Attackers
A1 and A2 watch it from outside (probe.py, observers.py). Protocol: JSON lines on stdin,
  {"prompt": str, "max_tokens": int, "chat": bool, "budget": str, "mitigations": {...}}
  -> {"routing": [[count per expert] per MoE layer], "tokens": int}
Run as `python -m hearthlm.privacy.victim MODEL`.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch


class RoutingRecorder:
    """Per-layer counts of the experts tokens were routed to (forward pre-hooks on the Experts modules)."""

    def __init__(self, model: torch.nn.Module):
        from ..layers.moe import Experts

        self.counts: list[torch.Tensor] = []
        self.hooks = []
        for module in model.modules():
            if isinstance(module, Experts):
                counts = torch.zeros(model.config.num_experts, dtype=torch.long)  # the router's ids, all ranks' too
                self.counts.append(counts)
                self.hooks.append(module.register_forward_pre_hook(self._hook(counts)))

    @staticmethod
    def _hook(counts: torch.Tensor):
        def hook(module, args) -> None:
            counts.add_(torch.bincount(args[1].reshape(-1).cpu(), minlength=len(counts)))

        return hook

    def close(self) -> list[list[int]]:
        for h in self.hooks:
            h.remove()
        return [c.tolist() for c in self.counts]


def apply(llm, mitigations: dict):
    """Turn on the switches named in `mitigations` (private_reads, fixed_shape: bools; noise: a scale);
    -> what must be closed after the request. "defaults" is applied at load (`privacy_options`), not here."""
    from ..moe import private
    from ..moe.noise import RouterNoise

    pool = getattr(llm.model, "expert_pool", None)
    if mitigations.get("defaults"):
        mitigations = {k: v for k, v in mitigations.items() if k not in ("private_reads", "fixed_shape")}
    needs_pool = [k for k in ("private_reads", "fixed_shape") if mitigations.get(k)]
    if needs_pool and pool is None:
        raise ValueError(f"{', '.join(needs_pool)} act on an expert pool: load the model with an expert budget")
    if mitigations.get("private_reads"):
        private.private_reads(pool)
    if mitigations.get("fixed_shape"):
        private.fixed_shape(pool)
    scale = float(mitigations.get("noise") or 0)
    return RouterNoise(llm.model, scale) if scale else None


def privacy_options(mitigations: dict):
    """LLM's `privacy` for "defaults" (the CLI's: private reads auto, with fixed-shape if also named), else None."""
    from ..moe.options import PrivacyOptions

    if not mitigations.get("defaults"):
        return None
    reads = "on" if mitigations.get("private_reads") else "auto"
    return PrivacyOptions(reads, fixed_shape=bool(mitigations.get("fixed_shape")))


def answer(model: str, request: dict) -> dict:
    from ..api import LLM, SamplingParams

    mitigations = request.get("mitigations") or {}
    llm = LLM(model, expert_budget=request.get("budget"), moe_profile=False, privacy=privacy_options(mitigations))
    noise = apply(llm, mitigations)
    recorder = RoutingRecorder(llm.model)
    params = SamplingParams(max_tokens=int(request["max_tokens"]), temperature=0, ignore_eos=True)
    if request.get("chat") and llm.tokenizer is not None and llm.tokenizer.has_chat_template:
        out = llm.chat([{"role": "user", "content": request["prompt"]}], params)
    else:
        out = llm.generate(request["prompt"], params)[0]
    routing = recorder.close()
    if noise is not None:
        noise.close()
    pool = getattr(llm.model, "expert_pool", None)
    for tier in pool.tiers.values() if pool is not None else ():
        if getattr(tier, "private", None) is not None:
            tier.private.close()
    return {"routing": routing, "tokens": len(out.token_ids)}


def mapped(path: Path) -> bool:
    """Whether this process still maps `path` (a fresh load per request must leave nothing behind)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def serve(model: str) -> None:
    torch.set_num_threads(1)  # the audit runs beside its attackers on a small machine
    for line in sys.stdin:
        try:
            reply = answer(model, json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the audit, which raises it there
            reply = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
