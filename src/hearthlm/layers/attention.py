"""Self-attention shared by every family, and the metadata a forward pass carries.

The layer computes q, k, v (with optional bias, q/k/v norms, RoPE) and hands them to the KV store in
`Batch.cache`, which owns both the storage and the attention call. Any store with the same `attend`
method (the contiguous cache here, a paged cache later) plugs in without touching the model files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..config import LayerSpec, ModelConfig
from .linear import Linear
from .norm import RMSNorm
from .rotary import apply_rotary


class KVStore(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """q [B, T, Hq, D]; k, v [B, T, Hkv, D] (None on KV-shared layers) -> [B, T, Hq, D]."""
        ...

    def decode_slots(self, layer: int) -> tuple | None:
        """For the fused CPU decode step (layers/decode_step.py): the cache K, V [Hkv, slots, D] that `layer`
        reads (its source layer's when KV-shared), the step's write slots [B] (None when shared), read slots
        [B * S] or None, read start (when the slots read are one run of a single row), S, and the key mask [B, S]
        or None. None: no fused step."""
        ...


@dataclass
class Batch:
    """Attention metadata for one forward pass, passed explicitly to every layer."""

    positions: torch.Tensor  # [B, T] absolute positions
    cache: KVStore
    # Hidden states wanted for only the last `outputs` positions (None: all). Layers that write no
    # cache (Gemma 4's KV-shared layers) then run on those positions only, or not at all for 0.
    outputs: int | None = None
    rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # key -> cos, sin


def rope_key(spec: LayerSpec) -> str:
    # A string: its hash is cached, where a frozen dataclass's is recomputed in Python on every lookup.
    return f"{spec.rope!r}:{spec.head_dim}"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, v_norm: bool = False):
        super().__init__()
        spec = cfg.layers[layer]
        self.layer = layer
        self.head_dim = spec.head_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.rope_key = rope_key(spec)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else spec.head_dim**-0.5
        self.shared = spec.kv_source is not None
        self.k_eq_v = spec.k_eq_v
        q_out = cfg.num_heads * spec.head_dim
        kv_out = 0 if self.shared else spec.num_kv_heads * spec.head_dim * (1 if spec.k_eq_v else 2)
        self.qkv = Linear(cfg.hidden_size, q_out + kv_out, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(spec.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, cfg.norm_eps) if cfg.qk_norm and not self.shared else None
        self.v_norm = RMSNorm(spec.head_dim, cfg.norm_eps, with_weight=False) if v_norm else None

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        cos, sin = batch.rope[self.rope_key]
        if T < cos.shape[1]:  # a layer that runs on the last T positions only (see Batch.outputs)
            cos, sin = cos[:, -T:], sin[:, -T:]
        qkv = self.qkv(x)
        q = qkv[..., : self.num_heads * D].view(B, T, self.num_heads, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rotary(q, cos, sin)
        k = v = None
        if not self.shared:
            kv = qkv[..., self.num_heads * D :].view(B, T, -1, D)
            k = kv[:, :, : self.num_kv_heads]
            v = k if self.k_eq_v else kv[:, :, self.num_kv_heads :]
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = self.v_norm(v)
            k = apply_rotary(k, cos, sin)
        out = batch.cache.attend(self.layer, q, k, v, self.scale)
        return self.o_proj(out.reshape(B, T, self.num_heads * D))
