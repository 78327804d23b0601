"""One rank of tests/test_tensor_parallel.py: loads each checkpoint it is given, shards it over the ranks and
records what the test compares with one process. Run as `python tests/tp_worker.py OUT NAME=FOLDER[:QUANT[:EXPERTS[:BUDGET]]] ...`
under hearthlm.distributed.run.launch; rank 0 saves OUT/NAME.pt."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.distributed import mesh as meshes
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens
from hearthlm.layers.moe import Experts

PROMPT = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]  # longer than the tiny models' sliding windows (8)
OTHER = [2, 4, 8, 16, 32, 64]


def cached_decode(llm: LLM, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits of positions prefill-1 .. T-1: a prefill of `prefill` tokens, then one token per step."""
    cache = ContiguousKVCache(llm.config.layers, 1, len(ids), llm.dtype, llm.device)
    out = []
    for lo, hi in [(0, prefill)] + [(p, p + 1) for p in range(prefill, len(ids))]:
        h = forward_tokens(llm.model, cache, torch.tensor([ids[lo:hi]]), torch.tensor([lo]))
        out.append(llm.model.logits(h[:, -1])[0])
    return torch.stack(out)


def record(llm: LLM) -> dict:
    """Everything the test compares: full logits, a batch, cached decode, and the engine's tokens."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True)
    return {
        "logits": llm.logits(PROMPT),
        "batch": llm.logits([PROMPT[:6], OTHER]),
        "decode": cached_decode(llm, PROMPT, 7),
        "greedy": [c.token_ids for c in llm.generate([PROMPT, OTHER], greedy)],  # two rows, continuous batching
        "sampled": llm.generate(PROMPT, sampled)[0].token_ids,
    }


def _width(experts: Experts) -> int | None:
    """Each expert's width on this rank (None under a budget: the pool holds them)."""
    return None if experts.source is not None else experts.down.shape[-1]


def main(out: Path, specs: list[str]) -> None:
    mesh = meshes.init()
    for spec in specs:
        name, _, rest = spec.partition("=")
        folder, quant, experts, budget = (rest.split(":") + ["", "", ""])[:4]
        split = dataclasses.replace(mesh, split=experts or "tp")
        llm = LLM(folder, dtype="float32", quant=quant or None, expert_budget=budget or None, mesh=split)
        result = record(llm)
        result["kv_heads"] = [s.num_kv_heads for s in llm.config.layers]
        # this rank's experts per MoE layer: (how many, their width)
        result["experts"] = {(m.num_experts, _width(m)) for m in llm.model.modules() if isinstance(m, Experts)}
        if (pool := getattr(llm.model, "expert_pool", None)) is not None:  # which experts it held, and its slots
            result["pool"] = {"owned": list(pool.owned), "slots": len(pool.slots), "held": {e for _, e in pool.where}}
        if mesh.first:
            torch.save(result, out / f"{name}.pt")
    meshes.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
