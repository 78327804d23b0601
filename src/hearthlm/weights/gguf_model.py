"""A GGUF file seen as a Hugging Face checkpoint: its metadata becomes a config.json dict (so every family
reads it with the code that reads config.json) and its tensors answer to the Hugging Face names the families'
weight maps use, translated from llama.cpp's names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.
q_proj.weight`), with the reorderings llama.cpp's converter applied undone.

Gemma 4 files state per layer what its config.json states by rule (sliding pattern, KV heads, MLP width, which
layers have no attn_v); those arrays are turned back into the config and checked to be what the rule gives,
and a file that says something else (which transformers' Gemma 4 cannot express) is refused, naming the key.
Gemma 3 files state less than its config.json: where they are silent, we assume what llama.cpp assumes
(`_gemma3_config`). Their norm weights hold 1 + w, the scale Gemma 3's RMSNorm applies: used as stored.

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
    "gemma3": "Gemma3ForCausalLM",
    "gemma4": "Gemma4ForCausalLM",
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
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}  # fmt: skip
# Gemma 3 and 4: their attention and MLP matrices are named as above; their sandwich norms are not (llama.cpp's
# ffn_norm is Gemma's pre-MLP norm). Gemma 3's norm weights hold 1 + w (llama.cpp's converter adds the 1 that
# Gemma 3's RMSNorm adds), Gemma 4's hold w (its norms multiply by w).
_GEMMA3_LAYER = _LAYER | {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma 4's experts are stacked gate|up as transformers stores them, and the router's two scales ride on
# ffn_gate_inp and ffn_down_exps.
_GEMMA4_LAYER = _GEMMA3_LAYER | {
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
_GEMMA4_TOP = _TOP | {
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}


def _translate(name: str, arch: str) -> list[tuple[str, int | None]]:
    """llama.cpp tensor name -> [(Hugging Face name, expert index or None)]; [] if not a known name.
    `arch`: the Hugging Face architecture."""
    gemma4, mixtral = arch == "Gemma4ForCausalLM", arch == "MixtralForCausalLM"
    top = _GEMMA4_TOP if gemma4 else _TOP
    if name in top:
        return [(top[name], None)]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        return []
    prefix, suffix = f"model.layers.{m[1]}.", m[2]
    layer = _GEMMA4_LAYER if gemma4 else _GEMMA3_LAYER if arch == "Gemma3ForCausalLM" else _LAYER
    if suffix in layer:
        hf = layer[suffix]
        if mixtral and hf == "mlp.gate.weight":
            hf = _MIXTRAL[hf]
        return [(prefix + hf, None)]
    if suffix in _EXPERTS and not gemma4:
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
    if isinstance(heads, list) or (isinstance(kv_heads, list) and arch != "gemma4"):
        raise GGUFError(f"{where}: per-layer head counts are not supported for '{arch}'")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise GGUFError(f"{where}: tokenizer.ggml.tokens is a {type(tokens).__name__}, not a list of tokens")
    vocab = gguf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gguf.tensors else len(tokens or [])
    if tokens is not None and len(tokens) > vocab:
        raise GGUFError(
            f"{where}: the vocabulary has {len(tokens)} tokens but token_embd.weight has rows for {vocab}: the "
            "tokenizer would produce ids the model has no embedding for — the file is corrupt; convert it again"
        )
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
    if arch == "gemma3":
        return cfg | _gemma3_config(gguf, a)
    if arch == "gemma4":
        return cfg | _gemma4_config(gguf, a)
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


def _gemma3_config(gguf: GGUFFile, a: Any) -> dict[str, Any]:
    """The Gemma 3 keys of config.json, as llama.cpp runs a gemma3 file. What the file does not state, llama.cpp
    assumes, and so do we: every 6th layer full (`attention.sliding_window_pattern` may give another period),
    none when there is no sliding window; RoPE base 10000 on sliding layers (`rope.freq_base_swa` may say
    otherwise), where the `rope.scaling.*` of full layers does not apply; scores scaled by 1/sqrt(key_length),
    except in 62-layer files (Gemma 3 27B, whose query_pre_attn_scalar is hidden / heads = 168)."""
    where = gguf.path
    n, hidden, heads = a("block_count"), a("embedding_length"), a("attention.head_count")
    head_dim = a("attention.key_length", hidden // heads)
    if a("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{where}: gemma3.attention.value_length differs from key_length")
    if a("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{where}: partial rotary embeddings ({a('rope.dimension_count')} dims) are not supported")
    window = a("attention.sliding_window", 0)
    period = a("attention.sliding_window_pattern", 6)
    if not isinstance(period, int) or period < 1:
        raise GGUFError(
            f"{where}: gemma3.attention.sliding_window_pattern={period!r}: expected one period (every period-th "
            "layer full); per-layer lists are not supported for gemma3"
        )
    scaling = a("rope.scaling.type", "none")
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": a("rope.freq_base", 1_000_000.0)}
    if scaling == "linear":
        full |= {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    elif scaling not in ("none", ""):
        raise GGUFError(f"{where}: RoPE scaling '{scaling}' is not supported for gemma3 (linear is)")
    return {
        "layer_types": [
            "sliding_attention" if window and i % period < period - 1 else "full_attention" for i in range(n)
        ],
        "sliding_window": window or None,
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if n == 62 else head_dim,
        "final_logit_softcapping": a("final_logit_softcapping", None),
        "hidden_activation": "gelu_pytorch_tanh",  # llama.cpp's Gemma 3 graph: GELU (tanh)
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": a("rope.freq_base_swa", 10_000.0)},
            "full_attention": full,
        },
    }


def _gemma4_config(gguf: GGUFFile, a: Any) -> dict[str, Any]:
    """The Gemma 4 keys of config.json, from llama.cpp's Gemma 4 metadata and which tensors the file has."""
    where, tensors = gguf.path, gguf.tensors
    n = a("block_count")
    swa = a("attention.sliding_window_pattern")
    if not isinstance(swa, list) or len(swa) != n:
        raise GGUFError(f"{where}: gemma4.attention.sliding_window_pattern must list {n} booleans, one per layer")
    if swa[-1]:
        raise GGUFError(
            f"{where}: gemma4.attention.sliding_window_pattern makes the last layer sliding; "
            "Gemma 4 (transformers) always runs it with full attention"
        )
    shared = a("attention.shared_kv_layers", 0)
    first_shared = n - shared
    for i in range(first_shared, n):  # llama.cpp reads the last or the second-to-last layer before them
        src = first_shared - (2 if swa[i] else 1)
        if src < 0 or swa[src] != swa[i] or swa[src + 1 : first_shared].count(swa[i]):
            raise GGUFError(
                f"{where}: gemma4.attention.shared_kv_layers={shared}: llama.cpp would read layer {i}'s "
                "K/V from another layer than Gemma 4 does (layer types don't end sliding, full)"
            )
    head_full, head_swa = a("attention.key_length"), a("attention.key_length_swa")
    if (a("attention.value_length", head_full), a("attention.value_length_swa", head_swa)) != (head_full, head_swa):
        raise GGUFError(f"{where}: gemma4.attention.value_length(_swa) differ from key_length(_swa)")
    kv = _per_layer(a("attention.head_count_kv"), n, "attention.head_count_kv", where)
    ff = _per_layer(a("feed_forward_length"), n, "feed_forward_length", where)
    double = ff != [ff[0]] * n
    if double and ff != [ff[0]] * first_shared + [2 * ff[0]] * shared:
        raise GGUFError(f"{where}: gemma4.feed_forward_length {ff}: only KV-shared layers may differ (twice as wide)")
    # attention_k_eq_v: full-attention layers without attn_v use their keys as values
    no_v = [i for i in range(first_shared) if f"blk.{i}.attn_v.weight" not in tensors]
    full = [i for i in range(first_shared) if not swa[i]]
    if no_v and no_v != full:
        raise GGUFError(
            f"{where}: layers {no_v} have no attn_v (values = keys); Gemma 4 allows that on every "
            f"full-attention layer ({full}) and on no other"
        )
    cfg: dict[str, Any] = {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
        "head_dim": head_swa,
        "num_key_value_heads": kv[0],
        "per_layer_config": {
            str(i): {"head_dim": head_swa if swa[i] else head_full, "num_key_value_heads": kv[i]} for i in range(n)
        },
        "num_kv_shared_layers": shared,
        "attention_k_eq_v": bool(no_v),
        "intermediate_size": ff[0],
        "use_double_wide_mlp": double,
        "sliding_window": a("attention.sliding_window"),
        "final_logit_softcapping": a("final_logit_softcapping", None),
        "hidden_activation": "gelu_pytorch_tanh",  # llama.cpp's Gemma 4 graph: GELU (tanh)
        "rope_parameters": _gemma4_rope(gguf, a, head_full, head_swa),
    }
    ple = a("embedding_length_per_layer_input", 0)
    cfg["hidden_size_per_layer_input"] = ple
    if ple:
        cfg["vocab_size_per_layer_input"] = tensors["per_layer_token_embd.weight"].shape[0]
    moe = [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" in tensors]
    if moe:
        if len(moe) != n:
            raise GGUFError(f"{where}: experts in layers {moe} only; Gemma 4 has them in every layer or in none")
        if "blk.0.ffn_gate_up_exps.weight" not in tensors:
            raise GGUFError(
                f"{where}: tensor 'blk.0.ffn_gate_up_exps.weight' is missing: hearthlm reads Gemma 4 "
                "experts as llama.cpp's converter writes them (gate|up stacked), not as separate "
                "ffn_gate_exps / ffn_up_exps"
            )
        inter = _per_layer(a("expert_feed_forward_length"), n, "expert_feed_forward_length", where)
        if inter != [inter[0]] * n:
            raise GGUFError(f"{where}: gemma4.expert_feed_forward_length varies by layer ({inter})")
        cfg.update(
            enable_moe_block=True,
            num_experts=a("expert_count"),
            top_k_experts=a("expert_used_count"),
            moe_intermediate_size=inter[0],
        )
    return cfg


def _per_layer(value: int | list[int], n: int, key: str, where: Path) -> list[int]:
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise GGUFError(f"{where}: gemma4.{key} lists {len(value)} values for {n} layers")
    return value


def _gemma4_rope(gguf: GGUFFile, a: Any, head_full: int, head_swa: int) -> dict[str, Any]:
    """Sliding layers: plain RoPE. Full layers: llama.cpp rotates all dims, dividing each frequency by its
    `rope_freqs` factor; factors 1 then 1e30 (no rotation) are transformers' proportional RoPE."""
    where = gguf.path
    for key, dims in (("rope.dimension_count", head_full), ("rope.dimension_count_swa", head_swa)):
        if a(key, dims) != dims:
            raise GGUFError(f"{where}: gemma4.{key}={a(key)}: partial RoPE other than by rope_freqs is not supported")
    theta = a("rope.freq_base", 1_000_000.0)
    sliding = {"rope_type": "default", "rope_theta": a("rope.freq_base_swa", theta)}
    factors = freq_factors(gguf)
    if factors is None:
        return {"sliding_attention": sliding, "full_attention": {"rope_type": "default", "rope_theta": theta}}
    rotated = next((i for i, f in enumerate(factors) if f != 1.0), len(factors))
    if len(factors) != head_full // 2 or any(f < 1e20 for f in factors[rotated:]):
        raise GGUFError(
            f"{where}: tensor 'rope_freqs.weight' is not proportional RoPE's ({head_full // 2} factors: 1 "
            "for the rotated frequencies, then 1e30): other factors are not supported for Gemma 4"
        )
    full = {"rope_type": "proportional", "partial_rotary_factor": 2 * rotated / head_full, "rope_theta": theta}
    return {"sliding_attention": sliding, "full_attention": full}


class GGUFCheckpoint:
    """A GGUF file addressed by Hugging Face tensor names (the Checkpoint interface the loader uses)."""

    def __init__(self, gguf: GGUFFile, cfg: dict[str, Any]):
        self.gguf = gguf
        self.folder = gguf.path
        self.permute = gguf.architecture == "llama"  # llama.cpp interleaves the RoPE halves of q and k rows
        self.heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
        self.arch = cfg["architectures"][0]
        self._where: dict[str, tuple[str, int | None]] = {}
        for name, info in gguf.tensors.items():
            for hf, expert in _translate(name, self.arch):
                if expert is None:
                    self._where[hf] = (name, None)
                else:
                    for e in range(info.shape[0]):
                        self._where[hf.format(e=e)] = (name, e)

    def names(self) -> list[str]:
        used = {"rope_freqs.weight"}  # read into the config
        return list(self._where) + [n for n in self.gguf.tensors if not _translate(n, self.arch) and n not in used]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.gguf.path

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape (one expert's for an expert of a stacked tensor) from the file's header."""
        gname, expert = self._where[name]
        shape = self.gguf.tensors[gname].shape
        return shape if expert is None else shape[1:]

    def gguf_name(self, name: str) -> str:
        return self._where[name][0]

    def stores_plus_one(self, name: str) -> bool:
        """llama.cpp's converter writes Gemma 3's norm weights as 1 + w (mapping.PlusOne)."""
        return self.arch == "Gemma3ForCausalLM" and name.endswith("norm.weight")

    def get(self, name: str) -> QuantTensor | torch.Tensor:
        if name not in self._where:
            raise GGUFError(f"{self.gguf.path}: tensor '{name}' (llama.cpp naming) is missing from the file")
        gname, expert = self._where[name]
        tensor = self._read(gname) if expert is None else self._read_expert(gname, expert)
        if self.permute and re.search(r"self_attn\.[qk]_proj\.", name):
            heads = self.heads[0] if ".q_proj." in name else self.heads[1]
            tensor = _unpermute(tensor, heads)
        return tensor

    def table(self, name: str) -> ggml.GGMLRows | QuantTensor | torch.Tensor:
        """A table read a few rows at a time (the model's `keep_storage_dtype`): a block type stays in the file as
        GGMLRows instead of being repacked into memory; float types are views of the file anyway."""
        gname, expert = self._where.get(name, (None, None))
        info = self.gguf.tensors.get(gname)
        if info is None or expert is not None or info.ggml_type in ggml.FLOAT_TYPES or len(info.shape) != 2:
            return self.get(name)
        try:
            return ggml.GGMLRows(self.gguf.raw(gname), info.ggml_type, info.shape)
        except ggml.GGMLTypeError as e:
            raise GGUFError(f"{self.gguf.path}: tensor '{gname}': {e}") from None

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
