"""The pre-norm decoder of Llama 3.x, Mistral and Qwen2/2.5 (and the base that Qwen3, Qwen3-MoE and
Mixtral extend): x + attn(norm(x)), then x + mlp(norm(x)), where the MLP may be routed experts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LayerSpec, ModelConfig, as_id_list, require, rope_from_hf
from ..layers import decode_step
from ..layers.attention import Attention, Batch
from ..layers.mlp import GatedMLP
from ..layers.moe import SparseMoE
from ..layers.norm import RMSNorm
from ..weights.mapping import Cat, Source, Stack
from .base import CausalLM

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def activation_from_hf(hf: dict[str, Any], where: str) -> str:
    name = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation '{name}' is not supported (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def decoder_config(
    hf: dict[str, Any],
    arch: str,
    family: str,
    where: str,
    *,
    qkv_bias: bool | None = None,
    qk_norm: bool = False,
    moe_layers: set[int] = frozenset(),
    **extra: Any,
) -> ModelConfig:
    """Common reader for the Llama-style config.json dialect."""
    hidden = require(hf, "hidden_size", where)
    heads = require(hf, "num_attention_heads", where)
    n_layers = require(hf, "num_hidden_layers", where)
    head_dim = hf.get("head_dim") or hidden // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    rope = rope_from_hf(hf, where)
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None
    types = hf.get("layer_types")
    if types is None and window is not None and "max_window_layers" in hf:
        types = ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention" for i in range(n_layers)]
    types = types or ["sliding_attention" if window else "full_attention"] * n_layers
    inter = hf.get("intermediate_size", 0)
    layers = [
        LayerSpec(
            head_dim=head_dim,
            num_kv_heads=kv_heads,
            rope=rope,
            sliding_window=window if types[i] == "sliding_attention" else None,
            intermediate_size=0 if i in moe_layers else inter,
            moe=i in moe_layers,
        )
        for i in range(n_layers)
    ]
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=require(hf, "vocab_size", where),
        hidden_size=hidden,
        num_heads=heads,
        layers=layers,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation_from_hf(hf, where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias if qkv_bias is None else qkv_bias,
        o_bias=bias,
        qk_norm=qk_norm,
        max_position=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=as_id_list(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **extra,
    )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        spec = cfg.layers[layer]
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if spec.moe:
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.num_experts,
                cfg.experts_per_token,
                cfg.moe_intermediate_size,
                cfg.activation,
                cfg.norm_topk_prob,
            )
        else:
            self.mlp = GatedMLP(cfg.hidden_size, spec.intermediate_size, cfg.activation)

    def decode_parts(self) -> dict | None:
        """This layer's parts by their role in the fused CPU decode step (layers/decode_step.py)."""
        return {"attn_norm": self.input_norm, "attn": self.attn, "mlp_norm": self.post_attn_norm, "mlp": self.mlp}

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        if x.shape[1] == 1 and (out := decode_step.step(self, x, batch)) is not None:
            return out  # a CPU decode step: the same kernels as below, in one call
        x = x + self.attn(self.input_norm(x), batch)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaModel(CausalLM):
    # Checkpoint names of one expert's (gate, up, down) and of the router, relative to the layer prefix.
    expert_names = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
    router_name = "mlp.gate"

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        family = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}.get(arch, "qwen2")
        return decoder_config(hf, arch, family, where, qkv_bias=True if family == "qwen2" else None)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))

    def forward(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.prepare(batch)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def weight_map(self, prefix: str) -> dict[str, Source]:
        cfg = self.config
        m = self.shared_weight_map(prefix)
        for i, spec in enumerate(cfg.layers):
            p, hf = f"layers.{i}.", f"{prefix}layers.{i}."
            a = f"{hf}self_attn."
            m[p + "input_norm.weight"] = hf + "input_layernorm.weight"
            m[p + "post_attn_norm.weight"] = hf + "post_attention_layernorm.weight"
            m[p + "attn.qkv.weight"] = Cat(tuple(f"{a}{x}_proj.weight" for x in "qkv"))
            if cfg.qkv_bias:
                m[p + "attn.qkv.bias"] = Cat(tuple(f"{a}{x}_proj.bias" for x in "qkv"))
            m[p + "attn.o_proj.weight"] = a + "o_proj.weight"
            if cfg.o_bias:
                m[p + "attn.o_proj.bias"] = a + "o_proj.bias"
            if cfg.qk_norm:
                m[p + "attn.q_norm.weight"] = a + "q_norm.weight"
                m[p + "attn.k_norm.weight"] = a + "k_norm.weight"
            if spec.moe:
                gate, up, down = (hf + n + ".weight" for n in self.expert_names)
                experts = range(cfg.num_experts)
                m[p + "mlp.router.proj.weight"] = f"{hf}{self.router_name}.weight"
                m[p + "mlp.experts.gate_up"] = Stack(tuple(Cat((gate.format(e=e), up.format(e=e))) for e in experts))
                m[p + "mlp.experts.down"] = Stack(tuple(down.format(e=e) for e in experts))
            else:
                m[p + "mlp.gate_up.weight"] = Cat((f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"))
                m[p + "mlp.down.weight"] = f"{hf}mlp.down_proj.weight"
        return m
