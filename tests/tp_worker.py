"""One rank of tests/test_tensor_parallel.py: loads each checkpoint it is given, shards it over the ranks and
records what the test compares with one process. Run as `python tests/tp_worker.py OUT NAME=FOLDER[:QUANT[:EXPERTS[:BUDGET]]] ...`
under hearthlm.distributed.run.launch; rank 0 saves OUT/NAME.pt."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from split_checks import record

from hearthlm import LLM
from hearthlm.distributed import mesh as meshes
from hearthlm.layers.moe import Experts


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
