"""One rank of tests/test_pipeline_parallel.py: loads each checkpoint it is given, keeps its pipeline stage and
records what the test compares with one process. Run as `python tests/pp_worker.py OUT NAME=FOLDER ...` under
hearthlm.distributed.run.launch; rank 0 saves OUT/NAME.pt, and every rank saves OUT/NAME.rankR.json (its stage and
the layers its KV caches hold)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.distributed import mesh as meshes
from hearthlm.engine.kv_cache import ContiguousKVCache, cache_layers
from hearthlm.engine.runner import forward_tokens

PROMPT = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]  # longer than the tiny models' sliding windows (8)
OTHER = [2, 4, 8, 16, 32, 64]


def cached_decode(llm: LLM, ids: list[int], prefill: int) -> tuple[torch.Tensor, list[int]]:
    """Logits of positions prefill-1 .. T-1 (a prefill of `prefill` tokens, then one token per step), and the
    layers the contiguous cache holds K/V for."""
    cache = ContiguousKVCache(cache_layers(llm.model, llm.config.layers), 1, len(ids), llm.dtype, llm.device)
    out = []
    for lo, hi in [(0, prefill)] + [(p, p + 1) for p in range(prefill, len(ids))]:
        h = forward_tokens(llm.model, cache, torch.tensor([ids[lo:hi]]), torch.tensor([lo]))
        out.append(llm.model.logits(h[:, -1])[0])
    return torch.stack(out), [i for i, k in cache.k.items() if k.numel()]


def record(llm: LLM) -> dict:
    """Everything the test compares: full logits, a batch, cached decode, and the engine's tokens."""
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True)
    decode, cached = cached_decode(llm, PROMPT, 7)
    return {
        "logits": llm.logits(PROMPT),
        "batch": llm.logits([PROMPT[:6], OTHER]),
        "decode": decode,
        "greedy": [c.token_ids for c in llm.generate([PROMPT, OTHER], greedy)],  # two rows, continuous batching
        "sampled": llm.generate(PROMPT, sampled)[0].token_ids,
        "cached": cached,
        "paged": sorted(llm.engine().cache.k),
    }


def main(out: Path, specs: list[str]) -> None:
    mesh = meshes.init(split="pp")
    for spec in specs:
        name, _, folder = spec.partition("=")
        llm = LLM(folder, dtype="float32", mesh=mesh)  # reads only its stage's layers
        result = record(llm)
        mine = {"stage": list(llm.model.pp_stage), "cached": result["cached"], "paged": result["paged"]}
        (out / f"{name}.rank{mesh.rank}.json").write_text(json.dumps(mine))
        if mesh.first:
            torch.save(result, out / f"{name}.pt")
    meshes.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
