"""Gemma 4's vision tower (`vision_tower` of Gemma4ForConditionalGeneration).

Patches of 16x16 RGB pixels in [0, 1] (see multimodal/image.py) go through:
- a patch embedder: pixels mapped to [-1, 1], a linear layer, plus learned x and y position embeddings;
- an encoder of bidirectional layers with Gemma's sandwich norms, q/k norms, a weightless v norm, attention
  scale 1, and a 2-D RoPE (the first half of each head rotates by the patch's x, the second half by its y);
- a pooler that averages each 3x3 block of patches into one soft token (row-major over the pooled grid) and
  scales by sqrt(width) in float32;
- an optional standardisation ((h - bias) * scale, `standardize`).
Several images run as one padded batch; padding patches are masked out of attention and pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemma4_media import ClippedLinear, Norm, rms

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class VisionSpec:
    """The vision_config keys the tower reads; defaults are transformers' Gemma4VisionConfig defaults."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 16
    heads: int = 12
    kv_heads: int = 12
    head_dim: int = 64
    activation: str = "gelu_pytorch_tanh"
    eps: float = 1e-6
    theta: float = 100.0
    pool: int = 3
    patch: int = 16
    positions: int = 10 * 1024
    clipped: bool = False
    standardize: bool = False

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionSpec:
        rope = d.get("rope_parameters") or {}
        spec = cls(
            hidden=d.get("hidden_size", 768),
            intermediate=d.get("intermediate_size", 3072),
            layers=d.get("num_hidden_layers", 16),
            heads=d.get("num_attention_heads", 12),
            kv_heads=d.get("num_key_value_heads", 12),
            head_dim=d.get("head_dim") or d.get("hidden_size", 768) // d.get("num_attention_heads", 12),
            activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
            eps=d.get("rms_norm_eps", 1e-6),
            theta=float(rope.get("rope_theta", 100.0)),
            pool=d.get("pooling_kernel_size", 3),
            patch=d.get("patch_size", 16),
            positions=d.get("position_embedding_size", 10 * 1024),
            clipped=bool(d.get("use_clipped_linears", False)),
            standardize=bool(d.get("standardize", False)),
        )
        if spec.activation not in _ACTIVATIONS:
            raise ValueError(f"vision_config: hidden_activation {spec.activation!r} is not supported")
        return spec


def rope_2d(x: torch.Tensor, xy: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, P, H, D]; xy [B, P, 2] patch positions. The first D/2 channels rotate by x, the rest by y, each
    half in the rotate-half convention."""
    out = []
    for axis, part in enumerate(x.chunk(2, dim=-1)):
        angles = xy[..., axis, None].float() * inv_freq  # [B, P, D/4]
        cos, sin = angles.cos()[:, :, None].to(x.dtype), angles.sin()[:, :, None].to(x.dtype)
        a, b = part.chunk(2, dim=-1)
        out += [a * cos - b * sin, b * cos + a * sin]
    return torch.cat(out, dim=-1)


class VisionLayer(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.s = s
        lin = lambda i, o: ClippedLinear(i, o, s.clipped)  # noqa: E731
        self.q, self.k = lin(s.hidden, s.heads * s.head_dim), lin(s.hidden, s.kv_heads * s.head_dim)
        self.v, self.o = lin(s.hidden, s.kv_heads * s.head_dim), lin(s.heads * s.head_dim, s.hidden)
        self.q_norm, self.k_norm = Norm(s.head_dim, s.eps), Norm(s.head_dim, s.eps)
        self.gate, self.up, self.down = (
            lin(s.hidden, s.intermediate),
            lin(s.hidden, s.intermediate),
            lin(s.intermediate, s.hidden),
        )
        self.norms = nn.ModuleList(Norm(s.hidden, s.eps) for _ in range(4))  # input, post-attn, pre-mlp, post-mlp

    def attention(self, x: torch.Tensor, xy: torch.Tensor, keep: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        B, P, _ = x.shape
        s = self.s
        q = rope_2d(self.q_norm(self.q(x).view(B, P, s.heads, s.head_dim)), xy, inv_freq)
        k = rope_2d(self.k_norm(self.k(x).view(B, P, s.kv_heads, s.head_dim)), xy, inv_freq)
        v = rms(self.v(x).view(B, P, s.kv_heads, s.head_dim), s.eps)
        mask = keep[:, None, None, :]  # [B, 1, 1, P]: every patch sees every real patch
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=1.0, enable_gqa=True
        )
        return self.o(out.transpose(1, 2).reshape(B, P, -1))

    def forward(self, x: torch.Tensor, xy: torch.Tensor, keep: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        n_in, n_attn, n_pre, n_post = self.norms
        x = x + n_attn(self.attention(n_in(x), xy, keep, inv_freq))
        h = n_pre(x)
        h = self.down(F.gelu(self.gate(h), approximate=_ACTIVATIONS[self.s.activation]) * self.up(h))
        return x + n_post(h)


class VisionTower(nn.Module):
    def __init__(self, s: VisionSpec):
        super().__init__()
        self.s = s
        self.patch_in = nn.Parameter(torch.empty(s.hidden, 3 * s.patch**2), requires_grad=False)
        self.position_table = nn.Parameter(torch.empty(2, s.positions, s.hidden), requires_grad=False)
        self.layers = nn.ModuleList(VisionLayer(s) for _ in range(s.layers))
        if s.standardize:
            self.std_bias = nn.Parameter(torch.empty(s.hidden), requires_grad=False)
            self.std_scale = nn.Parameter(torch.empty(s.hidden), requires_grad=False)

    def forward(self, patches: torch.Tensor, xy: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """patches [B, P, 3 * patch^2] in [0, 1], xy [B, P, 2] (x, y) per patch, (-1, -1) for padding ->
        one float32 tensor [tokens, hidden] per image: its soft tokens before the projection."""
        keep = (xy >= 0).all(-1)  # [B, P]
        x = F.linear((2 * (patches - 0.5)).to(dtype), self.patch_in.to(dtype))
        at = xy.clamp(min=0)
        pos = self.position_table[0][at[..., 0]] + self.position_table[1][at[..., 1]]
        x = x + torch.where(keep[..., None], pos.to(dtype), 0)
        half = self.s.head_dim // 2  # each axis rotates half the head: D/4 frequencies
        inv_freq = 1.0 / self.s.theta ** (torch.arange(0, half, 2, device=x.device).float() / half)
        for layer in self.layers:
            x = layer(x, xy, keep, inv_freq)
        return [self._pool(x[b][keep[b]], xy[b][keep[b]]) for b in range(x.shape[0])]

    def _pool(self, h: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """One image's patch states [P, D] at positions xy [P, 2] -> soft tokens [P / k^2, D] in float32."""
        k = self.s.pool
        cols = int(xy[:, 0].max()) // k + 1
        token = xy[:, 0] // k + cols * (xy[:, 1] // k)  # pooled cell of every patch, row-major
        # The average as the reference takes it, a product with 1 / k^2 weights: a sum of h / k^2 rounds otherwise.
        weights = F.one_hot(token, h.shape[0] // (k * k)).float() / (k * k)  # [P, tokens]
        out = (weights.T @ h.float()) * self.s.hidden**0.5
        if self.s.standardize:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out

    def weight_names(self, prefix: str) -> dict[str, str]:
        """Our parameter names -> checkpoint names under `prefix` (e.g. 'model.vision_tower.')."""
        m = {
            "patch_in": f"{prefix}patch_embedder.input_proj.weight",
            "position_table": f"{prefix}patch_embedder.position_embedding_table",
        }
        if self.s.standardize:
            m |= {"std_bias": f"{prefix}std_bias", "std_scale": f"{prefix}std_scale"}
        norms = (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        for i, layer in enumerate(self.layers):
            p, hf = f"layers.{i}.", f"{prefix}encoder.layers.{i}."
            for ours, theirs in [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")]:
                m |= getattr(layer, ours).names(p + ours, f"{hf}self_attn.{theirs}")
            for ours in ("gate", "up", "down"):
                m |= getattr(layer, ours).names(p + ours, f"{hf}mlp.{ours}_proj")
            m[p + "q_norm.weight"] = f"{hf}self_attn.q_norm.weight"
            m[p + "k_norm.weight"] = f"{hf}self_attn.k_norm.weight"
            m |= {f"{p}norms.{j}.weight": f"{hf}{n}.weight" for j, n in enumerate(norms)}
        return m
