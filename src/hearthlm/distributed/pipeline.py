"""Pipeline parallelism: each rank keeps a contiguous run of the decoder layers (a stage) and frees the others.

For rank r of N, stage r is layers [a_r, b_r). The stages are balanced by the bytes of their layers' weights. A
cut never falls between a Gemma 4 KV-shared layer and the layer whose cache it reads: both must run where that
cache is.

A forward, on every rank (every rank runs the same program, as under tensor parallelism):
- every rank embeds the tokens and computes what the layers read beside the hidden state (RoPE tables, Gemma 4's
  per-layer embeddings, the attention Batch): all of it comes from token ids and positions that every rank has;
- a layer that another rank holds is a Skipped placeholder, which passes its input on unchanged;
- the first layer of stage r > 0 takes its input from rank r - 1 (torch.distributed recv), and the last layer of
  stage r < N - 1 sends its output to rank r + 1: one hidden state per cut;
- the last rank broadcasts its final hidden state (the last `outputs` positions, when the engine wants only those)
  so that every rank computes the same logits and samples the same tokens.

Every rank keeps the embedding table, the final norm and the LM head (Gemma ties the head to the table), and the
whole per-layer embedding table of Gemma 4. A rank's KV cache holds its own layers only: the layer specs it
builds its cache from (`kv_layers`) give the other layers no K/V heads, while the engine sizes its block pools
from the whole model's config, so every rank schedules the same blocks.
"""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..config import LayerSpec
from ..models.base import CausalLM
from .mesh import Mesh

if TYPE_CHECKING:
    from ..api import LLM

CANDIDATES = (2, 3, 4, 6, 8)  # rank counts suggested when the asked one cannot split the model


class PipelineError(ValueError):
    """The model cannot be cut into the asked number of stages; the message names counts that work."""


class Skipped(nn.Module):
    """A layer that another rank runs: its input passes on unchanged (the hidden state that matters arrives from
    the rank before, at the first layer of this rank's stage)."""

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x


def allowed_cuts(model: CausalLM) -> list[int]:
    """The layer indices a stage may start at (0 < c < layers): those that separate no KV-shared layer from its
    source layer (a cut c separates source s and layer i when s < c <= i)."""
    specs = model.config.layers
    pairs = [(s.kv_source, i) for i, s in enumerate(specs) if s.kv_source is not None]
    return [c for c in range(1, len(specs)) if not any(s < c <= i for s, i in pairs)]


def layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values() if isinstance(t, torch.Tensor))


def stage_bounds(model: CausalLM, world: int) -> list[tuple[int, int]]:
    """Each rank's layers [a, b), in rank order, balanced by weight bytes (the least sum of squared stage bytes);
    refused when the model has fewer allowed cuts than world - 1."""
    cuts = allowed_cuts(model)
    if world - 1 > len(cuts):
        raise PipelineError(_refusal(model, world, cuts))
    sizes = [layer_bytes(layer) for layer in model.layers]
    before = [sum(sizes[:c]) for c in range(len(sizes) + 1)]  # bytes of layers [0, c)
    best: dict[int, tuple[int, list[int]]] = {0: (0, [0])}  # stages so far ending at layer c: (cost, their edges)
    for r in range(world):
        ends = [len(sizes)] if r == world - 1 else cuts
        best = {
            end: min(
                (cost + (before[end] - before[start]) ** 2, [*edges, end])
                for start, (cost, edges) in best.items()
                if start < end
            )
            for end in ends
            if any(start < end for start in best)
        }
    edges = best[len(sizes)][1]
    return list(zip(edges, edges[1:]))


def _refusal(model: CausalLM, world: int, cuts: list[int]) -> str:
    n = len(model.config.layers)
    why = f"it has {n} layers" if len(cuts) == n - 1 else f"only {len(cuts)} of its {n - 1} cuts between layers keep"
    if len(cuts) < n - 1:
        shared = [i for i, s in enumerate(model.config.layers) if s.kv_source is not None]
        why += f" each KV-shared layer ({shared[0]}-{shared[-1]}) on the rank of the layer whose cache it reads"
    works = [1] + [k for k in CANDIDATES if k - 1 <= len(cuts)]
    return (
        f"{model.config.architecture} cannot be split into {world} pipeline stages: {why}; "
        f"rank counts that work: {', '.join(map(str, works))}"
    )


def stage_layer_specs(model: CausalLM, start: int, end: int) -> list[LayerSpec]:
    """The layer specs this rank's KV cache is built from: the other ranks' layers get no K/V heads (no cache)."""
    return [
        spec if start <= i < end else dataclasses.replace(spec, num_kv_heads=0)
        for i, spec in enumerate(model.config.layers)
    ]


def _receive(rank: int):
    """A pre-hook for the first layer of a stage: its input is rank - 1's output, of the shape of the input it
    replaces (every rank trims the hidden states at the same layers, so the shapes agree)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = torch.empty(args[0].shape, dtype=args[0].dtype, device=args[0].device)
        dist.recv(x, src=rank - 1)
        return (x, *args[1:])

    return hook


def _send(rank: int):
    """A hook for the last layer of a stage: its output goes on to rank + 1."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.contiguous()
        dist.send(out, dst=rank + 1)
        return out

    return hook


def pipelined_forward(self: CausalLM, ids: torch.Tensor, batch, *args) -> torch.Tensor:
    """The family's forward, then the last stage's hidden states broadcast to every rank (only the last
    `batch.outputs` positions when the caller wants only those)."""
    h = type(self).forward(self, ids, batch, *args)
    if batch.outputs is not None:
        h = h[:, h.shape[1] - batch.outputs :]
    h = h.contiguous()
    if h.numel():
        dist.broadcast(h, src=self.pp_mesh.world - 1)
    return h


class PipelineLoad:
    """How a rank of --pp loads (weights/loader.py's RankLoad): the stages are cut on the model's shapes before
    any read, the rank reads only its own layers' parameters (and the embedding, norm and head), and the other
    layers become Skipped as the loader passes them."""

    copies = False  # its layers may run from the mapped file as loaded

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def plan(self, model: CausalLM) -> None:
        model.pp_bounds = stage_bounds(model, self.mesh.world)  # split_model keeps these
        self.start, self.end = model.pp_bounds[self.mesh.rank]

    def wanted(self, layer: int | None) -> bool:
        return layer is None or self.start <= layer < self.end

    def share(self, name: str) -> None:
        return None  # a stage keeps its layers whole

    def took(self, name: str) -> None:
        raise AssertionError(f"{name}: a pipeline stage asks for no share")

    def layer_done(self, model: CausalLM, layer: int) -> None:
        if not self.start <= layer < self.end:
            model.layers[layer] = Skipped()

    def finish(self, model: CausalLM) -> None:
        split_model(model, self.mesh)


def split_model(model: CausalLM, mesh: Mesh) -> CausalLM:
    """Keep rank `mesh.rank`'s stage of a loaded model (in place): the other layers become Skipped, the stage's
    first layer receives from the rank before and its last layer sends to the rank after. A model that
    PipelineLoad loaded keeps the stages it was cut into then."""
    if getattr(model, "pp_mesh", None) is not None:
        return model  # split already, as it loaded (PipelineLoad)
    if hasattr(model, "tp_mesh"):
        raise PipelineError("this model is already split by tensor parallelism: use --tp or --pp, not both")
    bounds = getattr(model, "pp_bounds", None) or stage_bounds(model, mesh.world)
    if mesh.world == 1:
        return model
    start, end = bounds[mesh.rank]
    for i in range(len(model.layers)):
        if not start <= i < end:
            model.layers[i] = Skipped()
    if mesh.rank > 0:
        model.layers[start].register_forward_pre_hook(_receive(mesh.rank))
    if mesh.rank < mesh.world - 1:
        model.layers[end - 1].register_forward_hook(_send(mesh.rank))
    model.pp_mesh, model.pp_stage = mesh, (start, end)
    model.kv_layers = stage_layer_specs(model, start, end)
    model.forward = types.MethodType(pipelined_forward, model)
    return model


def split_llm(llm: LLM, mesh: Mesh) -> LLM:
    """Pipeline-parallel `llm` for this rank. Every rank must then make the same calls (generate, logits, ...) in
    the same order."""
    if llm.model.config.pooling is not None:
        raise PipelineError(f"{llm.path.name} is an embedding model: pipeline parallelism runs generative models")
    if getattr(llm, "draft", None) is not None:
        raise PipelineError("speculative decoding (--draft) is not available with --pp yet")
    split_model(llm.model, mesh)
    llm._engine = None  # an engine made before would hold a cache for every layer
    return llm
