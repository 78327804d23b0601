"""Embeddings of one loaded model: inputs -> token rows -> batched forwards -> pooled, headed, unit vectors.

Pooling per family, and why:
- Generative models (Gemma 4, Gemma 3, Qwen 2.5/3, Llama 3.x, Mistral, Mixtral): the last token's final-norm
  hidden state. Their GGUF files carry no `{arch}.pooling_type` (llama.cpp's converter writes one only from a
  sentence-transformers Pooling config), so llama.cpp keeps its default LLAMA_POOLING_TYPE_NONE (llama-hparams.h;
  llama-context.cpp resolves "unspecified" to the model's value) and its per-token output is `t_embd`, the
  output of the final norm (src/models/*.cpp). Ollama's llama.cpp runner then asks for the sequence embedding,
  gets none under NONE pooling and takes the embedding of the prompt's last token (llama_get_embeddings_ith at
  the last batch index), which its server L2-normalises. (llama-server's /v1/embeddings refuses NONE pooling.)
- EmbeddingGemma (Gemma 3, bidirectional) and EmbeddingGemma 2: mean over the tokens, as their sentence-
  transformers Pooling config says and as transformers documents for EmbeddingGemma 2 (whose per-token
  `embedding_projection` commutes with the mean); EmbeddingGemma then applies its two Dense heads.
- Qwen3-Embedding (Qwen3 with a sentence-transformers folder): last token, with the end-of-text token appended,
  as its Pooling config (pooling_mode_lasttoken) and its model card say.
A sentence-transformers folder's Pooling config, when there is one, decides (loader.read_model_config).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..models.base import CausalLM
from ..tokenizer import Tokenizer
from .encoder import encode
from .pooling import normalize, pool, truncate_dims
from .sentence_transformers import Dense, read

MAX_BATCH_TOKENS = 16_384  # padded tokens per forward: more than that, and inputs are split over several forwards


def allowed_dimensions(cfg: ModelConfig, native: int) -> tuple[int, ...] | range:
    """The output sizes `dimensions` may ask for (Matryoshka: the first n components, renormalised)."""
    if cfg.family == "gemma3" and cfg.pooling == "mean":  # EmbeddingGemma: trained for 768/512/256/128 (model card)
        return (native, *(d for d in (512, 256, 128) if d < native))
    if cfg.family == "qwen3" and cfg.pooling == "last":  # Qwen3-Embedding: any size from 32 (model card)
        return range(min(32, native), native + 1)
    return range(1, native + 1)  # no trained sizes known: any prefix, renormalised


def describe(allowed: tuple[int, ...] | range) -> str:
    if isinstance(allowed, range):
        return f"an integer from {allowed.start} to {allowed.stop - 1}"
    return "one of " + ", ".join(map(str, allowed))


class Embedder:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, folder: Path | None):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        st = read(folder, model.device) if folder is not None and folder.is_dir() else None
        self.dense: list[Dense] = st.dense if st else []
        self.pooling = cfg.pooling or "last"
        width = cfg.embedding_dim or cfg.hidden_size
        for i, d in enumerate(self.dense):
            if d.weight.shape[1] != width:
                raise ConfigError(f"{folder}: Dense head {i} takes {d.weight.shape[1]} inputs, but gets {width}")
            width = d.weight.shape[0]
        self.dims = width
        self.allowed = allowed_dimensions(cfg, width)
        cap = st.max_seq_length if st else None
        self.max_tokens = min(cfg.max_position, cap) if cap else cfg.max_position
        # A dedicated last-token model reads the state of an end-of-text token it was trained to end on.
        dedicated_last = cfg.pooling == "last" and cfg.eos_token_ids
        self.eos = cfg.eos_token_ids[0] if dedicated_last else None

    # -- inputs -------------------------------------------------------------------------------
    def tokens(self, text: str) -> list[int]:
        """`text` as the model embeds it: the tokenizer's special tokens (BOS where it adds one), and the
        end-of-text token for a dedicated last-token model."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer.json, which text inputs need; pass token ids instead")
        ids = self.tokenizer.encode(text)
        return self._with_eos(ids)

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos] if self.eos is not None and (not ids or ids[-1] != self.eos) else ids

    def rows(self, inputs: str | list, truncate: bool = True) -> list[list[int]]:
        """Texts and/or token-id lists -> the token rows that embed_ids() takes, checked and (with `truncate`)
        cut to the model's limit; token ids are used as given."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        rows = [self.tokens(x) if isinstance(x, str) else self._check_ids(x, i) for i, x in enumerate(inputs)]
        return [self._fit(r, i, truncate) for i, r in enumerate(rows)]

    def _check_ids(self, ids, i: int) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"input {i} is neither a string nor a list of token ids")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input {i}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        return list(ids)

    def _fit(self, ids: list[int], i: int, truncate: bool) -> list[int]:
        if not ids:
            raise ValueError(f"input {i} is empty: give at least one token")
        if len(ids) <= self.max_tokens:
            return ids
        if not truncate:
            raise ValueError(
                f"input {i} has {len(ids)} tokens, more than the model's limit of {self.max_tokens}; "
                "shorten it, or allow truncation (truncate=True)"
            )
        cut = ids[: self.max_tokens]
        return cut[:-1] + [self.eos] if self.eos is not None and ids[-1] == self.eos else cut

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and (isinstance(dimensions, bool) or dimensions not in self.allowed):
            raise ValueError(f"dimensions={dimensions} is not supported by this model; use {describe(self.allowed)}")

    # -- vectors ------------------------------------------------------------------------------
    @torch.inference_mode()
    def vectors(self, rows: list[list[int]], dimensions: int | None = None) -> torch.Tensor:
        """Token rows (checked by rows()) -> [n, d] float32 unit vectors; all rows in one forward unless they
        exceed MAX_BATCH_TOKENS padded tokens."""
        self.check_dimensions(dimensions)
        out = torch.empty(len(rows), self.dims, dtype=torch.float32, device=self.model.device)
        for chunk in _chunks(rows):
            states, lengths = encode(self.model, [rows[i] for i in chunk])
            v = pool(states, lengths, self.pooling)
            for dense in self.dense:
                v = dense(v)
            out[chunk] = normalize(v)
        return truncate_dims(out, dimensions)


def _chunks(rows: list[list[int]]) -> list[list[int]]:
    """Row indices grouped longest first (less padding), each group within MAX_BATCH_TOKENS padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * len(rows[chunks[-1][0]]) <= MAX_BATCH_TOKENS:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks
