"""Gemma 4's multi-token-prediction drafters: the `google/gemma-4-*-it-assistant` checkpoints
(transformers' Gemma4AssistantForCausalLM, model_type "gemma4_assistant").

A drafter is a few Gemma 4 layers that own no K/V at all. What it reads from its target:
- its input: the target's (scaled) embedding of the last token, concatenated with the target's final-normed
  hidden state at the position before it, projected down to the drafter's width (`pre_projection`);
- its attention: queries only, over the target's K/V of the last layer of each type that stores K/V (full
  layers read all past positions, sliding layers the last `sliding_window + 1`); the query sits at the last
  token's position and stays there for every drafted token;
- its output: logits from the tied table (no soft-capping), and the next step's "hidden state", the drafter's
  normed output projected back to the target's width (`post_projection`).
The E2B/E4B drafters narrow the vocabulary: a centroid layer picks the top clusters of tokens
(`token_ordering` lists the tokens cluster by cluster) and only their logits are computed; every other token
gets the smallest computed logit minus one (per row here; transformers takes the minimum over the batch).

The layers are Gemma4Layer with every layer KV-shared (a q-only projection); `TargetKV` stands in for the
KV cache and hands each layer its type's target K/V.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, check_model, read_config
from ..engine.kv_cache import attend_cached
from ..layers.attention import Batch
from ..layers.embedding import rounded
from ..layers.linear import Linear, linear
from ..weights.mapping import Cat, Source, names_in
from ..weights.safetensors import Checkpoint, CheckpointError
from .base import CausalLM
from .gemma4 import Gemma4Model, _layer_types

ASSISTANT_TYPE = "gemma4_assistant"
TARGET = -1  # LayerSpec.kv_source of a drafter layer: it reads the target's K/V


@dataclass(frozen=True)
class AssistantConfig:
    text: ModelConfig  # the drafter's own layers, every one KV-shared with the target
    types: tuple[str, ...]  # "sliding_attention" | "full_attention" per layer
    backbone_hidden_size: int  # the target's hidden size
    ordered: bool  # the centroid-masked LM head
    num_centroids: int
    top_k: int  # centroids kept per token


def assistant_config(hf: dict[str, Any], where: str) -> AssistantConfig:
    """The drafter's config from its config.json; ConfigError for a folder that is not a Gemma 4 drafter."""
    if hf.get("model_type") != ASSISTANT_TYPE:
        raise ConfigError(
            f"{where}: not a Gemma 4 drafter (model_type is {hf.get('model_type')!r}, expected {ASSISTANT_TYPE!r}); "
            "give the folder of a google/gemma-4-*-assistant checkpoint, or use --draft lookup"
        )
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: the drafter's config has no text_config (its layers' config)")
    for key in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
        if text.get(key):
            raise ConfigError(f"{where}: a Gemma 4 drafter has no {key}, but its text_config sets {text[key]!r}")
    # Every drafter layer reads the target's K/V: read the layers as unshared, then point them at the target.
    flat = text | {"num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0, "final_logit_softcapping": None}
    cfg = Gemma4Model.config_from_hf(flat, "Gemma4AssistantForCausalLM", where)
    layers = [dataclasses.replace(s, kv_source=TARGET, k_eq_v=False) for s in cfg.layers]
    cfg = dataclasses.replace(cfg, layers=layers)
    check_model(cfg, where)
    ordered = bool(hf.get("use_ordered_embeddings", False))
    centroids, top_k = hf.get("num_centroids", 2048), hf.get("centroid_intermediate_top_k", 32)
    if ordered and (cfg.vocab_size % centroids or not 1 <= top_k <= centroids):
        raise ConfigError(
            f"{where}: the masked head needs vocab_size ({cfg.vocab_size}) divisible by num_centroids ({centroids}) "
            f"and 1 <= centroid_intermediate_top_k ({top_k}) <= num_centroids"
        )
    types = tuple(_layer_types(text, cfg.num_layers))
    return AssistantConfig(cfg, types, hf.get("backbone_hidden_size", 1536), ordered, centroids, top_k)


class CentroidHead(nn.Module):
    """The masked LM head: logits for the tokens of the `top_k` best-scoring centroids only."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        self.centroids = Linear(hidden, num_centroids, bias=False)
        self.order = nn.Parameter(torch.empty(vocab, dtype=torch.long), requires_grad=False)
        self.shape, self.top_k, self.vocab = (num_centroids, vocab // num_centroids), top_k, vocab

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """h [N, H], table [V, H] -> logits [N, V]"""
        top = self.centroids(h).topk(self.top_k, dim=-1).indices  # [N, top_k]
        ids = self.order.view(self.shape)[top].flatten(1)  # [N, top_k * tokens per centroid]
        picked = torch.einsum("nh,nkh->nk", h.float(), table[ids].float())
        out = (picked.min(dim=-1, keepdim=True).values - 1).expand(-1, self.vocab).clone()
        return out.scatter_(1, ids, picked)


@dataclass
class PagedKV:
    """The target's K/V of one layer as its paged cache holds them: K, V [Hkv, slots, D], the slots each row
    reads [b * S] (padding repeats a slot), and the key mask [b, S] (None: every key)."""

    K: torch.Tensor
    V: torch.Tensor
    slots: torch.Tensor
    S: int
    mask: torch.Tensor | None

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """K, V [b, Hkv, S, D] and the mask [b, 1, 1, S]."""
        b = self.slots.numel() // self.S
        keys = self.K.index_select(1, self.slots).view(self.K.shape[0], b, self.S, -1).transpose(0, 1)
        values = self.V.index_select(1, self.slots).view(self.V.shape[0], b, self.S, -1).transpose(0, 1)
        return keys, values, None if self.mask is None else self.mask[:, None, None]


class TargetKV:
    """The KV store of a drafter step, read only: layer type -> the target's K, V [B, Hkv, S, D] and key mask
    [B, 1, 1, S] (None: every key), or a PagedKV. On the CPU the fused decode step (layers/decode_step.py) reads
    a PagedKV's slots in place, one kernel call per drafter layer; elsewhere its rows are gathered once."""

    def __init__(self, kv: dict[str, tuple | PagedKV], types: tuple[str, ...]):
        self.kv, self.types = dict(kv), types

    def attend(self, layer: int, q: torch.Tensor, k, v, scale: float) -> torch.Tensor:
        kind = self.types[layer]
        if isinstance(self.kv[kind], PagedKV):
            self.kv[kind] = self.kv[kind].gather()
        keys, values, mask = self.kv[kind]
        return attend_cached(q, keys, values, mask, False, scale)

    def decode_slots(self, layer: int) -> tuple | None:
        """See attention.KVStore.decode_slots: a PagedKV on the CPU; None (module by module) otherwise."""
        paged = self.kv[self.types[layer]]
        if not isinstance(paged, PagedKV) or paged.K.device.type != "cpu":
            return None
        return paged.K, paged.V, None, paged.slots, 0, paged.S, paged.mask


class Gemma4Assistant(Gemma4Model):
    """The drafter. `embed` is its tied LM-head table (its input comes from the target)."""

    def __init__(self, ac: AssistantConfig):
        super().__init__(ac.text)
        self.assistant = ac
        hidden, back = ac.text.hidden_size, ac.backbone_hidden_size
        self.pre_projection = Linear(2 * back, hidden, bias=False)
        self.post_projection = Linear(hidden, back, bias=False)
        self.head = CentroidHead(hidden, ac.text.vocab_size, ac.num_centroids, ac.top_k) if ac.ordered else None

    def step(self, x: torch.Tensor, batch: Batch, project: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, 2 * target hidden] (target embedding, target hidden state) -> logits [B, V] float32 and the next
        step's hidden state [B, target hidden] (None unless `project`); `batch` holds the query positions and a
        TargetKV."""
        h = self.pre_projection(x.to(self.compute_dtype))[:, None]
        for layer in self.layers:
            h = layer(h, batch, None)
        h = self.norm(h[:, 0])
        table = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = self.head(h, table) if self.head is not None else linear(h, table).float()
        return logits, self.post_projection(h) if project else None

    def draft(
        self, target: CausalLM, last: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: TargetKV, k: int
    ) -> torch.Tensor:
        """k greedy draft tokens [B, k] after tokens `last` [B] at `positions` [B], from the target's normed hidden
        states [B, H] of the positions before them and its K/V."""
        batch = Batch(positions=positions[:, None], cache=kv)
        self.prepare(batch)
        scale = rounded(target.config.hidden_size**0.5, target.dtype)
        out = []
        for i in range(k):
            x = torch.cat([target.embed_tokens(last) * scale, hidden.to(target.compute_dtype)], dim=-1)
            logits, hidden = self.step(x, batch, project=i < k - 1)  # the last step's state is never read
            last = logits.argmax(-1)
            out.append(last)
        return torch.stack(out, dim=1)

    def weight_map(self, prefix: str) -> dict[str, Source]:
        m = super().weight_map(prefix)
        m["pre_projection.weight"] = "pre_projection.weight"
        m["post_projection.weight"] = "post_projection.weight"
        if self.head is not None:
            m["head.centroids.weight"] = "masked_embedding.centroids.weight"
            m["head.order"] = "masked_embedding.token_ordering"
        return m


def load_assistant(folder: Path, dtype: torch.dtype, device: torch.device) -> Gemma4Assistant:
    """A drafter checkpoint folder (config.json + safetensors, as transformers saves it), in `dtype`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json: give the folder of a google/gemma-4-*-assistant checkpoint")
    ac = assistant_config(read_config(folder / "config.json"), str(folder))
    with torch.device("meta"):
        model = Gemma4Assistant(ac)
    ckpt = Checkpoint(folder)
    mapping = model.weight_map("model.")
    missing = [n for s in mapping.values() for n in names_in(s) if n not in ckpt]
    if missing:
        raise CheckpointError(
            f"{folder}: the drafter checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}: "
            "the config and the weights disagree (download the checkpoint again)"
        )
    for name, source in mapping.items():
        _set(model, name, _read(ckpt, source, folder, name, model), dtype, device)
    model.dtype = dtype
    for module in model.modules():
        if hasattr(module, "after_load"):
            module.after_load()
    return model.eval()


def _read(ckpt: Checkpoint, source: Source, folder: Path, name: str, model: nn.Module) -> torch.Tensor:
    tensor = torch.cat([ckpt.get(p) for p in source.parts]) if isinstance(source, Cat) else ckpt.get(source)
    expected = tuple(model.get_parameter(name).shape)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{folder}: {names_in(source)} has shape {tuple(tensor.shape)}, but the config implies {expected}: "
            "the config and the weights disagree"
        )
    return tensor


def _set(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    owner, _, attr = name.rpartition(".")
    tensor = tensor.to(device=device, dtype=tensor.dtype if not tensor.is_floating_point() else dtype)
    setattr(model.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))
