"""Gemma 4's audio tower (`audio_tower` of E2B / E4B): a conformer over log-mel features.

- Subsampling: two 3x3 stride-2 convolutions over (time, mel), each followed by a LayerNorm over channels
  and ReLU, then a linear layer: 4x fewer frames (one token per 40 ms of 10 ms frames).
- Conformer layers: half-step feed-forward, local self-attention, a light causal depthwise convolution,
  another half-step feed-forward, a final norm; values are clamped to `gradient_clipping` around each norm.
- Local attention: each frame attends to itself and the `attention_context_left - 2` frames before it (none
  after, with the released configs), with a learned per-dimension query scale, a relative-position term from
  sinusoids of the distance, and a tanh logit cap; computed in the reference's blocks of
  `attention_chunk_size` queries, so that it rounds as the reference does.
- An output projection with bias.
Clips run as one padded batch; `lengths` masks the padding out of the convolutions and attention, so a clip's
result does not depend on what it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemma4_media import ClippedLinear, Norm, mirrored_names


@dataclass(frozen=True)
class AudioSpec:
    """The audio_config keys the tower reads; defaults are transformers' Gemma4AudioConfig defaults."""

    hidden: int = 1024
    layers: int = 12
    heads: int = 8
    activation: str = "silu"
    channels: tuple[int, int] = (128, 32)
    conv_kernel: int = 5
    residual_weight: float = 0.5
    context_left: int = 13
    context_right: int = 0
    chunk: int = 12
    logit_cap: float = 50.0
    invalid_logit: float = -1.0e9
    clipped: bool = True
    eps: float = 1e-6
    clip: float = 1e10
    out_dims: int = 1536

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AudioSpec:
        spec = cls(
            hidden=d.get("hidden_size", 1024),
            layers=d.get("num_hidden_layers", 12),
            heads=d.get("num_attention_heads", 8),
            activation=d.get("hidden_act", "silu"),
            channels=tuple(d.get("subsampling_conv_channels", (128, 32))),
            conv_kernel=d.get("conv_kernel_size", 5),
            residual_weight=d.get("residual_weight", 0.5),
            context_left=d.get("attention_context_left", 13),
            context_right=d.get("attention_context_right", 0),
            chunk=d.get("attention_chunk_size", 12),
            logit_cap=d.get("attention_logit_cap", 50.0),
            invalid_logit=d.get("attention_invalid_logits_value", -1.0e9),
            clipped=bool(d.get("use_clipped_linears", True)),
            eps=d.get("rms_norm_eps", 1e-6),
            clip=d.get("gradient_clipping", 1e10),
            out_dims=d.get("output_proj_dims", 1536),
        )
        if spec.activation != "silu":
            raise ValueError(f"audio_config: hidden_act {spec.activation!r} is not supported (silu)")
        if spec.context_right:
            raise ValueError("audio_config: attention_context_right > 0 is not supported")
        return spec

    @property
    def window(self) -> int:
        """Frames each frame attends to: itself and window - 1 before it."""
        return self.context_left - 1

    @property
    def context(self) -> int:
        """Keys per block of `chunk` queries in the reference's blocked attention."""
        return self.chunk + self.context_left - 1


def _clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    limit = min(limit, torch.finfo(x.dtype).max)
    return x.clamp(-limit, limit)


class Subsample(nn.Module):
    """One 3x3 stride-2 convolution, LayerNorm over channels (no bias), ReLU."""

    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T, F], keep [B, T] -> [B, C', T/2, F/2], keep [B, T/2]"""
        x = self.conv(x * keep[:, None, :, None].to(x.dtype))
        # Contiguous, as the reference leaves it: a channels-last input would send the next convolution down
        # another algorithm, with other rounding.
        return F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()), keep[:, ::2]


class SubsampleProjection(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.layer0 = Subsample(1, s.channels[0], s.eps)
        self.layer1 = Subsample(s.channels[0], s.channels[1], s.eps)
        # The reference sizes this from the channel count: the mel axis (128 bins -> 32) must equal channels[0] / 4.
        self.input_proj_linear = nn.Linear((s.channels[0] // 4) * s.channels[1], s.hidden, bias=False)

    def forward(self, feats: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, keep = self.layer0(feats[:, None], keep)
        x, keep = self.layer1(x, keep)
        B, _, T, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(B, T, -1)), keep


class FeedForward(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.s = s
        self.ffw_layer_1 = ClippedLinear(s.hidden, 4 * s.hidden, s.clipped)
        self.ffw_layer_2 = ClippedLinear(4 * s.hidden, s.hidden, s.clipped)
        self.pre_layer_norm, self.post_layer_norm = Norm(s.hidden, 1e-6), Norm(s.hidden, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_layer_norm(_clamp(x, self.s.clip))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clamp(h, self.s.clip)) * self.s.residual_weight


class LocalAttention(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.s = s
        self.head_dim = s.hidden // s.heads
        for name in ("q_proj", "k_proj", "v_proj", "post"):
            setattr(self, name, ClippedLinear(s.hidden, s.hidden, s.clipped))
        self.relative_k_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim), requires_grad=False)

    def distances(self, device: torch.device) -> torch.Tensor:
        """Sinusoids of the query-key distance: [context // 2 + 1, hidden], row r for distance context // 2 - r
        ([sin | cos])."""
        n = self.s.hidden // 2
        inv = torch.exp(torch.arange(n, device=device) * -(math.log(10_000.0) / max(n - 1, 1)))
        t = torch.arange(self.s.context // 2, -1, -1, device=device)[:, None] * inv[None, :]
        return torch.cat((t.sin(), t.cos()), dim=-1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [B, T, H]; keep [B, T] (False on padding) -> [B, T, H]

        The reference's blocked order of operations: queries in blocks of `chunk` frames, each block against a
        context of `context` keys (its own frames and the `context_left - 1` before them), the relative-position
        term for all distances then shifted into place, the softmax over the whole context with the keys outside
        the window masked. Computing only the window's keys gives other float32 rounding (softmax and matmul
        reductions of another length), which the text model amplifies past the parity bound."""
        B, T, _ = x.shape
        C, Hh, D = self.s.chunk, self.s.heads, self.head_dim
        N = -(-T // C)  # blocks
        q = self.q_proj(x).float().view(B, T, Hh, D) * (D**-0.5 / math.log(2)) * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).float().view(B, T, Hh, D) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).float().view(B, T, Hh, D)
        q = F.pad(q, (0, 0, 0, 0, 0, N * C - T)).reshape(B, N, C, Hh, D).permute(0, 3, 1, 2, 4)  # [B, Hh, N, C, D]
        k, v = (self._context(t).permute(0, 3, 1, 2, 4) for t in (k, v))  # [B, Hh, N, S, D]
        rel = self.relative_k_proj(self.distances(x.device).to(x.dtype)).view(-1, Hh, D).float()  # [R, Hh, D]
        content = q @ k.transpose(-1, -2)  # [B, Hh, N, C, S]
        position = (q.reshape(B, Hh, N * C, D) @ rel.permute(1, 2, 0)).view(B, Hh, N, C, -1)
        scores = content + self._shift(position)
        cap = self.s.logit_cap
        scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~self._allowed(keep, N), self.s.invalid_logit)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = (probs @ v).permute(0, 2, 3, 1, 4).reshape(B, N * C, -1)[:, :T]
        return self.post(out.to(x.dtype))

    def _context(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, Hh, D] -> each block's keys [B, N, S, Hh, D]: its C frames and the S - C before them."""
        C, S = self.s.chunk, self.s.context
        t = F.pad(t, (0, 0, 0, 0, S - C, C - 1))
        return t.unfold(1, S, C).movedim(-1, 2).contiguous()

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hh, N, C, R] scores per distance (column r: distance R - 1 - r) -> [B, Hh, N, C, S] per key of
        the block's context (the relative shift of Transformer-XL, appendix B); zeros where no distance fits."""
        B, Hh, N, C, R = x.shape
        S = self.s.context
        x = F.pad(x, (0, S + 1 - R)).view(B, Hh, N, C * (S + 1))[..., : C * S]
        return x.view(B, Hh, N, C, S)

    def _allowed(self, keep: torch.Tensor, N: int) -> torch.Tensor:
        """[B, 1, N, C, S]: query c of block n may read key s of its context (a real frame, 0 to window - 1
        frames before the query)."""
        C, S = self.s.chunk, self.s.context
        B, T = keep.shape
        key = torch.arange(N, device=keep.device)[:, None] * C + torch.arange(S, device=keep.device) - (S - C)
        query = torch.arange(N, device=keep.device)[:, None] * C + torch.arange(C, device=keep.device)  # [N, C]
        dist = query[:, :, None] - key[:, None, :]  # [N, C, S]
        real = F.pad(keep, (0, N * C + S - T))[:, key.clamp(min=0)] & (key >= 0) & (key < T)  # [B, N, S]
        return ((dist >= 0) & (dist < self.s.window))[None, None] & real[:, None, :, None, :]


class LightConv(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.s = s
        self.linear_start = ClippedLinear(s.hidden, 2 * s.hidden, s.clipped)
        self.linear_end = ClippedLinear(s.hidden, s.hidden, s.clipped)
        self.depthwise_conv1d = nn.Conv1d(s.hidden, s.hidden, s.conv_kernel, groups=s.hidden, bias=False)
        self.pre_layer_norm, self.conv_norm = Norm(s.hidden, s.eps), Norm(s.hidden, s.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = self.depthwise_conv1d(F.pad(h.transpose(1, 2), (self.s.conv_kernel - 1, 0))).transpose(1, 2)
        h = F.silu(self.conv_norm(_clamp(h, self.s.clip)))
        return x + self.linear_end(h)


class ConformerLayer(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.s = s
        self.feed_forward1, self.feed_forward2 = FeedForward(s), FeedForward(s)
        self.self_attn = LocalAttention(s)
        self.lconv1d = LightConv(s)
        self.norm_pre_attn, self.norm_post_attn, self.norm_out = (Norm(s.hidden, 1e-6) for _ in range(3))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clamp(x, self.s.clip)), keep)
        x = x + self.norm_post_attn(_clamp(h, self.s.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.s.clip))


class AudioTower(nn.Module):
    def __init__(self, s: AudioSpec):
        super().__init__()
        self.s = s
        self.subsample_conv_projection = SubsampleProjection(s)
        self.layers = nn.ModuleList(ConformerLayer(s) for _ in range(s.layers))
        self.output_proj = nn.Linear(s.hidden, s.out_dims, bias=True)

    def forward(self, feats: torch.Tensor, frames: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """feats [B, F, mel] log-mel features (zeros past each clip's end), frames: each clip's valid frames ->
        one tensor [tokens, out_dims] per clip."""
        keep = (
            torch.arange(feats.shape[1], device=feats.device)[None, :]
            < torch.tensor(frames, device=feats.device)[:, None]
        )
        x, keep = self.subsample_conv_projection(feats.to(dtype), keep)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.output_proj(x)
        return [x[b][keep[b]] for b in range(x.shape[0])]

    @staticmethod
    def tokens(frames: int) -> int:
        """Soft tokens for a clip of `frames` mel frames: two stride-2 subsamplings."""
        return (frames + 3) // 4 if frames > 0 else 0

    def weight_names(self, prefix: str) -> dict[str, str]:
        return mirrored_names(self, prefix)
