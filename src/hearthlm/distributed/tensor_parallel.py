"""Tensor parallelism for every family (Llama, Mistral, Qwen2/3, Gemma 3, Gemma 4, and the MoE models: Mixtral,
Qwen3-MoE, Gemma 4 26B-A4B): each rank loads the model, then keeps its share of every large matrix and drops the
rest.

What is split, for rank r of N:
- attention: query heads in N runs; K/V heads in N runs too, or, with fewer K/V heads than ranks, each rank
  keeps the one K/V head its query heads read (replicated over N / Hkv ranks). qkv is column-split (its rows),
  o_proj row-split (its input columns), and one all-reduce sums o_proj's partial outputs;
- gated MLP: gate and up column-split, down row-split, one all-reduce;
- embedding and LM head: vocabulary rows in N runs; a token's row comes from the rank that holds it (the
  others add zeros in an all-reduce); the logits are all-gathered, and Gemma's final softcap applies after;
- routed experts: each one's width split like a dense MLP, or the experts divided among the ranks (Mesh.experts;
  experts.py), and one all-reduce; the router runs whole on every rank;
- everything else (norms, RoPE, Gemma 4's per-layer embeddings and layer scalars) stays whole on every rank:
  it is small, and it reads the full hidden state that every rank holds after each all-reduce.

The model keeps its forward: o_proj and down become RowParallelLinear, embed becomes VocabParallelEmbedding,
and the model's config becomes the rank's (its heads, K/V heads, MLP width), so the engine sizes each rank's
paged KV cache for that rank's K/V heads only. The fused CPU decode step (layers/decode_step.py) runs a whole
layer in one call, with no place for the all-reduces, so sharded layers take the module path.

Loading: `LLM(mesh=...)` reads each split weight's share alone (TensorParallelLoad, with the loader); what must load
whole splits as soon as its layer is filled. `shard_llm` splits a model already loaded whole. Both keep the shares
that `layer_shares` and `end_shares` define.
"""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from ..layers.attention import Attention
from ..layers.embedding import lookup
from ..layers.linear import Linear, linear
from ..layers.mlp import GatedMLP
from ..layers.moe import Experts, SparseMoE
from ..layers.softcap import softcap_
from ..models.base import CausalLM
from ..quant.tensor import QuantTensor
from ..weights.share import Share, column_unit, take
from .experts import MODES, expert_shares, shard_experts
from .experts import problems as experts_problems
from .mesh import Mesh
from .shards import even, set_weight, weight_of

if TYPE_CHECKING:
    from ..api import LLM

CANDIDATES = (2, 3, 4, 6, 8)  # rank counts suggested when the asked one cannot split the model


class TensorParallelError(ValueError):
    """The model cannot be split over the asked number of ranks; the message names counts that work."""


def head_ranges(heads: int, kv_heads: int, world: int, rank: int) -> tuple[int, int, int, int]:
    """Rank `rank`'s query heads [q0, q1) and K/V heads [k0, k1). With fewer K/V heads than ranks, each rank
    keeps the single K/V head its query heads share (world must then be a multiple of kv_heads)."""
    q0, q1 = even(heads, world, rank)
    if kv_heads % world == 0:
        k0, k1 = even(kv_heads, world, rank)
    else:
        k0 = rank // (world // kv_heads)
        k1 = k0 + 1
    return q0, q1, k0, k1


def vocab_range(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s vocabulary rows: runs of ceil(vocab / world), the last one possibly shorter."""
    chunk = -(-vocab // world)
    return min(vocab, rank * chunk), min(vocab, (rank + 1) * chunk)


def problems(model: CausalLM, world: int, experts: str = "tp") -> list[str]:
    """Why `model` cannot be split over `world` ranks (empty: it can); `experts`: how routed experts split
    ("tp": each expert's width, "ep": the experts themselves; distributed/experts.py)."""
    found = _end_problems(model, world)
    for i, layer in enumerate(model.layers):
        found += [f"layer {i}: {p}" for p in _layer_problems(layer, world, experts)]
    return found


def _end_problems(model: CausalLM, world: int) -> list[str]:
    """Why the vocabulary cannot be split over `world` ranks (empty: it can)."""
    cfg, found = model.config, []
    if cfg.vocab_size < world:
        found.append(f"its vocabulary ({cfg.vocab_size}) is smaller than the rank count")
    if not isinstance(model.embed.weight, (torch.Tensor, QuantTensor)):
        found.append(f"its embedding table is kept as {type(model.embed.weight).__name__}, which is not split")
    return found


def _routed(layer: nn.Module) -> tuple[nn.Module, Experts] | None:
    """(the module that holds them, the Experts) of a layer with routed experts: a SparseMoE in place of the MLP
    (Mixtral, Qwen3-MoE), or experts beside the dense MLP (Gemma 4)."""
    owner = layer.mlp if isinstance(layer.mlp, SparseMoE) else layer
    found = getattr(owner, "experts", None)
    return (owner, found) if isinstance(found, Experts) else None


def _layer_problems(layer: nn.Module, world: int, experts: str, name: str = "", taken: set[str] = frozenset()):
    """The problems of the parts of decoder layer `name` not split yet (a rank that loads layer by layer splits
    each part as soon as it is filled; a part in `taken` loaded as its share, its split made already)."""
    attn, mlp, found = layer.attn, layer.mlp, []
    if (routed := _routed(layer)) is not None and f"{_experts_name(layer, name)}.down" not in taken:
        found += experts_problems(routed[1], world, experts)
    if not isinstance(attn.o_proj, RowParallelLinear) and f"{name}.attn.o_proj.weight" not in taken:
        found += _attention_problems(attn, world)
    if not isinstance(mlp, GatedMLP) or isinstance(mlp.down, RowParallelLinear) or f"{name}.mlp.down.weight" in taken:
        return found
    inter = weight_of(mlp.down).shape[-1]
    if inter % world:
        found.append(f"the MLP width {inter} does not divide among {world} ranks")
    elif (unit := column_unit(weight_of(mlp.down))) > 1 and (inter // world) % unit:
        found.append(f"the MLP's down projection ({inter} columns) split {world} ways cuts its groups of {unit}")
    return found


def _experts_name(layer: nn.Module, name: str) -> str:
    """The parameter prefix of decoder layer `name`'s routed experts."""
    return f"{name}.mlp.experts" if isinstance(layer.mlp, SparseMoE) else f"{name}.experts"


def _attention_problems(attn: Attention, world: int) -> list[str]:
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if H % world:
        return [f"{H} attention heads do not divide among {world} ranks"]
    if Hkv % world and world % Hkv:
        return [f"{Hkv} K/V heads neither divide among {world} ranks nor replicate evenly over them"]
    if (unit := column_unit(weight_of(attn.o_proj))) > 1 and (H // world * D) % unit:
        return [f"o_proj's {H * D} input columns split {world} ways cut its quantization groups of {unit}"]
    return []


def check(model: CausalLM, world: int, experts: str = "tp") -> None:
    """Refuse a split that cannot be made, naming the problem and the rank counts that work."""
    if experts not in MODES:
        raise ValueError(f"experts split {experts!r}: give one of {', '.join(MODES)}")
    _refuse(model, world, lambda n: problems(model, n, experts))


def _refuse(model: CausalLM, world: int, problems_at, where: str = "", scope: str = "") -> None:
    """Raise TensorParallelError with the first of `problems_at(world)` and the rank counts with none (nothing
    when there are none); `where` prefixes the problem, `scope` says what the counts that work cover."""
    found = problems_at(world)
    if not found:
        return
    works = [1] + [n for n in CANDIDATES if n != world and not problems_at(n)]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise TensorParallelError(
        f"{model.config.architecture} cannot be split over {world} ranks: {where}{found[0]}{more}; "
        f"rank counts that work{scope}: {', '.join(map(str, works))}"
    )


class RowParallelLinear(nn.Module):
    """A Linear whose input columns are split over the ranks: each computes a partial sum, an all-reduce
    adds them, then the (unsplit) bias is added once."""

    def __init__(self, part: Linear, mesh: Mesh):
        """`part`: the Linear with the rank's columns of the weight, and the whole bias."""
        super().__init__()
        self.part = Linear(0, 0)
        set_weight(self.part, "weight", weight_of(part))
        self.bias = part._parameters.get("bias")
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mesh.all_reduce(self.part(x).contiguous())
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the token table (`rows`, split already); the others' rows arrive through an all-reduce
    (they add zeros)."""

    def __init__(self, rows: torch.Tensor | QuantTensor, start: int, end: int, mesh: Mesh):
        super().__init__()
        set_weight(self, "weight", rows)
        self.start, self.end, self.mesh = start, end, mesh

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, 0)
        rows = lookup(self.weight, local).float()  # float32 for the sum: exact, one term is non-zero
        rows = self.mesh.all_reduce(rows.masked_fill(~mine[..., None], 0).contiguous())
        return rows.to(self.weight.dtype) if isinstance(self.weight, torch.Tensor) else rows


def parallel_logits(self: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """CausalLM.logits over a vocabulary split: each rank's share, padded to one width, gathered, softcapped."""
    mesh, vocab = self.tp_mesh, self.config.vocab_size
    weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
    local = linear(self.norm(hidden), weight).float()
    chunk = -(-vocab // mesh.world)
    if local.shape[-1] < chunk:
        local = torch.nn.functional.pad(local, (0, chunk - local.shape[-1]))
    logits = mesh.all_gather(local, dim=-1)[..., :vocab]
    return softcap_(logits, self.config.final_softcap)


def layer_shares(layer: nn.Module, mesh: Mesh, index: int) -> dict[str, Share]:
    """What rank `mesh.rank` keeps of each split weight of decoder layer `index`, by parameter name, from the
    layer's whole shapes (on the meta device before a load, or loaded)."""
    name, attn, shares = f"layers.{index}", layer.attn, {}
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q0, q1, k0, k1 = head_ranges(H, Hkv, mesh.world, mesh.rank)
    rows = [(q0 * D, q1 * D)]  # qkv's rows: [q heads | k heads | v heads], v absent for k=v or KV-shared layers
    if not attn.shared:
        for base in (H * D,) if attn.k_eq_v else (H * D, (H + Hkv) * D):
            rows.append((base + k0 * D, base + k1 * D))
    shares |= _column_parallel(attn.qkv, f"{name}.attn.qkv", tuple(rows))
    shares[f"{name}.attn.o_proj.weight"] = Share(cols=(q0 * D, q1 * D))
    if isinstance(layer.mlp, GatedMLP):
        inter = weight_of(layer.mlp.down).shape[-1]
        lo, hi = even(inter, mesh.world, mesh.rank)
        shares |= _column_parallel(layer.mlp.gate_up, f"{name}.mlp.gate_up", ((lo, hi), (inter + lo, inter + hi)))
        shares[f"{name}.mlp.down.weight"] = Share(cols=(lo, hi))
    if (routed := _routed(layer)) is not None:
        shares |= expert_shares(routed[1], mesh, mesh.experts, _experts_name(layer, name))
    return shares


def _column_parallel(linear: Linear, name: str, rows: tuple[tuple[int, int], ...]) -> dict[str, Share]:
    """The rank's output rows of a column-parallel Linear: of its weight and, when it has one, its bias."""
    share = Share(rows=rows)
    return {f"{name}.weight": share} | ({f"{name}.bias": share} if linear.bias is not None else {})


def end_shares(model: CausalLM, mesh: Mesh) -> dict[str, Share]:
    """The rank's vocabulary rows of the token table and of an untied head."""
    share = Share(rows=(vocab_range(model.config.vocab_size, mesh.world, mesh.rank),))
    return {"embed.weight": share} | ({"lm_head.weight": share} if model.lm_head is not None else {})


def _cut(module: nn.Module, attr: str, name: str, shares: dict[str, Share], taken: set[str]) -> None:
    """Keep the rank's share of `module`'s weight `attr` (parameter `name`), unless it loaded as its share."""
    if name in shares and name not in taken:
        set_weight(module, attr, take(weight_of(module, attr), shares[name], name))


def _shard_attention(attn: Attention, mesh: Mesh, name: str, shares: dict[str, Share], taken: set[str]) -> None:
    attn.o_proj = _split_pair(attn.qkv, attn.o_proj, f"{name}.qkv", f"{name}.o_proj", mesh, shares, taken)
    q0, q1, k0, k1 = head_ranges(attn.num_heads, attn.num_kv_heads, mesh.world, mesh.rank)
    attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0


def _shard_mlp(mlp: GatedMLP, mesh: Mesh, name: str, shares: dict[str, Share], taken: set[str]) -> None:
    mlp.down = _split_pair(mlp.gate_up, mlp.down, f"{name}.gate_up", f"{name}.down", mesh, shares, taken)


def _split_pair(column: Linear, row: Linear, column_name: str, row_name: str, mesh: Mesh, shares: dict[str, Share],
                taken: set[str]) -> RowParallelLinear:  # fmt: skip
    """Cut a column-parallel Linear (weight and bias) and the row-parallel one it feeds; the latter comes back
    wrapped in its all-reduce."""
    for module, prefix, attr in (
        (column, column_name, "weight"),
        (column, column_name, "bias"),
        (row, row_name, "weight"),
    ):
        _cut(module, attr, f"{prefix}.{attr}", shares, taken)
    return RowParallelLinear(row, mesh)


def rank_config(cfg: ModelConfig, world: int, rank: int, experts: str = "tp") -> ModelConfig:
    """The config as this rank's modules see it: its query heads, K/V heads, MLP width and, when each expert is
    split, the experts' width (the router still picks among all experts)."""
    layers = []
    for spec in cfg.layers:
        _, _, k0, k1 = head_ranges(cfg.num_heads, spec.num_kv_heads, world, rank)
        layers.append(
            dataclasses.replace(spec, num_kv_heads=k1 - k0, intermediate_size=spec.intermediate_size // world)
        )
    moe_width = cfg.moe_intermediate_size // world if experts == "tp" else cfg.moe_intermediate_size
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, layers=layers, moe_intermediate_size=moe_width)


def shard_model(model: CausalLM, mesh: Mesh) -> CausalLM:
    """Keep rank `mesh.rank`'s share of a model loaded whole (in place) and wire in the collectives; routed experts
    split as `mesh.split` says ("ep": divided among the ranks; else each one by its width)."""
    if getattr(model, "tp_mesh", None) is not None:
        return model  # split already, as it loaded (TensorParallelLoad)
    check(model, mesh.world, mesh.experts)
    if mesh.world == 1:
        return model
    for i, layer in enumerate(model.layers):
        shard_layer(layer, mesh, i, layer_shares(layer, mesh, i))
    return _shard_ends(model, mesh, end_shares(model, mesh))


def _shard_ends(model: CausalLM, mesh: Mesh, shares: dict[str, Share], taken: set[str] = frozenset()) -> CausalLM:
    """Split the embedding and an untied head (`shares`, but for those in `taken`), and make the model the rank's:
    its all-gathered logits and its config."""
    _cut(model.embed, "weight", "embed.weight", shares, taken)
    start, end = shares["embed.weight"].rows[0]
    model.embed = VocabParallelEmbedding(model.embed.weight, start, end, mesh)
    if model.lm_head is not None:
        _cut(model.lm_head, "weight", "lm_head.weight", shares, taken)
    model.tp_mesh = mesh
    model.logits = types.MethodType(parallel_logits, model)
    model.config = rank_config(model.config, mesh.world, mesh.rank, mesh.experts)
    return model


def shard_layer(layer: nn.Module, mesh: Mesh, index: int, shares: dict[str, Share], taken: set[str] = frozenset(),
                experts: bool = True) -> None:  # fmt: skip
    """Keep the rank's share (`shares`, from layer_shares) of each part of decoder layer `index`: attention, the
    dense MLP and, with `experts`, routed experts. A weight in `taken` loaded as its share already."""
    name = f"layers.{index}"
    if not isinstance(layer.attn.o_proj, RowParallelLinear):
        _shard_attention(layer.attn, mesh, f"{name}.attn", shares, taken)
    if isinstance(layer.mlp, GatedMLP) and not isinstance(layer.mlp.down, RowParallelLinear):
        _shard_mlp(layer.mlp, mesh, f"{name}.mlp", shares, taken)
    routed = _routed(layer)
    if routed is not None and experts:
        owner, module = routed
        prefix = _experts_name(layer, name)
        owner.experts = shard_experts(module, mesh, mesh.experts, prefix, shares, taken)
    layer.__dict__["_decode_step"] = None  # the fused step has no place for the all-reduces


class TensorParallelLoad:
    """How a rank of --tp / --ep loads (weights/loader.py's RankLoad). Before anything is read, it works out its
    share of every split weight from the shapes; the loader then reads only that share of each (`share`, `took`),
    where it can. Where it cannot (a GGUF block tensor, a column split of a weight quantized per row while it loads,
    a split that cuts a quantization group: refused), the weight loads whole and the rank splits it as soon as its
    layer is filled, so that it holds at most one whole layer beside its share. Experts under a budget stay in the
    checkpoint and split at the end, once their pool exists."""

    copies = True  # the slices it keeps are copies: the loader drops each layer's file pages after it

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.shares: dict[str, Share] = {}
        self.taken: set[str] = set()

    def plan(self, model: CausalLM) -> None:
        check(model, self.mesh.world, self.mesh.experts)  # the shapes, before any read
        for i, layer in enumerate(model.layers):
            self.shares |= layer_shares(layer, self.mesh, i)
        self.shares |= end_shares(model, self.mesh)

    def wanted(self, layer: int | None) -> bool:
        return True

    def share(self, name: str) -> Share | None:
        return self.shares.get(name)

    def took(self, name: str) -> None:
        self.taken.add(name)

    def layer_done(self, model: CausalLM, layer: int) -> None:
        def whole(world: int) -> list[str]:  # quantization groups of what loaded whole, seen once it is filled
            return _layer_problems(model.layers[layer], world, self.mesh.experts, f"layers.{layer}", self.taken)

        _refuse(model, self.mesh.world, whole, f"layer {layer}: ", " for this layer")
        routed = _routed(model.layers[layer])
        budgeted = routed is not None and routed[1].down.is_meta  # left to a pool that does not exist yet
        shard_layer(model.layers[layer], self.mesh, layer, self.shares, self.taken, experts=not budgeted)

    def finish(self, model: CausalLM) -> None:
        """The embedding, the head, and experts under a budget (their pool exists now)."""
        mode = self.mesh.experts
        for i, layer in enumerate(model.layers):
            if (routed := _routed(layer)) is not None:
                owner, module = routed
                _refuse(model, self.mesh.world, lambda n: experts_problems(module, n, mode), f"layer {i}: ")  # noqa: B023
                owner.experts = shard_experts(module, self.mesh, mode, _experts_name(layer, f"layers.{i}"),
                                              self.shares, self.taken)  # fmt: skip
        _refuse(model, self.mesh.world, lambda n: _end_problems(model, n))
        _shard_ends(model, self.mesh, self.shares, self.taken)


def rank_load(mesh: Mesh):
    """What a rank of `mesh` loads, layer by layer (weights/loader.py's RankLoad)."""
    if mesh.split == "pp":
        from .pipeline import PipelineLoad

        return PipelineLoad(mesh)
    return TensorParallelLoad(mesh)


def shard_llm(llm: LLM, mesh: Mesh) -> LLM:
    """This rank's share of `llm`, as `mesh.split` says: its stage of layers under "pp" (pipeline.py), else its
    slices (tensor_parallel_llm). Every rank must then make the same calls (generate, logits, ...) in the same
    order."""
    if mesh.split == "pp":
        from .pipeline import split_llm

        return split_llm(llm, mesh)
    return tensor_parallel_llm(llm, mesh)


def tensor_parallel_llm(llm: LLM, mesh: Mesh) -> LLM:
    """Tensor-parallel `llm` for this rank: its model sharded, its config (and so its engine's KV cache) the
    rank's. Every rank must then make the same calls (generate, logits, ...) in the same order."""
    if llm.model.config.pooling is not None:
        raise TensorParallelError(f"{llm.path.name} is an embedding model: tensor parallelism runs generative models")
    shard_model(llm.model, mesh)
    llm.config = llm.model.config
    llm._engine = None  # an engine made before would hold a full-size cache
    return llm
