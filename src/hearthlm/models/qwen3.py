"""Qwen3 (q/k RMSNorm per head) and Qwen3-MoE (routed experts, except on `mlp_only_layers`)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .llama import LlamaModel, decoder_config


class Qwen3Model(LlamaModel):
    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        if arch != "Qwen3MoeForCausalLM":
            return decoder_config(hf, arch, "qwen3", where, qk_norm=True)
        dense = set(hf.get("mlp_only_layers") or [])
        step = hf.get("decoder_sparse_step", 1)
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 0  # transformers 5 saves the latter
        moe = {i for i in range(hf["num_hidden_layers"]) if i not in dense and experts > 0 and (i + 1) % step == 0}
        return decoder_config(
            hf,
            arch,
            "qwen3_moe",
            where,
            qk_norm=True,
            moe_layers=moe,
            num_experts=experts,
            experts_per_token=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )
