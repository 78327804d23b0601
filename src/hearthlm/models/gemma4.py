"""Gemma 4 text model (Gemma4ForCausalLM and the text part of Gemma4ForConditionalGeneration).

What is Gemma 4's own, beside the shared attention/MLP/experts:
- sandwich norms (pre and post norm around attention and the MLP), a per-layer `layer_scalar`;
- per-layer embeddings (PLE): a token table gathered per layer plus a projection of the embeddings,
  gated into the residual stream after the MLP;
- KV-shared layers (the last `num_kv_shared_layers` reuse the K/V of the last earlier layer of the
  same type) with a double-wide MLP when `use_double_wide_mlp`;
- sliding and full layers with their own head_dim, KV heads and RoPE; k = v on full layers;
- the MoE block: a router that reads the residual stream, experts beside the dense MLP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ConfigError, LayerSpec, ModelConfig, as_id_list, require, rope_from_hf
from ..layers import decode_step
from ..layers.attention import Attention, Batch
from ..layers.embedding import lookup, rounded
from ..layers.linear import Linear
from ..layers.mlp import GatedMLP, activation
from ..layers.moe import Experts
from ..layers.norm import RMSNorm
from ..weights.mapping import Cat, Source
from .base import CausalLM
from .llama import activation_from_hf

if TYPE_CHECKING:
    from ..multimodal.splice import Splice


def _layer_types(hf: dict[str, Any], n: int) -> list[str]:
    types = list(hf.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)])
    types[-1] = "full_attention"  # as the reference: the last layer is always full attention
    return types


def _kv_sources(types: list[str], num_shared: int, where: str) -> list[int | None]:
    first_shared = len(types) - num_shared
    sources: list[int | None] = [None] * len(types)
    for i in range(first_shared, len(types)):
        earlier = [j for j in range(first_shared) if types[j] == types[i]]
        if not earlier:
            raise ConfigError(f"{where}: KV-shared layer {i} ({types[i]}) has no earlier layer of its type")
        sources[i] = earlier[-1]
    return sources


def _attention_shapes(hf: dict[str, Any], types: list[str], where: str) -> list[tuple[int, int]]:
    """(head_dim, kv_heads) per layer, from `per_layer_config` (as transformers 5 saves it) or from
    `global_head_dim` / `num_global_key_value_heads` (as the Hub configs state it)."""
    head_dim, kv_heads = hf.get("head_dim", 256), hf.get("num_key_value_heads", 4)
    per_layer = hf.get("per_layer_config")
    if per_layer is not None:  # keys are layer indices as strings, zero-padded from 10 layers on ("04")
        per_layer = {int(k): v for k, v in per_layer.items()}
    shapes = []
    for i, t in enumerate(types):
        if per_layer is not None:
            over = dict(per_layer.get(i) or {})
            unknown = set(over) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"{where}: per_layer_config[{i}] sets unsupported keys {sorted(unknown)}")
        elif t == "full_attention":
            over = {"head_dim": hf.get("global_head_dim", 512)}
            if hf.get("attention_k_eq_v") and hf.get("num_global_key_value_heads") is not None:
                over["num_key_value_heads"] = hf["num_global_key_value_heads"]
        else:
            over = {}
        shapes.append((over.get("head_dim", head_dim), over.get("num_key_value_heads", kv_heads)))
    return shapes


class PerLayerEmbedding(nn.Module):
    """PLE: token rows gathered from a [vocab, L * P] table (kept in its stored dtype, memory-mapped:
    it is a gather, not a matmul) plus a normed projection of the main embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, P = cfg.num_layers, cfg.ple_dim
        self.table = nn.Parameter(torch.empty(cfg.ple_vocab_size, L * P), requires_grad=False)
        self.proj = Linear(cfg.hidden_size, L * P, bias=False)
        self.norm = RMSNorm(P, cfg.norm_eps)
        self.shape = (L, P)
        self.proj_scale = cfg.hidden_size**-0.5

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """ids [B, T], embeds [B, T, H] -> [B, T, L, P]"""
        table_dtype = self.table.dtype if isinstance(self.table, torch.Tensor) else torch.float32
        token = lookup(self.table, ids).to(embeds.dtype) * rounded(self.shape[1] ** 0.5, table_dtype)
        context = self.norm((self.proj(embeds) * self.proj_scale).view(*ids.shape, *self.shape))
        return (context + token.view(*ids.shape, *self.shape)) * 2**-0.5


class Router(nn.Module):
    """Gemma 4 router: unweighted RMSNorm, a learned scale, softmax, top-k renormalized, then a
    learned per-expert scale on the kept weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, with_weight=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.proj = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts), requires_grad=False)
        self.top_k = cfg.experts_per_token
        self.root = cfg.hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return index, weight * self.per_expert_scale[index]


class Gemma4Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        spec = cfg.layers[layer]
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)  # noqa: E731
        self.input_norm, self.post_attn_norm = norm(), norm()
        self.pre_mlp_norm, self.post_mlp_norm = norm(), norm()
        self.attn = Attention(cfg, layer, v_norm=True)
        self.mlp = GatedMLP(cfg.hidden_size, spec.intermediate_size, cfg.activation)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        if spec.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.activation)
            self.post_mlp_norm_1, self.pre_experts_norm, self.post_experts_norm = norm(), norm(), norm()
        if cfg.ple_dim:
            self.ple_gate = Linear(cfg.hidden_size, cfg.ple_dim, bias=False)
            self.ple_out = Linear(cfg.ple_dim, cfg.hidden_size, bias=False)
            self.ple_norm = norm()
            self.act = activation(cfg.activation)

    def decode_parts(self) -> dict | None:
        """This layer's parts by their role in the fused CPU decode step (layers/decode_step.py); routed experts
        run module by module."""
        if hasattr(self, "experts"):
            return None
        parts = decode_step.sandwich_parts(self) | {"scalar": self.layer_scalar}
        if hasattr(self, "ple_gate"):
            parts |= {"ple_gate": self.ple_gate, "ple_out": self.ple_out, "ple_norm": self.ple_norm}
        return parts

    def forward(self, x: torch.Tensor, batch: Batch, ple: torch.Tensor | None) -> torch.Tensor:
        if x.shape[1] == 1 and (out := decode_step.step(self, x, batch, ple)) is not None:
            return out  # a CPU decode step: the same kernels as below, in one call
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), batch))
        if hasattr(self, "experts"):
            # The router reads the residual stream; it runs before the dense MLP so that, under an expert budget,
            # the experts it picks can be fetched while the MLP computes (moe/ahead.py).
            flat = x.reshape(-1, x.shape[-1])
            index, weight = self.router(flat)
        h = self.mlp(self.pre_mlp_norm(x))
        if hasattr(self, "experts"):
            routed = self.experts(self.pre_experts_norm(flat), index, weight).view(x.shape)
            h = self.post_mlp_norm_1(h) + self.post_experts_norm(routed)
        x = x + self.post_mlp_norm(h)
        if ple is not None:
            x = x + self.ple_norm(self.ple_out(self.act(self.ple_gate(x)) * ple))
        return x * self.layer_scalar


class Gemma4Model(CausalLM):
    keep_storage_dtype = {"ple.table"}  # gathered row by row; converting it would double its memory

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        if hf.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{where}: use_bidirectional_attention='all' is not a causal language model")
        n = require(hf, "num_hidden_layers", where)
        types = _layer_types(hf, n)
        shapes = _attention_shapes(hf, types, where)
        sources = _kv_sources(types, hf.get("num_kv_shared_layers", 0), where)
        k_eq_v = bool(hf.get("attention_k_eq_v", False))
        double = bool(hf.get("use_double_wide_mlp", False))
        moe = bool(hf.get("enable_moe_block", False))
        inter = hf.get("intermediate_size", 9216)
        layers = [
            LayerSpec(
                head_dim=shapes[i][0],
                num_kv_heads=shapes[i][1],
                rope=rope_from_hf(hf, where, types[i]),
                sliding_window=hf.get("sliding_window", 512) if t == "sliding_attention" else None,
                kv_source=sources[i],
                k_eq_v=k_eq_v and t == "full_attention" and sources[i] is None,
                intermediate_size=inter * (2 if double and sources[i] is not None else 1),
                moe=moe,
            )
            for i, t in enumerate(types)
        ]
        ple_dim = hf.get("hidden_size_per_layer_input", 256) or 0
        return ModelConfig(
            architecture=arch,
            family="gemma4",
            vocab_size=hf.get("vocab_size", 262_144),
            hidden_size=require(hf, "hidden_size", where),
            num_heads=require(hf, "num_attention_heads", where),
            layers=layers,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=activation_from_hf({"hidden_act": hf.get("hidden_activation", "gelu_pytorch_tanh")}, where),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            qk_norm=True,
            attn_scale=1.0,
            final_softcap=hf.get("final_logit_softcapping"),
            num_experts=hf.get("num_experts") or 0 if moe else 0,
            experts_per_token=hf.get("top_k_experts") or 0 if moe else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size") or 0 if moe else 0,
            ple_dim=ple_dim,
            ple_vocab_size=hf.get("vocab_size_per_layer_input", 262_144) if ple_dim else 0,
            max_position=hf.get("max_position_embeddings", 131_072),
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_ids=as_id_list(hf.get("eos_token_id", 1)),
            pad_token_id=hf.get("pad_token_id", 0),
        )

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Gemma4Layer(cfg, i) for i in range(cfg.num_layers))
        self.ple = PerLayerEmbedding(cfg) if cfg.ple_dim else None
        self.first_shared = next((i for i, s in enumerate(cfg.layers) if s.kv_source is not None), cfg.num_layers)

    def forward(self, ids: torch.Tensor, batch: Batch, splice: Splice | None = None) -> torch.Tensor:
        """`splice`: image / audio embeddings for some positions (multimodal/splice.py); their ids read as pad
        for the token and per-layer embeddings, while the per-layer projection reads the spliced embeddings."""
        self.prepare(batch)
        if splice is not None:
            ids = splice.text_ids(ids)
        # The scale is rounded to the weights' dtype, as the reference does (sqrt(1536) -> 39.25 in bf16).
        x = self.embed_tokens(ids) * rounded(self.config.hidden_size**0.5, self.dtype)
        if splice is not None:
            x = splice.apply(x)
        ple = self.ple(ids, x) if self.ple is not None else None
        for i, layer in enumerate(self.layers):
            if i == self.first_shared and batch.outputs is not None:
                # KV-shared layers write no cache: run them only where hidden states are wanted.
                x = x[:, x.shape[1] - batch.outputs :]
                ple = ple[:, ple.shape[1] - batch.outputs :] if ple is not None else None
                if batch.outputs == 0:
                    return x
            x = layer(x, batch, ple[:, :, i] if ple is not None else None)
        return x

    def weight_map(self, prefix: str) -> dict[str, Source]:
        cfg = self.config
        m = self.shared_weight_map(prefix)
        if cfg.ple_dim:
            m["ple.table"] = f"{prefix}embed_tokens_per_layer.weight"
            m["ple.proj.weight"] = f"{prefix}per_layer_model_projection.weight"
            m["ple.norm.weight"] = f"{prefix}per_layer_projection_norm.weight"
        for i, spec in enumerate(cfg.layers):
            p, hf = f"layers.{i}.", f"{prefix}layers.{i}."
            a = hf + "self_attn."
            names = {
                "input_norm.weight": "input_layernorm.weight",
                "post_attn_norm.weight": "post_attention_layernorm.weight",
                "pre_mlp_norm.weight": "pre_feedforward_layernorm.weight",
                "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
                "layer_scalar": "layer_scalar",
                "attn.q_norm.weight": "self_attn.q_norm.weight",
                "attn.o_proj.weight": "self_attn.o_proj.weight",
                "mlp.down.weight": "mlp.down_proj.weight",
            }
            projections = ["q"] if spec.kv_source is not None else ["q", "k"] if spec.k_eq_v else ["q", "k", "v"]
            m[p + "attn.qkv.weight"] = Cat(tuple(f"{a}{x}_proj.weight" for x in projections))
            if cfg.qkv_bias:
                m[p + "attn.qkv.bias"] = Cat(tuple(f"{a}{x}_proj.bias" for x in projections))
                names["attn.o_proj.bias"] = "self_attn.o_proj.bias"
            if spec.kv_source is None:
                names["attn.k_norm.weight"] = "self_attn.k_norm.weight"
            m[p + "mlp.gate_up.weight"] = Cat((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"))
            if spec.moe:
                names |= {
                    "router.proj.weight": "router.proj.weight",
                    "router.scale": "router.scale",
                    "router.per_expert_scale": "router.per_expert_scale",
                    "experts.gate_up": "experts.gate_up_proj",
                    "experts.down": "experts.down_proj",
                    "post_mlp_norm_1.weight": "post_feedforward_layernorm_1.weight",
                    "pre_experts_norm.weight": "pre_feedforward_layernorm_2.weight",
                    "post_experts_norm.weight": "post_feedforward_layernorm_2.weight",
                }
            if cfg.ple_dim:
                names |= {
                    "ple_gate.weight": "per_layer_input_gate.weight",
                    "ple_out.weight": "per_layer_projection.weight",
                    "ple_norm.weight": "post_per_layer_input_norm.weight",
                }
            m.update({p + ours: hf + theirs for ours, theirs in names.items()})
        return m
