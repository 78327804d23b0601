"""One rank of tests/test_pipeline_parallel.py: loads each checkpoint it is given, keeps its pipeline stage and
records what the test compares with one process. Run as `python tests/pp_worker.py OUT NAME=FOLDER[:BUDGET] ...` under
hearthlm.distributed.run.launch; rank 0 saves OUT/NAME.pt, and every rank saves OUT/NAME.rankR.json (its stage and
the layers its KV caches hold)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from split_checks import record

from hearthlm import LLM
from hearthlm.distributed import mesh as meshes


def main(out: Path, specs: list[str]) -> None:
    mesh = meshes.init(split="pp")
    for spec in specs:
        name, _, rest = spec.partition("=")
        folder, _, budget = rest.partition(":")
        llm = LLM(folder, dtype="float32", mesh=mesh, expert_budget=budget or None)  # reads only its stage's layers
        result = record(llm)
        mine = {"stage": list(llm.model.pp_stage), "cached": result["cached"], "paged": result["paged"]}
        if (pool := getattr(llm.model, "expert_pool", None)) is not None:  # the layers its experts came from
            mine["pool"] = {"layers": sorted({layer for layer, _ in pool.where}), "slots": len(pool.slots)}
        (out / f"{name}.rank{mesh.rank}.json").write_text(json.dumps(mine))
        if mesh.first:
            torch.save(result, out / f"{name}.pt")
    meshes.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
