"""Every family against transformers on tiny random checkpoints: logits, greedy tokens, cached decode
against full recompute, batched against single, prompts longer than the sliding window."""

from __future__ import annotations

import pytest
import torch
from checkpoints import FAMILIES, VOCAB, save_gemma3_multimodal, save_gemma4_multimodal
from transformers import GenerationConfig

from hearthlm import LLM, SamplingParams
from hearthlm.engine.engine import Engine
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens

FAMILY_NAMES = list(FAMILIES)
WINDOW = 8  # every tiny config with sliding layers uses this window; prompts below are longer


def _ids(n: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch or 1, n), generator=g)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_logits_match_transformers(name, loaded):
    ref, llm = loaded(name)
    ids = _ids(5 * WINDOW, batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
    got = llm.logits(ids.tolist()).cpu()
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-4
    single = llm.logits(ids[1].tolist()).cpu()
    assert (single - expected[1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_tokens_match_transformers_generate(name, loaded):
    ref, llm = loaded(name)
    prompt = _ids(2 * WINDOW + 3, seed=1)
    new = 24
    # An EOS id outside the vocabulary: transformers never stops, like ignore_eos
    # (min_new_tokens would mask the EOS logit instead, a different continuation).
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    with torch.no_grad():
        out = ref.generate(prompt, generation_config=config)
    expected = out[0, prompt.shape[1] :].tolist()
    got = llm.generate([prompt[0].tolist()], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))[0]
    assert got.token_ids == expected
    assert got.finish_reason == "length" and got.usage.completion_tokens == new


def _cached_logits(llm: LLM, prompt: list[int], steps: int, chunk: int) -> tuple[list[int], torch.Tensor]:
    """Prefill in chunks, then greedy-decode one token at a time; return tokens and each step's logits."""
    model = llm.model
    cache = ContiguousKVCache(model.config.layers, 1, len(prompt) + steps, llm.dtype, llm.device)
    ids = torch.tensor([prompt])
    rows = []
    with torch.inference_mode():
        for s in range(0, len(prompt), chunk):
            h = forward_tokens(model, cache, ids[:, s : s + chunk], torch.tensor([s]))
            rows.append(model.logits(h)[0])
        tokens = list(prompt)
        for _ in range(steps):
            tokens.append(int(rows[-1][-1].argmax()))
            h = forward_tokens(model, cache, torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]))
            rows.append(model.logits(h)[0])
    return tokens, torch.cat(rows)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("chunk", [3, WINDOW + 5, 64])
def test_cached_decode_equals_full_recompute(name, chunk, loaded):
    _, llm = loaded(name)
    prompt = _ids(3 * WINDOW + 1, seed=2)[0].tolist()
    tokens, cached = _cached_logits(llm, prompt, steps=20, chunk=chunk)
    full = llm.logits(tokens)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gemma4_all", "gemma3", "mistral", "qwen3_moe"])
def test_batch_of_different_lengths_equals_one_by_one(name, loaded):
    _, llm = loaded(name)
    prompts = [_ids(n, seed=n)[0].tolist() for n in (3, 2 * WINDOW + 1, 4 * WINDOW)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


@pytest.mark.parametrize("name, save", [("gemma4_all", save_gemma4_multimodal), ("gemma3", save_gemma3_multimodal)])
def test_multimodal_checkpoint_loads_text_model_only(name, save, loaded, tmp_path):
    """Hub checkpoints of Gemma 4 and of Gemma 3 4B-27B: a vision tower beside the text model under a language-model
    prefix, and a text_config in the Hub's dialect (Gemma 4: global_head_dim instead of per_layer_config; Gemma 3:
    only the keys that differ from transformers' defaults, in the transformers 4 dialect)."""
    ref, llm_text = loaded(name)
    folder = save(ref, tmp_path / "mm")
    llm = LLM(folder, dtype="float32")
    assert llm.config.architecture == type(ref).__name__.replace("ForCausalLM", "ForConditionalGeneration")
    assert not any("vision" in n for n, _ in llm.model.named_parameters())
    ids = _ids(3 * WINDOW, seed=3)
    with torch.no_grad():
        expected = ref(ids).logits[0]
    assert (llm.logits(ids[0].tolist()).cpu() - expected).abs().max().item() <= 1e-4
    # The Hub-style text_config gives the same per-layer specs as the one transformers 5 saves.
    assert llm.config.layers == llm_text.config.layers


@pytest.mark.parametrize("name", ["gemma3", "gemma3_bias"])
def test_gemma3_config_is_read_as_transformers_reads_it(name, loaded):
    """What the parity tests above exercise, read back from transformers' own config: sliding layers (window
    below the prompts' lengths) and full ones where its layer_types say, each type's RoPE, the score scale."""
    ref, llm = loaded(name)
    theirs, ours = ref.config, llm.config
    kinds = ["sliding" if t == "sliding_attention" else "full" for t in theirs.layer_types]
    assert [s.kind for s in ours.layers] == kinds and {"sliding", "full"} <= set(kinds)
    assert {s.sliding_window for s in ours.layers} == {theirs.sliding_window, None} == {WINDOW, None}
    for spec, kind in zip(ours.layers, theirs.layer_types):
        rope = theirs.rope_parameters[kind]
        assert (spec.rope.kind, spec.rope.theta) == (rope["rope_type"], rope["rope_theta"])
        assert spec.rope.factor == rope.get("factor", 1.0)
    assert ours.attn_scale == theirs.query_pre_attn_scalar**-0.5 != theirs.head_dim**-0.5


def test_sliding_layers_keep_only_the_window_and_shared_layers_store_nothing(loaded):
    _, llm = loaded("gemma4_all")
    cfg = llm.config
    cache = ContiguousKVCache(cfg.layers, 2, 100, torch.float32, torch.device("cpu"))
    shared = [i for i, s in enumerate(cfg.layers) if s.kv_source is not None]
    assert shared == [3, 4, 5]
    assert set(cache.k) == {0, 1, 2}
    for i, k in cache.k.items():
        spec = cfg.layers[i]
        assert k.shape == (2, spec.num_kv_heads, spec.sliding_window or 100, spec.head_dim)
    # KV-shared layers read the last earlier layer of their own type.
    assert [cfg.layers[i].kv_source for i in shared] == [1, 1, 2]


@pytest.mark.parametrize("name", ["gemma4_all", "qwen2"])
@pytest.mark.parametrize("chunk", [4, WINDOW + 3])
def test_chunked_prefill_generates_the_same_tokens(name, chunk, loaded):
    """Prefill in chunks (Gemma 4 skips its KV-shared layers on all but the last chunk's last token)."""
    _, llm = loaded(name)
    prompt = _ids(4 * WINDOW + 3, seed=4)[0].tolist()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    whole = llm.generate([prompt], params)[0].token_ids
    engine = Engine(llm, prefill_chunk=chunk)
    engine.add_request("r", prompt, params)
    got = []
    while engine.has_unfinished():
        got += [t for out in engine.step() for t in out.token_ids]
    assert got == whole


def test_generic_attention_path_matches_the_kernels(loaded, monkeypatch):
    """The plain-PyTorch path (what other devices run, and CPUs without the kernels) gives the same
    greedy tokens on Gemma 4, whose KV-shared layers attend with the last prompt position only."""
    _, llm = loaded("gemma4_all")
    prompt = _ids(3 * WINDOW, seed=5)[0].tolist()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with_kernels = llm.generate([prompt], params)[0].token_ids
    monkeypatch.setattr("hearthlm.kernels.cpu.available", lambda: False)
    monkeypatch.setattr("hearthlm.engine.kv_cache.SMALL_T", 0)  # every query count through F.sdpa
    assert llm.generate([prompt], params)[0].token_ids == with_kernels
