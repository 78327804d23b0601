"""The sentence-transformers folder layout: what runs after the transformer, read from `modules.json`.

A folder lists its modules in order, each with a `type` and a sub-folder `path`:
- `...models.Transformer` (path "" usually; `sentence_bert_config.json` may cap `max_seq_length`);
- `...models.Pooling` (`1_Pooling/config.json`: one of the pooling_mode_* flags, or `pooling_mode`);
- `...models.Dense` (`2_Dense/config.json`: in_features, out_features, bias, activation_function; weights
  `linear.weight` / `linear.bias` in `model.safetensors`), applied to the pooled vector;
- `...models.Normalize` (L2 normalisation; embeddings are always normalised here anyway).
EmbeddingGemma (Pooling mean, Dense 768 -> 3072, Dense 3072 -> 768, Normalize) and Qwen3-Embedding (Pooling
lasttoken, Normalize) ship this layout; llama.cpp's converter reads the same Pooling config (pooling_type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ConfigError, read_json

# Pooling config flag -> our pooling name.
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_POOLING_MODES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_ACTIVATIONS = {"torch.nn.modules.linear.Identity": None, "torch.nn.modules.activation.Tanh": torch.tanh}


@dataclass
class Dense:
    weight: torch.Tensor  # [out, in] float32
    bias: torch.Tensor | None
    activation: object = None  # None: identity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y


@dataclass
class Modules:
    """What a sentence-transformers folder adds after the transformer."""

    pooling: str
    dense: list[Dense] = field(default_factory=list)
    max_seq_length: int | None = None


def _modules(folder: Path) -> list[dict] | None:
    path = folder / "modules.json"
    return read_json(path) if path.is_file() else None


def folder_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder names ("mean" | "last" | "cls"), None for any other folder."""
    modules = _modules(folder)
    pooling = [m for m in modules or [] if m.get("type", "").endswith(".Pooling")]
    if not pooling:
        return None
    path = folder / pooling[0].get("path", "") / "config.json"
    cfg = read_json(path)
    named = [ours for flag, ours in _POOLING_FLAGS.items() if cfg.get(flag)]
    if cfg.get("pooling_mode") in _POOLING_MODES:
        named.append(_POOLING_MODES[cfg["pooling_mode"]])
    if len(set(named)) != 1:
        on = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
        raise ConfigError(
            f"{path}: pooling {on or 'none'} is not supported; hearthlm pools with exactly one of "
            "pooling_mode_mean_tokens, pooling_mode_cls_token, pooling_mode_lasttoken"
        )
    return named[0]


def read(folder: Path, device: torch.device) -> Modules | None:
    """The folder's pooling, Dense heads (float32, on `device`) and length cap; None without a modules.json."""
    modules = _modules(folder)
    pooling = folder_pooling(folder)
    if modules is None or pooling is None:
        return None
    out = Modules(pooling)
    for m in modules:
        kind, sub = m.get("type", ""), folder / m.get("path", "")
        if kind.endswith(".Dense"):
            out.dense.append(_dense(sub, device))
        elif kind.endswith(".Transformer") and (sub / "sentence_bert_config.json").is_file():
            out.max_seq_length = read_json(sub / "sentence_bert_config.json").get("max_seq_length")
        elif not kind.endswith((".Pooling", ".Normalize", ".Transformer")):
            raise ConfigError(f"{folder / 'modules.json'}: module {kind} is not supported (Pooling, Dense, Normalize)")
    return out


def _dense(folder: Path, device: torch.device) -> Dense:
    cfg = read_json(folder / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{folder / 'config.json'}: activation {act} is not supported ({', '.join(_ACTIVATIONS)})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder}: no model.safetensors (a pytorch_model.bin Dense head is not read; convert it)")
    tensors = load_file(str(weights))
    weight = tensors["linear.weight"].float().to(device)
    shape = (cfg["out_features"], cfg["in_features"])
    if tuple(weight.shape) != shape:
        raise ConfigError(f"{weights}: linear.weight is {tuple(weight.shape)}, config.json says {shape}")
    bias = tensors.get("linear.bias") if cfg.get("bias", True) else None
    if cfg.get("bias", True) and bias is None:
        raise ConfigError(f"{weights}: config.json says bias, but there is no linear.bias")
    bias = bias.float().to(device) if bias is not None else None
    return Dense(weight, bias, _ACTIVATIONS[act])
