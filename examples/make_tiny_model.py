"""Write a tiny random Gemma 4 checkpoint (config.json, model.safetensors, tokenizer.json) to a folder.

It exercises the whole path of a real checkpoint — per-layer embeddings, KV-shared layers, sliding and
full attention, softcapping — offline and in seconds. Its weights are random, so its text is noise;
the trained demo model that ships with the package comes later.

    python examples/make_tiny_model.py /tmp/tiny-gemma4 && hearth run /tmp/tiny-gemma4 "Hello"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = """In the beginning the hearth was the centre of the house: it gave heat and light, it cooked the food,
and people gathered round it to talk. A local language model is a small hearth of its own."""

CONFIG = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "global_head_dim": 64,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "num_kv_shared_layers": 2,
    "use_double_wide_mlp": True,
    "hidden_size_per_layer_input": 16,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


def tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def weights(cfg: dict, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    H, L, P = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5  # noqa: E731
    w = {
        "model.embed_tokens.weight": rand(vocab, H),
        "model.norm.weight": torch.ones(H),
        "model.embed_tokens_per_layer.weight": rand(vocab, L * P),
        "model.per_layer_model_projection.weight": rand(L * P, H),
        "model.per_layer_projection_norm.weight": torch.ones(P),
    }
    first_shared = L - cfg["num_kv_shared_layers"]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        d = cfg["global_head_dim"] if kind == "full_attention" else cfg["head_dim"]
        kv = cfg["num_key_value_heads"] * d
        inter = cfg["intermediate_size"] * (2 if i >= first_shared else 1)
        w |= {
            p + "self_attn.q_proj.weight": rand(cfg["num_attention_heads"] * d, H),
            p + "self_attn.o_proj.weight": rand(H, cfg["num_attention_heads"] * d),
            p + "self_attn.q_norm.weight": torch.ones(d),
            p + "layer_scalar": torch.ones(1),
            p + "mlp.gate_proj.weight": rand(inter, H),
            p + "mlp.up_proj.weight": rand(inter, H),
            p + "mlp.down_proj.weight": rand(H, inter),
            p + "per_layer_input_gate.weight": rand(P, H),
            p + "per_layer_projection.weight": rand(H, P),
        }
        if i < first_shared:
            w |= {
                p + "self_attn.k_proj.weight": rand(kv, H),
                p + "self_attn.v_proj.weight": rand(kv, H),
                p + "self_attn.k_norm.weight": torch.ones(d),
            }
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_per_layer_input_norm",
        ):
            w[p + norm + ".weight"] = torch.ones(H)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(512)
    vocab = tok.get_vocab_size()
    cfg = CONFIG | {"vocab_size": vocab, "vocab_size_per_layer_input": vocab}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(folder / "tokenizer.json"))
    save_file(weights(cfg, vocab), str(folder / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote a tiny random Gemma 4 checkpoint to {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-gemma4"))
