"""Serving a model split over ranks (--tp, --ep or --pp): rank 0 runs the server and the engine, the other ranks
follow it.

Only rank 0 receives HTTP requests, schedules and samples. The others (followers) load the same model, keep
their share (tensor_parallel.py, pipeline.py) and build the same Engine, so that their paged KV cache has the same pools for
their K/V heads, but they never schedule. Rank 0 mirrors to them what touches a rank's cache or runs a
collective, at the runner level: the blocks the cache zeroes, the cache's `begin` and the model's forward (one
message per forward), and whether `model.logits(h[:, -1])` follows. Followers run the same forward on their own
cache and model; its all-reduces (or a pipeline's sends and broadcast) pair with rank 0's, and the hidden state is
the same on every rank after them.

The engine keeps its code: `Leader` wraps rank 0's cache and model in place. What it cannot mirror is refused:
a forward outside the paged engine step (embeddings, scoring), media spans and speculative verification.

Messages go over a gloo group of their own (broadcast_object_list), whose timeout is long: a follower waits for
the next request however long the server idles, while the model's collectives keep HEARTHLM_DIST_TIMEOUT.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..layers.attention import Batch
from .mesh import Mesh

if TYPE_CHECKING:
    from ..engine.engine import Engine

IDLE = timedelta(days=365)  # how long a follower waits for rank 0's next message (an idle server)
REFUSED = "not available with --tp, --ep or --pp"


@dataclass
class Forward:
    """One forward of rank 0's engine, as the followers repeat it."""

    zeros: list[tuple[int | None, list[int]]]  # blocks handed out since the last forward: (window, blocks)
    positions: torch.Tensor  # [b, T], on the CPU
    starts: list[int]
    tables: list[dict[int | None, list[int | None]]]
    spans: list | None
    ids: torch.Tensor  # [b, T], on the CPU
    outputs: int | None
    logits: bool  # model.logits(h[:, -1]) follows


@dataclass
class Stop:
    reason: str = "the server stopped"


@dataclass
class Channel:
    """Rank 0's messages to the followers: a gloo group of all ranks, made by every rank at the same point."""

    group: object = field(default_factory=lambda: dist.new_group(backend="gloo", timeout=IDLE))

    def send(self, message: Forward | Stop) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Forward | Stop:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class Leader:
    """Rank 0's engine, mirrored: its cache's `zero` and `begin`, its model's forward and `logits` are wrapped
    (instance attributes shadowing the methods), so that every forward reaches the followers first."""

    def __init__(self, engine: Engine, channel: Channel):
        self.engine, self.channel = engine, channel
        self.cache, self.model = engine.cache, engine.llm.model
        self._zero, self._begin = self.cache.zero, self.cache.begin
        self._forward, self._logits = self.model.forward, self.model.logits
        self._add = engine.add_request
        self.zeros: list[tuple[int | None, list[int]]] = []
        self.begun: tuple | None = None
        self.logits_due = False
        self.stopped = False
        self.cache.zero, self.cache.begin = self.zero, self.begin
        self.model.forward, self.model.logits = self.forward, self.logits
        engine.add_request = self.add_request

    def add_request(self, request_id, prompt, params, media=None, client=None) -> None:
        if media is not None and media.spans:
            raise ValueError(f"images and audio are {REFUSED} yet: send text only to a tensor-parallel server")
        if params.speculative:
            raise ValueError(f"speculative decoding is {REFUSED} yet: leave `speculative` unset or false")
        self._add(request_id, prompt, params, media, client=client)

    def zero(self, window: int | None, blocks: list[int]) -> None:
        if blocks:  # sent with the next forward: a block is read only by forwards
            self.zeros.append((window, list(blocks)))
        self._zero(window, blocks)

    def begin(self, positions, starts, tables, spans=None) -> None:
        self.begun = (positions, list(starts), [dict(t) for t in tables], spans)
        self._begin(positions, starts, tables, spans=spans)

    def forward(self, ids: torch.Tensor, batch: Batch, splice=None) -> torch.Tensor:
        mirrored = batch.cache is self.cache and self.begun is not None and splice is None
        if not mirrored or batch.outputs not in (0, 1) or self.logits_due or self.stopped:
            self.begun = None
            raise ValueError(
                f"embeddings, scoring and media are {REFUSED}: only the engine's text generation is mirrored to "
                "the other ranks"
            )
        positions, starts, tables, spans = self.begun
        self.begun, zeros, self.zeros = None, self.zeros, []
        self.logits_due = batch.outputs == 1  # run_paged: outputs 1 exactly when it asks for logits
        self.channel.send(Forward(zeros, positions.cpu(), starts, tables, spans, ids.cpu(), batch.outputs,
                                  self.logits_due))  # fmt: skip
        return self._forward(ids, batch)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.logits_due:
            raise ValueError(f"logits outside the engine's step are {REFUSED}")
        self.logits_due = False
        return self._logits(hidden)

    def stop(self) -> None:
        """Tell the followers to end (once); a follower that is gone already is no error here."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.channel.send(Stop())
        except Exception as e:  # a dead rank: the launcher reports it
            print(f"hearth serve: could not tell the other ranks to stop: {e}", file=sys.stderr)


def lead(engine: Engine) -> Leader:
    """Rank 0: mirror `engine`'s forwards to the followers (every rank makes its Channel here)."""
    return Leader(engine, Channel())


@torch.inference_mode()
def follow(engine: Engine, channel: Channel) -> None:
    """A follower's loop: repeat rank 0's forwards on this rank's cache and model until told to stop."""
    cache, model, device = engine.cache, engine.llm.model, engine.llm.device
    gathers = getattr(model, "tp_mesh", None) is not None  # a pipeline's logits need no other rank: skip them
    while True:
        message = channel.receive()
        if isinstance(message, Stop):
            return
        for window, blocks in message.zeros:
            cache.zero(window, blocks)
        positions, ids = message.positions.to(device), message.ids.to(device)
        cache.begin(positions, message.starts, message.tables, spans=message.spans)
        h = model(ids, Batch(positions=positions, cache=cache, outputs=message.outputs))
        if message.logits and gathers:
            model.logits(h[:, -1])  # its all-gather pairs with rank 0's; the result is rank 0's to use


def serve_follower(mesh: Mesh, model: str, dtype: str | None = None, quant: str | None = None,
                   max_running: int | None = None, kv_blocks: int | None = None, device: str | None = None,
                   expert_budget: str | None = None, privacy=None) -> int:  # fmt: skip
    """A rank other than 0 of `hearth serve --tp N`: load and shard the model as rank 0 does (server.load), build
    the same Engine, then follow. Ctrl-C is rank 0's to handle: it stops the followers when it ends."""
    from ..api import LLM
    from ..engine.engine import Engine
    from .mesh import close

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    llm = LLM(model, dtype=dtype, quant=quant, device=str(mesh.device(device)), expert_budget=expert_budget,
              privacy=privacy, mesh=mesh)  # fmt: skip
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json: the server needs one to read text")
    engine = Engine(llm, max_running=max_running, kv_blocks=kv_blocks, draft=None)
    follow(engine, Channel())
    close()
    return 0


def check_serve(model: str | None, draft: str | None, expert_budget: str | None, split: str = "tp") -> None:
    """Refuse, before any rank starts, what `hearth serve --tp` cannot mirror yet."""
    if model is None:
        raise ValueError(
            f"hearth serve --{split} N needs a MODEL: a server split over ranks serves one model, loaded at start"
        )
    if draft is not None:
        raise ValueError(f"--draft is {REFUSED} yet: speculative verification is not mirrored to the other ranks")
    if expert_budget is not None and split == "tp":
        raise ValueError(
            "--expert-budget is not available with --tp: its pool reads whole experts; divide the experts among the ranks with "
            "--ep N instead"
        )
