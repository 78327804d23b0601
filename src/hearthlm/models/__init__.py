"""Registry: config.json `architectures` / `model_type` -> model class (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

from ..config import ConfigError

# architecture -> (module, class); Gemma 3's and Gemma 4's multimodal wrappers load their text model only.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaModel"),
    "MistralForCausalLM": ("llama", "LlamaModel"),
    "Qwen2ForCausalLM": ("llama", "LlamaModel"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3Model"),
    "Qwen3MoeForCausalLM": ("qwen3", "Qwen3Model"),
    "MixtralForCausalLM": ("mixtral", "MixtralModel"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3Model"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3Model"),
    "Gemma4ForCausalLM": ("gemma4", "Gemma4Model"),
    "Gemma4ForConditionalGeneration": ("gemma4", "Gemma4Model"),
    # Embedding models: base models without an LM head (sentence-transformers folders save these).
    "Gemma3TextModel": ("gemma3", "Gemma3Model"),  # EmbeddingGemma (use_bidirectional_attention)
    "Qwen3Model": ("qwen3", "Qwen3Model"),  # Qwen3-Embedding
    "EmbeddingGemma2Model": ("embedding_gemma2", "EmbeddingGemma2"),
    "EmbeddingGemma2TextModel": ("embedding_gemma2", "EmbeddingGemma2"),
}
# config in text_config
MULTIMODAL = {"Gemma3ForConditionalGeneration", "Gemma4ForConditionalGeneration", "EmbeddingGemma2Model"}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gemma4_text": "Gemma4ForCausalLM",
    "gemma4": "Gemma4ForConditionalGeneration",
    "embedding_gemma2_text": "EmbeddingGemma2TextModel",
    "embedding_gemma2": "EmbeddingGemma2Model",
}


def resolve(hf: dict[str, Any], where: str) -> tuple[type, str, dict[str, Any]]:
    """-> (model class, architecture name, the text model's config dict)."""
    archs = [a for a in hf.get("architectures") or [] if a in ARCHITECTURES]
    arch = archs[0] if archs else MODEL_TYPES.get(hf.get("model_type", ""))
    if arch is None and hf.get("model_type") == "gemma4_assistant":
        raise ConfigError(
            f"{where}: a speculative-decoding drafter (Gemma 4 MTP), not a model to run on its own: give it as "
            "--draft (or LLM(draft=...)) to the model it was made for, or use --draft auto beside it"
        )
    if arch is None:
        named = hf.get("architectures") or hf.get("model_type") or "nothing"
        raise ConfigError(
            f"{where}: unsupported architecture {named}; hearthlm supports " + ", ".join(sorted(ARCHITECTURES))
        )
    text = hf
    if arch in MULTIMODAL:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: {arch} config has no text_config (the text model's config)")
    module, name = ARCHITECTURES[arch]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls, arch, text
