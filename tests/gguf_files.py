"""GGUF files for tests, written with the `gguf` package's writer from transformers models, the way
llama.cpp's convert_hf_to_gguf.py lays them out: llama.cpp tensor names, q/k rows of the `llama`
architecture permuted into llama.cpp's RoPE order, Llama 3 RoPE scaling as a `rope_freqs` tensor, experts
stacked, 1-D tensors in F32 and matrices in the requested type (F32 where the row length does not fit the
type's blocks).

Gemma 4 as llama.cpp's Gemma4Model converter writes it: per-layer arrays for the sliding pattern, the KV
heads (where full layers differ) and the MLP width (double-wide KV-shared layers), sliding/full head sizes
and RoPE bases under `*_swa` keys, proportional RoPE as a `rope_freqs` tensor (1 for the rotated
frequencies, 1e30 for the others), norm weights as stored (no +1), the router's scales as
`ffn_gate_inp.scale` / `ffn_down_exps.scale`, the stacked gate|up experts as `ffn_gate_up_exps`, and no
`attn_v` where values are the keys (attention_k_eq_v). llama.cpp (tests/test_gguf_gemma4.py) checks it.

Gemma 3 as llama.cpp's Gemma3Model converter writes it: Gemma's norm names, norm weights + 1 (Gemma 3's RMSNorm
scales by 1 + w; llama.cpp by the stored weight), one head size, the full layers' RoPE base and linear scaling, the
sliding window; no key for the sliding pattern, the sliding layers' RoPE base or query_pre_attn_scalar, which
llama.cpp assumes (a config it would assume otherwise is refused here). tests/test_gguf_gemma3.py checks it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
        "Qwen3MoeForCausalLM": "qwen3moe", "MixtralForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3",
        "Gemma4ForCausalLM": "gemma4"}  # fmt: skip
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}

# Gemma 3's and 4's sandwich norms (the attention and MLP matrices are named as in _LAYER).
_GEMMA_NORMS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
# Gemma 4's own per-layer names.
_GEMMA4_LAYER = _GEMMA_NORMS | {
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "layer_scalar": "layer_output_scale.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
}
_GEMMA4_TOP = {
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order (what convert_hf_to_gguf.py does for llama)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg: dict) -> np.ndarray:
    rope = cfg["rope_parameters"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = rope["rope_theta"]
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old = rope["original_max_position_embeddings"]
    low, high = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float32 array -> (bytes or float array, type) as the writer takes it; F32 where blocks don't fit."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim < 2 or data.shape[-1] % block:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    if qtype in K_QUANTIZERS:
        return K_QUANTIZERS[qtype](data), qtype
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def write(
    model: torch.nn.Module,
    path: Path,
    qtype=gguf.GGMLQuantizationType.F32,
    vocab_tokens=None,
    vocab=None,
    edit=None,
) -> Path:
    """Write a transformers causal LM as llama.cpp's converter would; `vocab_tokens` optional token strings,
    or `vocab(writer)` the tokenizer metadata; `edit(writer)`, called last, changes the metadata written (for files
    that say what the converter would not)."""
    cfg = model.config.to_dict()

    def metadata(w: gguf.GGUFWriter) -> None:
        if vocab_tokens is not None:
            w.add_tokenizer_model("gpt2")
            w.add_token_list(vocab_tokens)
        elif vocab is not None:
            vocab(w)
        if edit is not None:
            edit(w)

    state = ((name, t.detach().float().numpy()) for name, t in model.state_dict().items())
    return write_gguf(path, type(model).__name__, cfg, state, qtype, metadata)


DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "src/hearthlm/demo/hearth-demo/tokenizer.json"


def demo_vocab(vocab_size: int):
    """-> vocab(writer): the demo model's byte-level BPE (`pre` qwen2), padded with unused tokens to
    `vocab_size`, for files that llama.cpp must load (it needs a real vocabulary) and that are fed token ids."""
    spec = json.loads(DEMO_TOKENIZER.read_text())
    ids = spec["model"]["vocab"] | {a["content"]: a["id"] for a in spec["added_tokens"]}
    if vocab_size < len(ids):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the demo tokenizer's {len(ids)} tokens")
    special = {a["id"] for a in spec["added_tokens"] if a.get("special")}
    tokens = [f"<unused{i}>" for i in range(vocab_size)]
    for text, i in ids.items():
        tokens[i] = text
    types = [3 if i in special else 1 if i < len(ids) else 5 for i in range(vocab_size)]  # control, normal, unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    def vocab(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)

    return vocab


_GEMMA4_TEXT = (
    "the quick brown fox jumps over the lazy dog.\nthen the dog sleeps, and the fox runs away!\n\n"
    "    def main():\n        return 42\n\n\nhello world, hello there; what is the time?\n"
)


def _learn_pieces(tokens: list[str], vocab_size: int) -> list[str]:
    """Extend `tokens` with the text's characters, then with merges of the most frequent adjacent pair (ties: first
    in text order) until `vocab_size` tokens; -> the merges ("left right"), in order."""
    words = [w.replace(" ", "▁") for w in re.findall(r"[^\n]+|\n+", _GEMMA4_TEXT)]
    tokens += sorted(set("".join(words)))
    pieces = [list(w) for w in words]
    merges = []
    while len(tokens) < vocab_size:
        pairs = Counter(p for w in pieces for p in zip(w, w[1:]) if "".join(p) not in tokens)
        if not pairs:
            raise ValueError(f"the text yields fewer than {vocab_size} tokens")
        left, right = max(pairs, key=pairs.get)
        merges.append(f"{left} {right}")
        tokens.append(left + right)
        for w in pieces:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (left, right):
                    w[i : i + 2] = [left + right]
                i += 1
    return merges


def _gemma_special_keys(w: gguf.GGUFWriter) -> None:
    """Gemma's special token ids (eos comes from the config), no prefix space, a BOS before every prompt."""
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def gemma4_vocab(vocab_size: int, byte_tokens: bool = False, learnt: int | None = None):
    """-> vocab(writer): a small vocabulary of Gemma 4's kind (tokenizer.ggml.model "gemma4": BPE over
    characters with "▁" for spaces, merges in the file), learnt from a fixed text: Gemma 4's special tokens at
    their ids (pad 0, eos 1, bos 2, unk 3, mask 4), its turn markers, optionally the 256 <0xXX> byte tokens,
    the text's characters, then merges until `vocab_size` tokens; or until `learnt` tokens, the rest unused
    (full-size vocabularies for files that benchmarks feed token ids)."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    tokens = special + ([f"<0x{b:02X}>" for b in range(256)] if byte_tokens else [])
    merges = _learn_pieces(tokens, learnt or vocab_size)
    types = [3] * len(special) + [6 if t.startswith("<0x") else 1 for t in tokens[len(special) :]]
    types += [5] * (vocab_size - len(tokens))  # unused
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab_size)]

    def vocab(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gemma4")
        w.add_token_list(tokens)
        w.add_token_scores([-1000.0] * len(tokens))
        w.add_token_types(types)
        w.add_token_merges(merges)
        _gemma_special_keys(w)

    return vocab


def gemma3_vocab(vocab_size: int, byte_tokens: bool = False):
    """-> vocab(writer): a small vocabulary of Gemma 3's kind as llama.cpp's converter writes it from
    tokenizer.model (tokenizer.ggml.model "llama": SentencePiece, "▁" for spaces, no prefix space, no merges: a
    merged piece's score ranks it), learnt from gemma4_vocab's text: Gemma's special tokens at their ids (pad 0,
    eos 1, bos 2, unk 3, mask 4), the turn markers, optionally the byte tokens, characters, merged pieces."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = special + ([f"<0x{b:02X}>" for b in range(256)] if byte_tokens else [])
    merges = _learn_pieces(tokens, vocab_size)
    merged = len(tokens) - len(merges)
    scores = [0.0] * merged + [-float(i) for i in range(len(merges))]  # earlier merges first
    # special tokens are control tokens (tokenizer_config.json marks them special)
    types = [3] * len(special) + [6 if t.startswith("<0x") else 1 for t in tokens[len(special) :]]

    def vocab(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        _gemma_special_keys(w)

    return vocab


def write_gguf(path: Path, hf_arch: str, cfg: dict, tensors, qtype, vocab=None, head_qtype=None) -> Path:
    """A GGUF file from a config.json dict and (Hugging Face name, float array) pairs; `vocab(writer)` adds
    the tokenizer metadata; `head_qtype`: the type of the LM head (output.weight, or token_embd.weight when the
    embeddings are tied) where it differs from `qtype`. Shared by the tests and benchmarks/decode.py."""
    arch = ARCH[hf_arch]
    w = gguf.GGUFWriter(str(path), arch)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if arch == "gemma4":
        _gemma4_metadata(w, cfg)
    elif arch == "gemma3":
        _gemma3_metadata(w, cfg)
    else:
        _metadata(w, arch, cfg, heads, kv_heads, head_dim)
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None:
        w.add_eos_token_id(eos)
    if vocab is not None:
        vocab(w)
    for name, data in tensors:
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        for gname, part in _gguf_tensors(name, data, arch, heads, kv_heads):
            head = gname == "output.weight" or (gname == "token_embd.weight" and cfg.get("tie_word_embeddings"))
            encoded, ttype = encode(part, head_qtype if head and head_qtype is not None else qtype)
            w.add_tensor(gname, encoded, raw_dtype=ttype if ttype not in (0, 1) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _shape_metadata(w: gguf.GGUFWriter, cfg: dict, heads: int, kv_heads: int) -> None:
    """The sizes every architecture states, one value for all layers."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


def _metadata(w: gguf.GGUFWriter, arch: str, cfg: dict, heads: int, kv_heads: int, head_dim: int) -> None:
    _shape_metadata(w, cfg, heads, kv_heads)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        w.add_bool(f"{arch}.expert_weights_norm", bool(cfg.get("norm_topk_prob", True)))
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg))


def _gemma3_metadata(w: gguf.GGUFWriter, cfg: dict) -> None:
    """What llama.cpp's Gemma3Model converter writes (for a transformers 5 config), after checking that llama.cpp's
    assumptions for what it does not write hold."""
    n, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    rope = cfg["rope_parameters"]
    assumed = {
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)],
        "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if n == 62 else head_dim,
        "sliding RoPE": {"rope_type": "default", "rope_theta": 10_000.0},
        "attention_bias": False,
    }
    actual = {"sliding RoPE": rope["sliding_attention"]} | {k: cfg[k] for k in assumed if k in cfg}
    if actual != assumed:
        raise ValueError(f"llama.cpp would run this Gemma 3 otherwise: it assumes {assumed}, the config has {actual}")
    _shape_metadata(w, cfg, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    if rope["full_attention"]["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["full_attention"]["factor"])
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def _gemma4_metadata(w: gguf.GGUFWriter, cfg: dict) -> None:
    """What llama.cpp's Gemma4Model converter writes (for a transformers 5 config: per-layer head sizes and
    KV heads in `per_layer_config`)."""
    n = cfg["num_hidden_layers"]
    swa = [t == "sliding_attention" for t in cfg["layer_types"]]
    full = swa.index(False)
    per_layer = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
    head_dim, head_full = cfg["head_dim"], cfg.get("global_head_dim") or per_layer[full]["head_dim"]
    kv_full = cfg.get("num_global_key_value_heads") or per_layer.get(full, {}).get("num_key_value_heads")
    shared = cfg.get("num_kv_shared_layers") or 0
    inter = cfg["intermediate_size"]
    rope = cfg["rope_parameters"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n)
    if cfg.get("use_double_wide_mlp"):
        w.add_feed_forward_length([inter if i < n - shared else 2 * inter for i in range(n)])
    else:
        w.add_feed_forward_length(inter)
    w.add_head_count(cfg["num_attention_heads"])
    kv = cfg["num_key_value_heads"]
    w.add_head_count_kv(kv if kv_full is None else [kv if s else kv_full for s in swa])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_key_length(head_full)
    w.add_value_length(head_full)
    w.add_key_length_swa(head_dim)
    w.add_value_length_swa(head_dim)
    w.add_rope_dimension_count(head_full)  # all dims; the unrotated ones get factor 1e30 in rope_freqs
    w.add_rope_dimension_count_swa(head_dim)
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(cfg.get("hidden_size_per_layer_input") or 0)
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("enable_moe_block"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["top_k_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    rotated = int(head_full * rope["full_attention"]["partial_rotary_factor"] / 2)
    factors = [1.0] * rotated + [1e30] * (head_full // 2 - rotated)
    w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))


def _gguf_tensors(name: str, data: np.ndarray, arch: str, heads: int, kv_heads: int):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if name in top:
        return [(top[name], data + np.float32(1) if arch == "gemma3" and name == "model.norm.weight" else data)]
    if arch == "gemma4" and name in _GEMMA4_TOP:
        return [(_GEMMA4_TOP[name], data)]
    parts = name.split(".")
    i, suffix = parts[2], ".".join(parts[3:])
    if arch == "gemma4" and suffix in _GEMMA4_LAYER:
        return [(f"blk.{i}.{_GEMMA4_LAYER[suffix]}", np.ascontiguousarray(data))]
    if arch == "gemma3" and suffix.endswith("norm.weight"):  # 1 + w, added in float32
        return [(f"blk.{i}.{(_LAYER | _GEMMA_NORMS)[suffix]}", data.astype(np.float32) + np.float32(1))]
    if suffix == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows then up rows
        half = data.shape[1] // 2
        return [(f"blk.{i}.ffn_gate_exps.weight", data[:, :half]), (f"blk.{i}.ffn_up_exps.weight", data[:, half:])]
    if suffix == "mlp.experts.down_proj":
        return [(f"blk.{i}.ffn_down_exps.weight", data)]
    if arch == "llama" and suffix == "self_attn.q_proj.weight":
        data = _permute(data, heads)
    if arch == "llama" and suffix == "self_attn.k_proj.weight":
        data = _permute(data, kv_heads)
    return [(f"blk.{i}.{_LAYER[suffix]}", np.ascontiguousarray(data))]


# -- K-quant blocks (gguf's numpy code can only dequantize these): simple, valid encoders --------------
def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1) if x.ndim > 1 else x.astype(np.float16)


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12 packed bytes of Q4_K / Q5_K."""
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out


def _k_scales(x: np.ndarray, levels: int):
    """x [n, 8, 32] -> (d, dmin, 6-bit scales, 6-bit mins, integers q [n, 8, 32] in 0..levels)."""
    lo = np.minimum(x.min(-1), 0)
    hi = x.max(-1)
    scale = np.maximum(hi - lo, 1e-8) / levels
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(-1) / 63).astype(np.float16).astype(np.float32)
    d = np.where(d > 0, d, 1e-8)
    dmin = np.where(dmin > 0, dmin, 1e-8)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    s = d[:, None] * sc
    m = dmin[:, None] * mn
    q = np.clip(np.round((x + m[..., None]) / s[..., None]), 0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def _q4_k(data: np.ndarray) -> np.ndarray:
    rows = data.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, mn, q = _k_scales(rows, 15)
    q = q.reshape(-1, 4, 2, 32)  # per 64 elements: low nibbles = first 32, high = next 32
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scale_min_k4(sc, mn), qs], axis=1)
    return blocks.reshape(*data.shape[:-1], -1)


def _q5_k(data: np.ndarray) -> np.ndarray:
    rows = data.reshape(-1, 8, 32).astype(np.float32)
    d, dmin, sc, mn, q = _k_scales(rows, 31)
    low, high = q & 15, q >> 4  # [n, 8, 32]
    low = low.reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((len(rows), 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] << j).astype(np.uint8)
    blocks = np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scale_min_k4(sc, mn), qh, qs], axis=1)
    return blocks.reshape(*data.shape[:-1], -1)


def _q6_k(data: np.ndarray) -> np.ndarray:
    x = data.reshape(-1, 16, 16).astype(np.float32)
    amax = np.abs(x).max(-1)
    scale = np.maximum(amax, 1e-8) / 31
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
    d = np.where(d > 0, d, 1e-8)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    s = d[:, None] * sc
    q = (np.clip(np.round(x / s[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    # 256 values in two halves of 128; in each half, element l + 32k (k = 0..3) shares ql/qh bytes.
    ql = np.zeros((len(q), 128), dtype=np.uint8)
    qh = np.zeros((len(q), 64), dtype=np.uint8)
    for half in range(2):
        v = q[:, 128 * half : 128 * (half + 1)].reshape(-1, 4, 32)
        ql[:, 64 * half : 64 * half + 32] = (v[:, 0] & 15) | ((v[:, 2] & 15) << 4)
        ql[:, 64 * half + 32 : 64 * half + 64] = (v[:, 1] & 15) | ((v[:, 3] & 15) << 4)
        qh[:, 32 * half : 32 * half + 32] = (
            (v[:, 0] >> 4) | ((v[:, 1] >> 4) << 2) | ((v[:, 2] >> 4) << 4) | ((v[:, 3] >> 4) << 6)
        )
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), _f16(d[:, None])], axis=1)
    return blocks.reshape(*data.shape[:-1], -1)


K_QUANTIZERS = {
    gguf.GGMLQuantizationType.Q4_K: _q4_k,
    gguf.GGMLQuantizationType.Q5_K: _q5_k,
    gguf.GGMLQuantizationType.Q6_K: _q6_k,
}
