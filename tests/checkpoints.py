"""Tiny random checkpoints made by transformers itself, one per family and feature set.

Every parameter is re-drawn so that no weight sits at its init value (norm weights around 1, layer
scalars and expert scales away from 1), and the result is saved as a real checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

VOCAB = 96


def _gemma4_text(**over) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    base.update(over)
    return base


def _gemma3_text(**over) -> dict:
    # Gemma 4's tiny shapes (the keys mean the same), and a score scale that is not head_dim's: read, not assumed.
    return _gemma4_text(query_pre_attn_scalar=24) | over


def _decoder(**over) -> dict:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
    )  # fmt: skip
    base.update(over)
    return base


# Gemma 4's KV-shared layers (with the double-wide MLP), PLE (its width set per family) and k=v on full layers.
_GEMMA4_E2B_31B_FEATURES = dict(
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    num_kv_shared_layers=3,
    use_double_wide_mlp=True,
    vocab_size_per_layer_input=VOCAB,
)

# name -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {  # fmt: skip
    # PLE + KV-shared layers (double-wide MLP) + k=v on full layers + MoE + softcapping.
    "gemma4_all": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        _gemma4_text(
            **_GEMMA4_E2B_31B_FEATURES,
            hidden_size_per_layer_input=8,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=24,
            final_logit_softcapping=30.0,
        ),
    ),
    # E2B/E4B's layers, and 31B's k=v: PLE + KV-shared layers (double-wide MLP) + k=v on full layers, no MoE.
    "gemma4_dense": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        _gemma4_text(**_GEMMA4_E2B_31B_FEATURES, hidden_size_per_layer_input=32),
    ),
    # None of those: dense, every layer its own K/V, separate v_proj, no PLE, no softcap.
    "gemma4_plain": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        _gemma4_text(
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            global_head_dim=32,
            hidden_size_per_layer_input=0,
            final_logit_softcapping=None,
            tie_word_embeddings=False,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.5,
                    "rope_theta": 1e5,
                },
            },
        ),
    ),
    # Released Gemma 3's features (1 + w norms throughout): sliding/full layers from a pattern, their own RoPE
    # bases, linear RoPE scaling on full layers (4B-27B use factor 8), tied embeddings.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _gemma3_text(
            sliding_window_pattern=3,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0},
            },
        ),
    ),
    # Shaped like the Hub's 4B/12B configs, which leave these to the defaults: every 6th layer full (7 layers: the
    # last one slides, as 1B's 26th), sliding RoPE base 10000, query_pre_attn_scalar = head_dim; linear factor 8.
    # What a gemma3 GGUF file can state (llama.cpp assumes the rest): tests/test_gguf*.py use it.
    "gemma3_hub": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _gemma3_text(
            num_hidden_layers=7,
            query_pre_attn_scalar=16,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
        ),
    ),
    # What the released ones leave off: q/k/v/o biases, an LM head, final softcapping, a last layer that slides.
    "gemma3_bias": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _gemma3_text(
            num_hidden_layers=5,
            layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
            attention_bias=True,
            tie_word_embeddings=False,
            final_logit_softcapping=10.0,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _decoder(
            tie_word_embeddings=True,
            bos_token_id=1,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        _decoder(
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", _decoder(num_key_value_heads=1, head_dim=32, sliding_window=8)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _decoder(head_dim=24, tie_word_embeddings=True)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        _decoder(
            moe_intermediate_size=32,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    # Deeper ones for 4 pipeline stages: 6 Llama layers; 9 Gemma 4 layers whose last 3 read the caches of layers
    # 4 and 5 (so the cuts that work are 1-4), with PLE and k=v.
    "llama_deep": ("LlamaConfig", "LlamaForCausalLM", _decoder(num_hidden_layers=6, tie_word_embeddings=True)),
    "gemma4_deep": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        _gemma4_text(
            **_GEMMA4_E2B_31B_FEATURES
            | {"layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 3},
            num_hidden_layers=9,
            hidden_size_per_layer_input=32,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        _decoder(
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
    ),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter and float buffer: matrices ~ N(0, 1/fan_in), vectors (norms, scales) ~ 1 ± 0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + [
            (n, b)
            for n, b in model.named_buffers()
            if b.is_floating_point() and "inv_freq" not in n and "embed_scale" not in n
        ]
        for _, t in tensors:
            if t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)
            else:
                t.copy_(1.0 + 0.3 * (2 * torch.rand(t.shape, generator=g) - 1))


def build(name: str) -> tuple[torch.nn.Module, dict]:
    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(tf, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(config).eval()
    perturb(model, seed=sum(map(ord, name)))
    return model, kwargs


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def save_gemma3_multimodal(text_model: torch.nn.Module, folder: Path) -> Path:
    """Wrap a Gemma3ForCausalLM's weights in a Gemma3ForConditionalGeneration (with a vision tower), its
    text_config written as the Hub's are: only the keys that differ from Gemma3TextConfig's defaults, in the
    transformers 4 dialect (sliding_window_pattern, rope_theta, rope_local_base_freq, rope_scaling)."""
    cfg = text_model.config
    period = cfg.layer_types.index("full_attention") + 1  # checked below: transformers reads the same types
    rope = cfg.rope_parameters
    scaling = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
    dropped = ("layer_types", "rope_parameters", "_sliding_window_pattern")
    hub = {k: v for k, v in cfg.to_dict().items() if k not in dropped} | {
        "sliding_window_pattern": period,
        "rope_theta": rope["full_attention"]["rope_theta"],
        "rope_local_base_freq": rope["sliding_attention"]["rope_theta"],
        "rope_scaling": None if scaling == {"rope_type": "default"} else scaling,
    }
    defaults = tf.Gemma3TextConfig().to_dict()
    hub = {k: v for k, v in hub.items() if k not in defaults or defaults[k] != v or k == "model_type"}
    theirs, ours = tf.Gemma3TextConfig(**hub).to_dict(), cfg.to_dict()
    differ = {
        k: (theirs.get(k), ours.get(k))
        for k in (theirs.keys() | ours.keys()) - {"dtype"}
        if theirs.get(k) != ours.get(k)
    }
    assert not differ, f"the Hub dialect describes another model: {differ}"
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = tf.Gemma3Config(text_config=cfg.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    mm = tf.Gemma3ForConditionalGeneration(config).eval()
    perturb(mm, seed=7)
    mm.model.language_model.load_state_dict(text_model.model.state_dict())
    mm.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["text_config"] = hub
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder


def save_gemma4_multimodal(text_model: torch.nn.Module, folder: Path) -> Path:
    """Wrap a Gemma4ForCausalLM's weights in a Gemma4ForConditionalGeneration (with a vision tower),
    written with a Hub-style text_config (global_head_dim instead of per_layer_config)."""
    text_cfg = text_model.config.to_dict()
    vision = tf.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = tf.Gemma4Config(text_config=text_cfg, vision_config=vision.to_dict())
    mm = tf.Gemma4ForConditionalGeneration(config).eval()
    perturb(mm, seed=7)
    mm.model.language_model.load_state_dict(text_model.model.state_dict())
    mm.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    per_layer = cfg["text_config"].pop("per_layer_config")
    full = next(iter(per_layer.values()))
    cfg["text_config"]["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        cfg["text_config"]["num_global_key_value_heads"] = full["num_key_value_heads"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
