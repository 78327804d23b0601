"""Which rank this process is, of how many: torch.distributed's default process group, started from the
environment that torchrun (or our own launcher, run.py) gives each rank: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT. gloo between CPU processes (loopback or TCP), NCCL between GPUs.

The collectives are torch.distributed's own; this file only names the three that tensor parallelism uses.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective waits for a rank before failing: a rank that died ends the job instead of hanging it.
TIMEOUT = timedelta(seconds=float(os.environ.get("HEARTHLM_DIST_TIMEOUT", "300")))


WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


def launched() -> bool:
    """True in a process started as one of several ranks (torchrun, or `--tp N`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Mesh:
    """This process's place in the group that splits one model: rank `rank` of `world`; `split`: how the model is
    split ("tp": inside each layer, routed experts by their width; "ep": the same with the experts divided among
    the ranks (experts.py); "pp": by layers (pipeline.py))."""

    rank: int
    world: int
    local_rank: int = 0
    split: str = "tp"

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def experts(self) -> str:
        """How a split inside the layers treats routed experts: "ep" divides them, "tp" splits each one's width."""
        return "ep" if self.split == "ep" else "tp"

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (it must be contiguous); returns it. The sum runs one type wider
        (float64 for float32, float32 for 16-bit) and is rounded once at the end. In `t`'s own type, each of the
        N - 1 additions would round, in an order that depends on the collective: at 4 ranks that moved the
        logits of a tiny Gemma 4 by 1.6e-5 from one process, where the wide sum stays under 1e-5. It doubles
        the bytes exchanged, which are small next to the weights each rank reads (docs/distributed.md)."""
        if self.world == 1:
            return t
        wide = t.to(WIDER.get(t.dtype, t.dtype))
        dist.all_reduce(wide)
        return t.copy_(wide) if wide is not t else t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `t` (all of one shape), concatenated along `dim` in rank order."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=dim)

    def shared_int(self, value: int | None) -> int:
        """Rank 0's `value` on every rank (drawn at random when None): a sampling seed all ranks agree on."""
        if value is None:
            value = random.randrange(2**31)
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def device(self, requested: str | None = None) -> torch.device:
        """The device this rank computes on: its own GPU (cuda:LOCAL_RANK) when CUDA is asked for or present."""
        if requested not in (None, "cuda", "gpu") or not torch.cuda.is_available():
            return torch.device(requested or "cpu")
        return torch.device("cuda", self.local_rank)


def init(device: str | None = None, split: str = "tp") -> Mesh:
    """Join the process group described by the environment (once per process) and return this rank's Mesh;
    `split` as in Mesh."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"not started as a distributed rank ({', '.join(missing)} unset): launch with "
            "`torchrun --nproc-per-node N -m hearthlm.distributed.run ...` or pass --tp N"
        )
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    mesh = Mesh(rank, world, local, split)
    if not dist.is_initialized():
        cuda = mesh.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(mesh.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return mesh


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
