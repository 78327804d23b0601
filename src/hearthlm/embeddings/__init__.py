"""Embeddings: one pooled, L2-normalised vector per input, from any loaded family (see embedder.py).

- encoder.py: one batched forward over padded rows, no KV cache (causal or bidirectional masks);
- pooling.py: mean / last-token / first-token pooling, normalisation, Matryoshka truncation;
- sentence_transformers.py: the sentence-transformers folder layout (modules.json, Pooling, Dense, Normalize);
- embedder.py: tokens, truncation, batching and the heads, per model.
"""
