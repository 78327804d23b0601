"""Embeddings against transformers on tiny random checkpoints: language models (last-token pooling of the final-norm
state), EmbeddingGemma 2 (bidirectional, projection-only PLE, per-token projection, mean), EmbeddingGemma (Gemma 3
bidirectional + sentence-transformers Pooling/Dense/Normalize) and Qwen3-Embedding (last token + EOS). References
are the transformers models' hidden states with the pooling and head math written here; batched == one by one;
unit norm; Matryoshka dimensions; truncation; one forward for many inputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from checkpoints import VOCAB, perturb
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from hearthlm import LLM
from hearthlm.embeddings import embedder

TOL = 1e-5  # float32 end to end; unit vectors, so an absolute bound per component
GENERATIVE = ["gemma4_all", "gemma4_dense", "gemma4_plain", "gemma3", "llama", "qwen2", "mistral", "qwen3", "qwen3_moe"]
LENGTHS = (1, 5, 19, 40)  # longer than every tiny sliding window (8), and a single-token input


def _rows(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True))


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return (states * m).sum(dim=1) / m.sum(dim=1)


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


# -- language models: the last token's final-norm state ------------------------------------------
@pytest.mark.parametrize("name", GENERATIVE)
def test_language_model_embeds_its_last_token_state(name, loaded):
    ref, llm = loaded(name)
    rows = _rows()
    with torch.no_grad():  # one row at a time: no padding in the reference
        expected = torch.stack([_unit(ref.model(torch.tensor([r])).last_hidden_state[0, -1]) for r in rows])
    got = llm.embed_ids(rows)
    assert got.shape == (len(rows), ref.config.hidden_size) and got.dtype == torch.float32
    assert _max_diff(got, expected) <= TOL
    assert llm.can_generate and llm.can_embed and llm.pooling == "last"
    assert llm.embedding_dims == ref.config.hidden_size and llm.embedding_dimensions == range(1, llm.embedding_dims + 1)


@pytest.mark.parametrize("name", ["gemma4_all", "mistral"])
def test_batched_equals_one_by_one_and_vectors_are_unit(name, loaded):
    _, llm = loaded(name)
    rows = _rows((7, 33, 2, 18), seed=1)
    together = llm.embed_ids(rows)
    alone = torch.cat([llm.embed_ids([r]) for r in rows])
    assert _max_diff(together, alone) <= TOL
    assert _max_diff(together.norm(dim=-1), torch.ones(len(rows))) <= TOL
    assert llm.embed(rows) == together.tolist()


def test_dimensions_keep_the_first_components_renormalised(loaded):
    _, llm = loaded("llama")
    rows = _rows(seed=2)
    full = llm.embed_ids(rows)
    short = llm.embed_ids(rows, dimensions=16)
    assert short.shape == (len(rows), 16)
    assert _max_diff(short, _unit(full[:, :16])) <= TOL
    assert torch.equal(torch.tensor(llm.embed(rows, dimensions=16)), short)
    for bad in (0, llm.embedding_dims + 1, True):
        with pytest.raises(ValueError, match=f"dimensions={bad} is not supported.*from 1 to {llm.embedding_dims}"):
            llm.embed(rows, dimensions=bad)


def test_many_inputs_run_in_one_forward_unless_over_the_token_budget(loaded, monkeypatch):
    _, llm = loaded("qwen3")
    rows = _rows(tuple(range(1, 41)), seed=3)
    calls = []
    real = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda model, batch: calls.append(len(batch)) or real(model, batch))
    once = llm.embed_ids(rows)
    assert calls == [40]
    monkeypatch.setattr(embedder, "MAX_BATCH_TOKENS", 100)
    calls.clear()
    split = llm.embed_ids(rows)
    assert len(calls) > 1 and sum(calls) == 40
    assert _max_diff(split, once) <= TOL


def test_truncate_cuts_to_the_limit_or_refuses(loaded):
    _, llm = loaded("qwen2")
    limit = llm.embedding_max_tokens
    assert limit == llm.config.max_position
    long = _rows((limit + 30,), seed=4)[0]
    rows = [[5, 6, 7], long]
    assert llm.embed_inputs(rows)[1] == long[:limit]
    assert _max_diff(llm.embed_ids(rows), llm.embed_ids([[5, 6, 7], long[:limit]])) == 0
    with pytest.raises(ValueError, match=f"input 1 has {limit + 30} tokens, more than the model's limit of {limit}"):
        llm.embed(rows, truncate=False)
    with pytest.raises(ValueError, match="input 0 is empty"):
        llm.embed([[]])
    with pytest.raises(ValueError, match=r"input 1: token id\(s\) \[999\] outside the vocabulary"):
        llm.embed([[3], [999]])


# -- EmbeddingGemma 2 ------------------------------------------------------------------------------
def _embedding_gemma2(composite: bool, tmp_path):
    text = tf.EmbeddingGemma2TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=3,
        hidden_size_per_layer_input=8, embedding_dim=40, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    config = tf.EmbeddingGemma2Config(text_config=text.to_dict()) if composite else text
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = (tf.EmbeddingGemma2Model if composite else tf.EmbeddingGemma2TextModel)(config).eval()
    perturb(model, seed=11)
    model.save_pretrained(tmp_path / "eg2")
    return model, LLM(tmp_path / "eg2", dtype="float32")


@pytest.mark.parametrize("composite", [True, False], ids=["EmbeddingGemma2Model", "EmbeddingGemma2TextModel"])
def test_embedding_gemma2_matches_transformers(composite, tmp_path):
    ref, llm = _embedding_gemma2(composite, tmp_path)
    rows = _rows((1, 9, 40, 14), seed=5)  # radius 3: most rows reach past it; 40 > 32 queries: F.sdpa's path
    ids, mask = _padded(rows)
    with torch.no_grad():
        states = ref(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, embedding_dim]
    expected = _unit(_masked_mean(states, mask))
    got = llm.embed_ids(rows)
    assert got.shape == (4, 40)
    assert _max_diff(got, expected) <= TOL
    alone = torch.cat([llm.embed_ids([r]) for r in rows])
    assert _max_diff(alone, expected) <= TOL
    assert llm.config.bidirectional and llm.pooling == "mean" and llm.embedding_dims == 40
    assert not llm.can_generate and llm.can_embed
    with pytest.raises(ValueError, match="is an embedding model"):
        llm.generate([[3, 4]])
    with pytest.raises(ValueError, match="is an embedding model"):
        llm.logits([3, 4])


def test_bidirectional_attention_is_not_causal(tmp_path):
    """A later token changes an earlier one's state only when attention reads both ways (a guard against
    a causal mask sneaking back in: mean pooling alone would hide it)."""
    _, llm = _embedding_gemma2(False, tmp_path)
    from hearthlm.embeddings.encoder import encode

    a, _ = encode(llm.model, [[5, 6, 7, 8]])
    b, _ = encode(llm.model, [[5, 6, 7, 9]])
    assert _max_diff(a[0, 0], b[0, 0]) > 1e-3


# -- sentence-transformers folders: EmbeddingGemma (v1) and Qwen3-Embedding ------------------------
def _sentence_transformers(folder, pooling: str, dense: list[torch.Tensor] = ()) -> None:
    """The folder layout sentence-transformers saves: modules.json, 1_Pooling, n_Dense, Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    (folder / "1_Pooling").mkdir()
    flags = {"mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({flags[pooling]: True, "word_embedding_dimension": 0}))
    for i, w in enumerate(dense, start=2):
        sub = folder / f"{i}_Dense"
        sub.mkdir()
        cfg = {"in_features": w.shape[1], "out_features": w.shape[0], "bias": False,
               "activation_function": "torch.nn.modules.linear.Identity"}  # fmt: skip
        (sub / "config.json").write_text(json.dumps(cfg))
        save_file({"linear.weight": w.contiguous()}, str(sub / "model.safetensors"))
        modules.append({"idx": i, "name": str(i), "path": sub.name, "type": "sentence_transformers.models.Dense"})
    n = len(modules)
    modules.append(
        {"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": "sentence_transformers.models.Normalize"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))


def test_embedding_gemma_sentence_transformers_folder_matches_transformers(tmp_path):
    config = tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_bidirectional_attention=True,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = tf.Gemma3TextModel(config).eval()
    perturb(ref, seed=12)
    folder = tmp_path / "embeddinggemma"
    ref.save_pretrained(folder)
    g = torch.Generator().manual_seed(13)
    dense = [torch.randn(96, 64, generator=g) / 8, torch.randn(160, 96, generator=g) / 10]
    _sentence_transformers(folder, "mean", dense)
    llm = LLM(folder, dtype="float32")
    rows = _rows((3, 12, 37, 7), seed=6)  # sliding layers see 4 positions either side (width 8)
    ids, mask = _padded(rows)
    with torch.no_grad():
        states = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = _unit(_masked_mean(states, mask) @ dense[0].T @ dense[1].T)
    assert _max_diff(llm.embed_ids(rows), expected) <= TOL
    assert (llm.pooling, llm.embedding_dims, llm.embedding_dimensions) == ("mean", 160, (160, 128))
    assert llm.embedding_max_tokens == 64 and not llm.can_generate
    assert _max_diff(llm.embed_ids(rows, dimensions=128), _unit(expected[:, :128])) <= TOL
    with pytest.raises(ValueError, match="dimensions=100 is not supported by this model; use one of 160, 128"):
        llm.embed(rows, dimensions=100)
    # `hearth quantize` keeps the layout: the copy pools and projects as its source, at int8
    from hearthlm.weights.export import write_quantized

    q = LLM(folder, dtype="float32", quant="int8")
    copy = LLM(write_quantized(q.model, folder, tmp_path / "int8", q.quant), dtype="float32")
    assert (copy.pooling, copy.embedding_dims, copy.embedding_max_tokens, copy.can_generate) == ("mean", 160, 64, False)
    assert _max_diff(copy.embed_ids(rows), q.embed_ids(rows)) <= TOL


def _word_tokenizer(folder, eos: str) -> None:
    vocab = {"<unk>": 0, eos: 2} | {w: i for i, w in enumerate("the cat sat on a mat today".split(), start=10)}
    tok = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([eos])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))


def test_qwen3_embedding_pools_the_appended_end_of_text_token(tmp_path):
    config = tf.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = tf.Qwen3Model(config).eval()
    perturb(ref, seed=14)
    folder = tmp_path / "qwen3-embedding"
    ref.save_pretrained(folder)
    _sentence_transformers(folder, "last")
    _word_tokenizer(folder, "<|endoftext|>")
    llm = LLM(folder, dtype="float32")
    texts = ["the cat sat on a mat", "today", "a cat"]
    rows = [llm.embed_tokens(t) for t in texts]
    assert rows[0] == [10, 11, 12, 13, 14, 15, 2] and rows[1] == [16, 2]
    with torch.no_grad():
        expected = torch.stack([_unit(ref(torch.tensor([r])).last_hidden_state[0, -1]) for r in rows])
    assert _max_diff(torch.tensor(llm.embed(texts)), expected) <= TOL
    assert llm.pooling == "last" and llm.embedding_dimensions == range(32, 65) and not llm.can_generate
    # Truncation keeps the end-of-text token last.
    long = llm.embed_inputs([" ".join(["cat"] * 80)])[0]
    assert len(long) == 64 and long[-1] == 2 and long[:-1] == [11] * 63
    # A pooling hearthlm does not implement is refused at load, by name.
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match=r"pooling \['pooling_mode_max_tokens'\] is not supported"):
        LLM(folder, dtype="float32")
