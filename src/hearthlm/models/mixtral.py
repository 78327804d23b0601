"""Mixtral: Mistral's decoder with every MLP replaced by 8 routed experts (top-2, renormalized)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .llama import LlamaModel, decoder_config


class MixtralModel(LlamaModel):
    expert_names = (
        "block_sparse_moe.experts.{e}.w1",
        "block_sparse_moe.experts.{e}.w3",
        "block_sparse_moe.experts.{e}.w2",
    )
    router_name = "block_sparse_moe.gate"

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any], arch: str, where: str) -> ModelConfig:
        return decoder_config(
            hf,
            arch,
            "mixtral",
            where,
            moe_layers=set(range(hf["num_hidden_layers"])),
            num_experts=hf["num_local_experts"],
            experts_per_token=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"],
            norm_topk_prob=True,
        )
