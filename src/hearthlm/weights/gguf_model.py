"""A GGUF file seen as a Hugging Face checkpoint: its metadata becomes a config.json dict (so every family
reads it with the code that reads config.json) and its tensors answer to the Hugging Face names the families'
weight maps use, translated from llama.cpp's names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.
q_proj.weight`), with the reorderings llama.cpp's converter applied undone.

Quantized tensors come back as QuantTensors repacked for our kernels (quant/ggml.py); float ones as
float16 / bfloat16 / float32 views of the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..quant import ggml
from ..quant.tensor import QuantTensor
from .gguf import GGUFError, GGUFFile

# general.architecture -> Hugging Face architecture; "llama" with experts is Mixtral.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# Per-layer tensors: llama.cpp suffix -> Hugging Face suffix (under model.layers.N.)
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
# Stacked experts [E, out, in]: llama.cpp name -> Hugging Face per-expert suffix ({e} = expert).
_EXPERTS = {
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
}
_MIXTRAL = {"mlp.gate.weight": "block_sparse_moe.gate.weight", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _translate(name: str, mixtral: bool) -> list[tuple[str, int | None]]:
    """llama.cpp tensor name -> [(Hugging Face name, expert index or None)]; [] if not a known name."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}  # fmt: skip
    if name in top:
        return [(top[name], None)]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return []
    prefix, suffix = f"model.layers.{m[1]}.", m[2]
    if suffix in _LAYER:
        hf = _LAYER[suffix]
        if mixtral and hf == "mlp.gate.weight":
            hf = _MIXTRAL[hf]
        return [(prefix + hf, None)]
    if suffix in _EXPERTS:
        hf = _EXPERTS[suffix]
        if mixtral:
            kind = hf.split(".")[3]
            hf = f"block_sparse_moe.experts.{{e}}.{_MIXTRAL[kind]}.weight"
        return [(prefix + hf, -1)]  # -1: expanded per expert by the caller
    return []


def _get(meta: dict[str, Any], key: str, where: Path, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise GGUFError(f"{where}: metadata key '{key}' is missing")
    return default


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The metadata as the config.json a Hugging Face checkpoint of the same model would carry."""
    meta, where, arch = gguf.metadata, gguf.path, gguf.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{where}: GGUF architecture '{arch}' is not supported; hearthlm loads GGUF files of "
            + ", ".join(sorted(ARCHITECTURES))
        )
    a = lambda key, default=...: _get(meta, f"{arch}.{key}", where, default)  # noqa: E731
    experts = a("expert_count", 0)
    hf_arch = "MixtralForCausalLM" if arch == "llama" and experts else ARCHITECTURES[arch]
    heads = a("attention.head_count")
    kv_heads = a("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise GGUFError(f"{where}: per-layer head counts are not supported for '{arch}'")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = gguf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gguf.tensors else len(tokens or [])
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "hidden_size": a("embedding_length"),
        "num_hidden_layers": a("block_count"),
        "intermediate_size": a("feed_forward_length", 0),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": a("context_length", 8192),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [
            i for i in (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")) if i is not None
        ],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "rope_theta": a("rope.freq_base", 10_000.0),
        "attention_bias": False,
    }
    key_length = a("attention.key_length", None)
    if key_length is not None:
        cfg["head_dim"] = key_length
    rope_dims = a("rope.dimension_count", None)
    if rope_dims is not None and rope_dims != cfg.get("head_dim", cfg["hidden_size"] // heads):
        raise GGUFError(f"{where}: partial rotary embeddings ({rope_dims} dims) are not supported for '{arch}'")
    scaling = a("rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"{where}: RoPE scaling '{scaling}' is not supported in GGUF files yet")
    factors = freq_factors(gguf)
    if factors is not None:
        cfg["rope_freq_factors"] = factors
    if experts:
        cfg.update(
            num_experts=experts,
            num_local_experts=experts,
            num_experts_per_tok=a("expert_used_count"),
            moe_intermediate_size=a("expert_feed_forward_length", cfg["intermediate_size"]),
            # llama.cpp renormalizes the kept weights for both (what the released checkpoints do); the key, where
            # a converter wrote it, says otherwise.
            norm_topk_prob=bool(a("expert_weights_norm", True)),
        )
        if hf_arch == "MixtralForCausalLM":
            cfg["intermediate_size"] = cfg["moe_intermediate_size"]
        dense = [i for i in range(cfg["num_hidden_layers"]) if f"blk.{i}.ffn_gate_exps.weight" not in gguf.tensors]
        cfg["mlp_only_layers"] = dense
    return cfg


class GGUFCheckpoint:
    """A GGUF file addressed by Hugging Face tensor names (the Checkpoint interface the loader uses)."""

    def __init__(self, gguf: GGUFFile, cfg: dict[str, Any]):
        self.gguf = gguf
        self.folder = gguf.path
        self.permute = gguf.architecture == "llama"  # llama.cpp interleaves the RoPE halves of q and k rows
        self.heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
        mixtral = cfg["architectures"][0] == "MixtralForCausalLM"
        self._where: dict[str, tuple[str, int | None]] = {}
        for name, info in gguf.tensors.items():
            for hf, expert in _translate(name, mixtral):
                if expert is None:
                    self._where[hf] = (name, None)
                else:
                    for e in range(info.shape[0]):
                        self._where[hf.format(e=e)] = (name, e)

    def names(self) -> list[str]:
        used = {"rope_freqs.weight"}  # read into the config
        return list(self._where) + [n for n in self.gguf.tensors if not _translate(n, False) and n not in used]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.gguf.path

    def gguf_name(self, name: str) -> str:
        return self._where[name][0]

    def get(self, name: str) -> QuantTensor | torch.Tensor:
        if name not in self._where:
            raise GGUFError(f"{self.gguf.path}: tensor '{name}' (llama.cpp naming) is missing from the file")
        gname, expert = self._where[name]
        tensor = self._read(gname) if expert is None else self._read_expert(gname, expert)
        if self.permute and re.search(r"self_attn\.[qk]_proj\.", name):
            heads = self.heads[0] if ".q_proj." in name else self.heads[1]
            tensor = _unpermute(tensor, heads)
        return tensor

    def _read(self, gname: str) -> QuantTensor | torch.Tensor:
        info = self.gguf.tensors[gname]
        try:
            return ggml.repack(self.gguf.raw(gname), info.ggml_type, info.shape)
        except ggml.GGMLTypeError as e:
            raise GGUFError(f"{self.gguf.path}: tensor '{gname}': {e}") from None

    def _read_expert(self, gname: str, e: int) -> QuantTensor | torch.Tensor:
        """One expert of a stacked [E, out, in] tensor: its bytes are contiguous, so only they are read (an
        expert budget fetches one at a time). Blocks are repacked into new memory, whose source pages go."""
        info = self.gguf.tensors[gname]
        size = info.nbytes // info.shape[0]
        raw = self.gguf.raw(gname)[e * size : (e + 1) * size]
        try:
            tensor = ggml.repack(raw, info.ggml_type, info.shape[1:])
        except ggml.GGMLTypeError as err:
            raise GGUFError(f"{self.gguf.path}: tensor '{gname}': {err}") from None
        if isinstance(tensor, QuantTensor):
            self.gguf.release_range(info.offset + e * size, size)
        return tensor

    def read_into(self, view: torch.Tensor, dst: torch.Tensor) -> bool:
        return False  # no pread: float views are copied from the mapping (then released), blocks repacked

    def release_view(self, view: torch.Tensor) -> None:
        self.gguf.release_view(view)

    def release(self, name: str) -> None:
        self.gguf.release(self._where[name][0])


def _unpermute(w: QuantTensor | torch.Tensor, heads: int) -> QuantTensor | torch.Tensor:
    """Undo llama.cpp's row order for q/k (pairs (i, i + d/2) of each head interleaved) -> rotate-half order."""
    n = w.shape[0]
    d = n // heads
    order = torch.arange(n).view(heads, d // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(w, QuantTensor):
        mins = None if w.mins is None else w.mins[order]
        return QuantTensor(w.qdata[order], w.scales[order], mins, w.bits, w.group)
    return w[order]


def freq_factors(gguf: GGUFFile) -> tuple[float, ...] | None:
    """llama.cpp stores Llama 3.x RoPE scaling as per-frequency divisors in `rope_freqs.weight`."""
    if "rope_freqs.weight" not in gguf.tensors:
        return None
    info = gguf.tensors["rope_freqs.weight"]
    return tuple(ggml.dequantize(gguf.raw(info.name), info.ggml_type, info.shape).tolist())
