"""What every family model shares: embeddings, RoPE tables, the LM head and the forward contract."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..layers.attention import Batch, rope_key
from ..layers.embedding import Embedding
from ..layers.linear import Linear, linear
from ..layers.norm import RMSNorm
from ..layers.rotary import Rotary
from ..layers.softcap import softcap_
from ..weights.mapping import Source


class CausalLM(nn.Module):
    """forward(ids, batch) -> hidden states; logits(hidden) -> float32 logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        no_head = cfg.tie_embeddings or cfg.pooling is not None  # an embedding model has no LM head
        self.lm_head = None if no_head else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotaries = {rope_key(s): Rotary(s.rope, s.head_dim) for s in cfg.layers}
        # The dtype the model was loaded in: of its float weights and of the KV cache (quantized weights too
        # stand in for it). The loader sets it.
        self.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations' dtype. On CPU always float32: without AVX-512, half-precision elementwise ops and
        conversions cost more than they save, and the weights are read in fp16/bf16 all the same."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).to(self.compute_dtype)

    def prepare(self, batch: Batch) -> None:
        """Compute cos/sin once per distinct RoPE (per layer type) for this step's positions."""
        batch.rope = {key: rot.cos_sin(batch.positions, self.compute_dtype) for key, rot in self.rotaries.items()}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return softcap_(linear(self.norm(hidden), weight).float(), self.config.final_softcap)

    def embedding_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token states that embeddings pool: the final norm's output (a family with a projection head
        applies it here)."""
        return self.norm(hidden)

    def forward(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def weight_map(self, prefix: str) -> dict[str, Source]:
        """Our parameter name -> checkpoint tensor name(s); `prefix` is the text model's prefix."""
        raise NotImplementedError

    def shared_weight_map(self, prefix: str) -> dict[str, Source]:
        """The entries every family names alike: embeddings, final norm, untied LM head."""
        m: dict[str, Source] = {"embed.weight": f"{prefix}embed_tokens.weight", "norm.weight": f"{prefix}norm.weight"}
        if self.lm_head is not None:
            m["lm_head.weight"] = "lm_head.weight"
        return m
