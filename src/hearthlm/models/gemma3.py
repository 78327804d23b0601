"""Gemma 3 text model (Gemma3ForCausalLM and the text part of Gemma3ForConditionalGeneration).

The dense decoder Gemma 4 grew from: sandwich norms (pre and post norm around attention and the MLP), q/k
RMSNorm, sliding and full layers (5:1) each with its own RoPE base (full layers optionally scaled linearly),
a GELU-tanh gated MLP and embeddings scaled by sqrt(hidden). With `use_bidirectional_attention` it is EmbeddingGemma
(v1): the same layers attending in both directions, mean-pooled (embeddings/). Where it differs from Gemma 4:
- every RMSNorm scales by 1 + weight: the weight map adds the 1 once, at load, in float32 as the reference
  does (mapping.PlusOne), and the norm weights stay float32 whatever the model's dtype;
- attention scores are scaled by query_pre_attn_scalar ** -0.5; values are not normed;
- one head size and KV head count for every layer; no layer scalar, PLE, KV sharing or experts.

The Hub's config.json files state only what differs from transformers' Gemma3TextConfig defaults (the 4B
text_config names five keys), so those defaults are read here as the reference reads them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, LayerSpec, ModelConfig, as_id_list, rope_from_hf
from ..layers import decode_step
from ..layers.attention import Attention, Batch
from ..layers.embedding import rounded
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..weights.mapping import Cat, PlusOne, Source
from .base import CausalLM
from .llama import activation_from_hf

# transformers' Gemma3TextConfig defaults (what a key missing from config.json means).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "rope_theta": 1_000_000.0,  # full layers
    "rope_local_base_freq": 10_000.0,  # sliding layers
}
# Our norm -> the checkpoint's, per layer.
_NORMS = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "pre_mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}


def _layer_types(hf: dict[str, Any], n: int, where: str) -> list[str]:
    """`layer_types` (transformers 5) or every `sliding_window_pattern`-th layer full (the Hub's configs). Unlike
    Gemma 4, the last layer is not forced to be full (Gemma 3 1B's 26 layers end on a sliding one)."""
    types = hf.get("layer_types")
    if types is None:
        period = hf["sliding_window_pattern"]
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{where}: layer_types must list {n} of 'sliding_attention' / 'full_attention'")
    return list(types)


def _rope_parameters(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer type RoPE parameters, as transformers builds them: `rope_parameters` where config.json has them
    (transformers 5), else full layers from `rope_theta` + `rope_scaling`, sliding ones from `rope_local_base_freq`."""
    params = copy.deepcopy(hf.get("rope_parameters") or {})
    full = params.setdefault("full_attention", {"rope_type": "default"})
    sliding = params.setdefault("sliding_attention", {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf["rope_theta"])
    sliding.setdefault("rope_theta", hf["rope_local_base_freq"])
    return params


class Gemma3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)  # noqa: E731
        self.input_norm, self.post_attn_norm = norm(), norm()
        self.pre_mlp_norm, self.post_mlp_norm = norm(), norm()
        self.attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.layers[layer].intermediate_size, cfg.activation)

    def decode_parts(self) -> dict | None:
        """This layer's parts by their role in the fused CPU decode step (layers/decode_step.py)."""
        return decode_step.sandwich_parts(self)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        if x.shape[1] == 1 and (out := decode_step.step(self, x, batch)) is not None:
            return out  # a CPU decode step: the same kernels as below, in one call
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), batch))
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Gemma3Model(CausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        hf = DEFAULTS | hf
        bidirectional = bool(hf.get("use_bidirectional_attention"))  # EmbeddingGemma: an encoder, mean-pooled
        if hf["attn_logit_softcapping"] is not None:
            raise ConfigError(
                f"{where}: attn_logit_softcapping={hf['attn_logit_softcapping']} is not supported: hearthlm's "
                "attention does not softcap scores (no released Gemma 3 does; they set it to null)"
            )
        n = hf["num_hidden_layers"]
        types = _layer_types(hf, n, where)
        window = hf["sliding_window"]
        if window is None and "sliding_attention" in types:
            raise ConfigError(f"{where}: sliding_window is null but layer_types has sliding layers")
        if bidirectional and window is not None:
            # transformers turns the stored width w into the exclusive bound w // 2 + 1 on |query - key|: a radius.
            window //= 2
        rope = {"rope_parameters": _rope_parameters(hf)}
        layers = [
            LayerSpec(
                head_dim=hf["head_dim"],
                num_kv_heads=hf["num_key_value_heads"],
                rope=rope_from_hf(rope, where, t),
                sliding_window=window if t == "sliding_attention" else None,
                intermediate_size=hf["intermediate_size"],
            )
            for t in types
        ]
        return ModelConfig(
            architecture=arch,
            family="gemma3",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            layers=layers,
            norm_eps=hf["rms_norm_eps"],
            activation=activation_from_hf({"hidden_act": hf["hidden_activation"]}, where),
            tie_embeddings=bool(hf["tie_word_embeddings"]),
            qkv_bias=bool(hf["attention_bias"]),
            o_bias=bool(hf["attention_bias"]),
            qk_norm=True,
            attn_scale=hf["query_pre_attn_scalar"] ** -0.5,
            final_softcap=hf["final_logit_softcapping"],
            max_position=hf["max_position_embeddings"],
            bos_token_id=hf["bos_token_id"],
            eos_token_ids=as_id_list(hf["eos_token_id"]),
            pad_token_id=hf["pad_token_id"],
            bidirectional=bidirectional,
            pooling="mean" if bidirectional else None,
        )

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Gemma3Layer(cfg, i) for i in range(cfg.num_layers))

    @property
    def keep_storage_dtype(self) -> set[str]:
        # 1 + weight, computed in float32: a bf16 copy would round it where the reference does not.
        return {name for name, _ in self.named_parameters() if name.endswith("norm.weight")}

    def forward(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.prepare(batch)
        x = self.embed_tokens(ids) * rounded(self.config.hidden_size**0.5, self.dtype)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    def weight_map(self, prefix: str) -> dict[str, Source]:
        m = self.shared_weight_map(prefix)
        m["norm.weight"] = PlusOne(f"{prefix}norm.weight")
        for i in range(self.config.num_layers):
            p, hf = f"layers.{i}.", f"{prefix}layers.{i}."
            a = hf + "self_attn."
            m[p + "attn.qkv.weight"] = Cat(tuple(f"{a}{x}_proj.weight" for x in "qkv"))
            m[p + "attn.o_proj.weight"] = a + "o_proj.weight"
            if self.config.qkv_bias:
                m[p + "attn.qkv.bias"] = Cat(tuple(f"{a}{x}_proj.bias" for x in "qkv"))
                m[p + "attn.o_proj.bias"] = a + "o_proj.bias"
            m[p + "mlp.gate_up.weight"] = Cat((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"))
            m[p + "mlp.down.weight"] = hf + "mlp.down_proj.weight"
            m.update({p + ours: PlusOne(hf + theirs) for ours, theirs in _NORMS.items()})
        return m
