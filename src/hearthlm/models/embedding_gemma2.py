"""EmbeddingGemma 2 (EmbeddingGemma2Model and its text backbone EmbeddingGemma2TextModel): Gemma 4's layers as an
encoder that maps text to one vector.

What it shares with Gemma 4 (models/gemma4.py, reused as is): sandwich norms, q/k/v norms with unit attention scale,
sliding and full layers each with its own head size, KV heads and RoPE, the per-layer-input block after the MLP and
the layer scalar. What is its own:
- attention is bidirectional on every layer; a sliding layer sees keys within `sliding_window` positions on either
  side (a radius, inclusive), not a causal window;
- per-layer inputs come from the embeddings alone: a projection scaled by hidden ** -0.5 and RMS-normed per layer,
  with no token table and no blending with one;
- no KV sharing, k = v, experts or double-wide MLP; no LM head: after the final norm, `embedding_projection` maps
  every token to `embedding_dim`, and the tokens are mean-pooled and L2-normalised (embeddings/).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..weights.mapping import Source
from .base import CausalLM
from .gemma4 import Gemma4Layer, Gemma4Model

# transformers' EmbeddingGemma2TextConfig defaults where they differ from what models/gemma4.py assumes.
DEFAULTS: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 262_144,
    "hidden_size_per_layer_input": 512,
    "embedding_dim": 768,
    "sliding_window": 512,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
}
# Gemma 4 features this family has none of: what the Gemma 4 reader must assume.
_NOT_HERE = {
    "num_kv_shared_layers": 0,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "final_logit_softcapping": None,
    "use_bidirectional_attention": None,
    "tie_word_embeddings": True,
}
# Our per-layer-input block parameter -> the checkpoint's, under layers.{i}.ple_block.
_PLE_BLOCK = {
    "ple_gate.weight": "per_layer_input_gate.weight",
    "ple_out.weight": "per_layer_projection.weight",
    "ple_norm.weight": "post_per_layer_input_norm.weight",
}


def _per_layer_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Full layers' head size and KV heads as transformers saves them (`per_layer_config`), built from
    `global_head_dim` / `num_global_key_value_heads` (defaults 512 / 1) when config.json states only those."""
    if "per_layer_config" in hf:
        return hf["per_layer_config"]
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    full = {"head_dim": hf.get("global_head_dim", 512), "num_key_value_heads": hf.get("num_global_key_value_heads", 1)}
    return {str(i): full for i, t in enumerate(types) if t == "full_attention" or i == n - 1}


class ProjectedPLE(nn.Module):
    """Per-layer inputs from the (scaled) embeddings alone: [B, T, H] -> [B, T, L, P]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, P = cfg.num_layers, cfg.ple_dim
        self.proj = Linear(cfg.hidden_size, L * P, bias=False)
        self.norm = RMSNorm(P, cfg.norm_eps)
        self.shape = (L, P)
        self.proj_scale = cfg.hidden_size**-0.5

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        # `ids` unused: the signature Gemma4Model.forward calls the PLE with.
        return self.norm((self.proj(embeds) * self.proj_scale).view(*embeds.shape[:-1], *self.shape))


class EmbeddingGemma2(Gemma4Model):
    keep_storage_dtype: set[str] = set()

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        hf = DEFAULTS | hf
        if not hf["hidden_size_per_layer_input"]:
            raise ConfigError(f"{where}: hidden_size_per_layer_input must be positive (every layer takes a PLE input)")
        hf = hf | _NOT_HERE | {"per_layer_config": _per_layer_config(hf)}
        cfg = Gemma4Model.config_from_hf(hf, arch, where)
        return dataclasses.replace(
            cfg,
            family="embedding_gemma2",
            ple_vocab_size=0,
            bidirectional=True,
            pooling="mean",
            embedding_dim=int(hf["embedding_dim"]),
        )

    def __init__(self, cfg: ModelConfig):
        CausalLM.__init__(self, cfg)  # not Gemma4Model's: its PLE holds a token table this family lacks
        self.layers = nn.ModuleList(Gemma4Layer(cfg, i) for i in range(cfg.num_layers))
        self.ple = ProjectedPLE(cfg)
        self.first_shared = cfg.num_layers  # no KV-shared layers
        self.projection = Linear(cfg.hidden_size, cfg.embedding_dim, bias=False)

    def embedding_states(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("EmbeddingGemma 2 is an embedding model: it has no LM head and computes no logits")

    def weight_map(self, prefix: str) -> dict[str, Source]:
        m = super().weight_map(prefix)
        del m["ple.table"]
        m["ple.proj.weight"] = f"{prefix}ple.per_layer_model_projection.weight"
        m["ple.norm.weight"] = f"{prefix}ple.per_layer_projection_norm.weight"
        m["projection.weight"] = f"{prefix}embedding_projection.weight"
        for i in range(self.config.num_layers):
            for ours, theirs in _PLE_BLOCK.items():
                m[f"layers.{i}.{ours}"] = f"{prefix}layers.{i}.ple_block.{theirs}"
        return m
