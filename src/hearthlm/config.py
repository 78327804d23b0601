"""ModelConfig: one normalized description of a decoder-only model.

Every family file turns its own config.json dialect into this dataclass, so that layers, the KV cache
and the engine never read a Hugging Face key. Per-layer facts (window, head size, KV heads, RoPE,
KV sharing, MLP width) live in `LayerSpec`, because Gemma 4 varies all of them from layer to layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that hearthlm cannot turn into a model (names the file and the key)."""


@dataclass(frozen=True)
class RopeSpec:
    kind: str = "default"  # "default" | "linear" | "llama3" | "proportional"
    theta: float = 10_000.0
    partial: float = 1.0  # fraction of head dims rotated (proportional RoPE)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_factors: tuple[float, ...] = ()  # per-frequency divisors (GGUF files store Llama 3.x scaling so)


@dataclass(frozen=True)
class LayerSpec:
    head_dim: int
    num_kv_heads: int
    rope: RopeSpec
    sliding_window: int | None = None  # None: full attention
    kv_source: int | None = None  # a KV-shared layer reads this earlier layer's K/V and stores none
    k_eq_v: bool = False  # values are the (un-normed) key projection: no v_proj
    intermediate_size: int = 0  # dense gated MLP width; 0 = none
    moe: bool = False  # this layer has routed experts

    @property
    def kind(self) -> str:
        return "sliding" if self.sliding_window else "full"


@dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    layers: list[LayerSpec]
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "gelu_tanh"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    final_softcap: float | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    ple_dim: int = 0  # Gemma 4 per-layer embeddings
    ple_vocab_size: int = 0
    max_position: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Embedding models (embeddings/): `bidirectional` attention sees the whole input, and a sliding layer's
    # `sliding_window` is then a radius (keys within that distance on either side); `pooling` ("mean" | "last" |
    # "cls") marks a dedicated embedding model, None a language model; `embedding_dim` is the width of a
    # projection head after the final norm (0: none).
    bidirectional: bool = False
    pooling: str | None = None
    embedding_dim: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a Hugging Face checkpoint folder needs a config.json") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def read_config(path: Path) -> dict[str, Any]:
    """A config.json (or generation_config.json): read_json, and it must be a JSON object."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: the file holds a {type(value).__name__}, not a JSON object")
    return value


def require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: missing required key '{key}'")
    return cfg[key]


def as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def rope_from_hf(cfg: dict[str, Any], where: str, layer_type: str | None = None) -> RopeSpec:
    """Read RoPE settings from either transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` pair."""
    params = cfg.get("rope_parameters")
    if params and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if kind == "default":
        if partial != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor={partial} with default RoPE is not supported")
        return RopeSpec("default", theta, freq_factors=tuple(cfg.get("rope_freq_factors") or ()))
    if kind == "proportional":
        return RopeSpec("proportional", theta, partial=partial, factor=float(params.get("factor", 1.0)))
    if kind == "linear":
        return RopeSpec("linear", theta, factor=float(require(params, "factor", where)))
    if kind == "llama3":
        return RopeSpec(
            "llama3",
            theta,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError(
        f"{where}: RoPE type '{kind}' is not supported (supported: default, linear, llama3, proportional)"
    )


# Upper bounds on a config's sizes, far above any released model (Llama 3.1 405B: 126 layers, hidden 16384,
# MLP 53248; Gemma 4: vocab 262144), so that a corrupt or hostile config is refused before anything is built
# from it: a model is first constructed on the meta device layer by layer, which 10**9 layers would never end.
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 14,
    "global_head_dim": 1 << 14,
    "vocab_size": 1 << 24,
    "vocab_size_per_layer_input": 1 << 24,
    "hidden_size_per_layer_input": 1 << 16,
    "num_experts": 1 << 16,
    "num_local_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16,
    "num_kv_shared_layers": 1024,
    "max_position_embeddings": 1 << 32,
    "sliding_window": 1 << 32,
}
_AT_LEAST_ONE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def check_sizes(hf: dict[str, Any], where: str) -> None:
    """Refuse a config.json (or the one a GGUF file's metadata gives) whose sizes are not integers within
    SIZE_LIMITS (a per-layer list: each entry), before a model is built from it."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: the config is a {type(hf).__name__}, not a JSON object")
    for key, limit in SIZE_LIMITS.items():
        value = hf.get(key)
        if value is None:
            continue
        low = 1 if key in _AT_LEAST_ONE else 0
        values = value if isinstance(value, list) and key in ("num_key_value_heads", "intermediate_size") else [value]
        if not values or not all(type(v) is int and low <= v <= limit for v in values):
            raise ConfigError(
                f"{where}: {key} = {_short(value)} is not an integer from {low} to {limit:,}: the config is corrupt "
                "or not a model hearthlm can run"
            )


def check_model(cfg: ModelConfig, where: str) -> None:
    """Facts a normalized config must agree on before a model is built: routing picks from the experts there
    are, and attention heads share KV heads evenly."""
    if cfg.num_experts and not 1 <= cfg.experts_per_token <= cfg.num_experts:
        raise ConfigError(
            f"{where}: {cfg.experts_per_token} experts per token, but the model has {cfg.num_experts} experts"
        )
    for i, layer in enumerate(cfg.layers):
        if layer.num_kv_heads < 1 or cfg.num_heads % layer.num_kv_heads:
            raise ConfigError(
                f"{where}: layer {i} has {layer.num_kv_heads} KV heads for {cfg.num_heads} attention heads "
                "(the KV heads must divide the attention heads)"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
