"""Gemma 4 MTP drafters (models/gemma4_assistant.py, engine/mtp.py): the drafter's logits against transformers'
Gemma4AssistantForCausalLM given the same target state (an E2B-like drafter with the centroid-masked head, and a
31B-like one), its drafts from the engine's paged cache, lossless batched greedy decoding with it, and clear
errors for folders and pairs that do not fit."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers as tf
from checkpoints import FAMILIES, VOCAB, perturb

from hearthlm import LLM, SamplingParams
from hearthlm.config import ConfigError
from hearthlm.engine.mtp import MTPDrafter, producers
from hearthlm.engine.speculative import Adaptive
from hearthlm.layers.attention import Batch
from hearthlm.layers.embedding import rounded
from hearthlm.models.gemma4_assistant import TargetKV, load_assistant

KEEP_DRAFTING = Adaptive(row_cost=0.0, try_cost=0.0, fit_rows=False)  # a random drafter is rarely right: never pause it


def _drafter_text(**over) -> dict:
    """The drafter's layers: narrower than the target (32 vs 64), one sliding and one full layer."""
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, sliding_window=8, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return base | over


# drafter -> (its target in checkpoints.py, text_config overrides, assistant config overrides)
DRAFTERS = {
    # E2B/E4B: the target has PLE and KV-shared layers; k = v with one KV head on full layers; the masked head.
    "e2b": (
        "gemma4_dense",
        dict(attention_k_eq_v=True, num_global_key_value_heads=1),
        dict(use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=3),
    ),
    # 31B: every target layer stores its own K/V, full layers with their own RoPE; the full LM head.
    "31b": (
        "gemma4_plain",
        dict(rope_parameters=FAMILIES["gemma4_plain"][2]["rope_parameters"]),
        dict(use_ordered_embeddings=False),
    ),
}


def build_drafter(name: str, **over) -> tf.PreTrainedModel:
    _, text_over, assistant_over = DRAFTERS[name]
    text = tf.Gemma4TextConfig(**_drafter_text(**text_over))
    config = tf.Gemma4AssistantConfig(text_config=text, **(dict(backbone_hidden_size=64) | assistant_over | over))
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.Gemma4TextConfig, "kv_sharing_modes", property(_sharing_modes))
        model = tf.Gemma4AssistantForCausalLM._from_config(config, attn_implementation="eager").eval()
    perturb(model, seed=sum(map(ord, name)))
    if model.masked_embedding is not None:  # tokens listed cluster by cluster: a permutation of the vocabulary
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1)))
    return model


_KV_SHARING_MODES = tf.Gemma4TextConfig.kv_sharing_modes.fget


def _sharing_modes(config) -> list[str | None]:
    """transformers 5.23 cannot build its own drafter: Gemma4TextConfig.kv_sharing_modes raises when every layer
    is KV-shared (no layer of the drafter produces K/V), which Gemma4AssistantConfig requires. Every layer reuses
    the target's K/V, which is what the drafter's attention does with `shared_kv_states`."""
    if config.num_kv_shared_layers == config.num_hidden_layers:
        return ["reuse"] * config.num_hidden_layers
    return _KV_SHARING_MODES(config)


@pytest.fixture(scope="module")
def drafter(tmp_path_factory):
    """drafter(name) -> (transformers drafter, its saved folder)."""
    made = {}

    def get(name: str):
        if name not in made:
            model = build_drafter(name)
            folder = tmp_path_factory.mktemp(f"{name}-assistant")
            model.save_pretrained(folder)
            made[name] = (model, folder)
        return made[name]

    return get


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_state(ref, ids: list[int]):
    """transformers' target over `ids`, with the full-length K/V of the layers the drafter reads (their last
    storing layer of each type: KV-shared targets mark them; others are marked here)."""
    for i in producers_of(ref.config).values():
        ref.model.layers[i].self_attn.store_full_length_kv = True
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False, output_hidden_states=True, return_shared_kv_states=True)


def producers_of(config) -> dict[str, int]:
    n = config.num_hidden_layers - (config.num_kv_shared_layers or 0)
    return {t: max(i for i in range(n) if config.layer_types[i] == t) for t in set(config.layer_types[:n])}


def reference_drafts(ref, draft_ref, ids: list[int], k: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' drafter run k steps after the target's greedy token, as its MTP candidate generator does."""
    out = reference_state(ref, ids)
    token = out.logits[:, -1:].argmax(-1)
    hidden, logits, tokens = out.hidden_states[-1][:, -1:], [], []
    with torch.no_grad():
        for _ in range(k):
            x = torch.cat([ref.model.embed_tokens(token), hidden], dim=-1)
            step = draft_ref(inputs_embeds=x, position_ids=torch.tensor([[len(ids)]]),
                             shared_kv_states=out.shared_kv_states)  # fmt: skip
            token, hidden = step.logits.argmax(-1), step.last_hidden_state
            logits.append(step.logits[0, 0])
            tokens.append(int(token))
    return tokens, logits


@pytest.mark.parametrize("name", ["e2b", "31b"])
def test_draft_logits_match_transformers(loaded, drafter, name):
    ref, llm = loaded(DRAFTERS[name][0])
    draft_ref, folder = drafter(name)
    ids = prompt(0, 13)  # longer than the sliding window (8): the sliding layer reads the last 9 positions
    _, expected = reference_drafts(ref, draft_ref, ids, 3)
    out = reference_state(ref, ids)
    ours = load_assistant(folder, torch.float32, torch.device("cpu"))
    kv = {t: (k, v, None) for t, (k, v) in out.shared_kv_states.items()}
    kv["sliding_attention"] = tuple(x[:, :, -9:] for x in kv["sliding_attention"][:2]) + (None,)
    batch = Batch(positions=torch.tensor([[len(ids)]]), cache=TargetKV(kv, ours.assistant.types))
    ours.prepare(batch)
    token, hidden = out.logits[0, -1:].argmax(-1), out.hidden_states[-1][:, -1]
    scale = rounded(64**0.5, torch.float32)
    for want in expected:
        logits, hidden = ours.step(torch.cat([llm.model.embed_tokens(token) * scale, hidden], dim=-1), batch)
        assert (logits[0] - want).abs().max() <= 1e-4
        token = logits.argmax(-1)


@pytest.mark.parametrize("name", ["e2b", "31b"])
def test_engine_drafts_from_the_paged_cache(loaded, drafter, name):
    ref, _ = loaded(DRAFTERS[name][0])
    draft_ref, folder = drafter(name)
    llm = LLM(loaded(DRAFTERS[name][0])[1].path, dtype="float32", draft=str(folder))
    assert isinstance(llm.draft, MTPDrafter)
    engine = llm.engine(block_size=4, adaptive=KEEP_DRAFTING)
    proposed = []
    propose = engine.drafter.propose
    engine.drafter.propose = lambda seqs, ks: proposed.append(propose(seqs, ks)) or proposed[-1]
    ids = prompt(1, 13)
    llm.generate([ids], SamplingParams(max_tokens=5, temperature=0))
    expected, _ = reference_drafts(ref, draft_ref, ids, 3)
    assert proposed[0] == [expected]


@pytest.mark.parametrize("name", ["e2b", "31b"])
def test_greedy_batched_is_lossless(loaded, drafter, name):
    _, llm = loaded(DRAFTERS[name][0])
    _, folder = drafter(name)
    prompts = [prompt(s, n) for s, n in [(2, 5), (3, 14), (4, 23)]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm.engine(draft=None, block_size=4)
    plain = [c.token_ids for c in llm.generate(prompts, params)]
    engine = llm.engine(draft=str(folder), block_size=4, adaptive=KEEP_DRAFTING)
    assert [c.token_ids for c in llm.generate(prompts, params)] == plain
    stats = engine.stats()
    assert stats.draft_steps > 0 and stats.drafted_tokens > 0


def test_transformers_assisted_generation_agrees(loaded, drafter):
    ref, llm = loaded("gemma4_dense")
    draft_ref, folder = drafter("e2b")
    ids = torch.tensor([prompt(5, 9)])
    draft_ref.generation_config.num_assistant_tokens = 3
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = ref.generate(ids, **greedy)[0, 9:].tolist()
    assert ref.generate(ids, assistant_model=draft_ref, **greedy)[0, 9:].tolist() == plain
    llm.engine(draft=str(folder), block_size=4, adaptive=KEEP_DRAFTING)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert llm.generate([ids[0].tolist()], params)[0].token_ids == plain


def test_sampling_with_the_drafter_runs(loaded, drafter):
    _, llm = loaded("gemma4_dense")
    _, folder = drafter("e2b")
    llm.engine(draft=str(folder), block_size=4, adaptive=KEEP_DRAFTING)
    out = llm.generate([prompt(6, 7)] * 3, SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True))
    assert all(len(c.token_ids) == 16 for c in out)


# -- bad input: what is wrong and what to do -------------------------------------------------------------------
def test_folder_that_is_not_a_drafter(loaded, tmp_path):
    _, llm = loaded("gemma4_plain")
    with pytest.raises(ConfigError, match="no config.json.*assistant"):
        llm.engine(draft=str(tmp_path))
    with pytest.raises(ConfigError, match="not a Gemma 4 drafter.*'gemma4_text'.*--draft lookup"):
        llm.engine(draft=str(llm.path))
    with pytest.raises(ValueError, match="unknown draft '/no/such/folder'.*'auto', 'lookup', 'off'.*folder"):
        LLM(llm.path, draft="/no/such/folder")


def test_mismatched_pairs(loaded, drafter, tmp_path):
    _, plain = loaded("gemma4_plain")
    _, e2b_folder = drafter("e2b")
    with pytest.raises(ValueError, match="expects K/V of 1 heads of size 32.*2 of size 32.*made for this model"):
        plain.engine(draft=str(e2b_folder))
    wide = build_drafter("31b", backbone_hidden_size=48)
    wide.pre_projection = torch.nn.Linear(96, 32, bias=False)
    wide.post_projection = torch.nn.Linear(32, 48, bias=False)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 48, but this target's is 64"):
        plain.engine(draft=str(tmp_path / "wide"))
    _, llama = loaded("llama")
    with pytest.raises(ValueError, match="Gemma 4 drafter, but the target is LlamaForCausalLM"):
        llama.engine(draft=str(e2b_folder))


def test_weights_that_disagree_with_the_config(drafter, tmp_path):
    _, folder = drafter("31b")
    shutil.copytree(folder, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 44
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config implies.*disagree"):
        load_assistant(tmp_path / "d", torch.float32, torch.device("cpu"))


def test_auto_finds_the_assistant_beside_the_model(loaded, drafter, tmp_path, caplog):
    _, llm = loaded("gemma4_plain")
    _, folder = drafter("31b")
    target = shutil.copytree(llm.path, tmp_path / "gemma-4-tiny-it")
    with caplog.at_level(logging.WARNING, logger="hearthlm.engine"):
        alone = LLM(target, dtype="float32", draft="auto")
    assert type(alone.draft).__name__ == "PromptLookup" and "drafting by prompt lookup" in caplog.text
    shutil.copytree(folder, tmp_path / "gemma-4-tiny-it-assistant")
    assert isinstance(LLM(target, dtype="float32", draft="auto").draft, MTPDrafter)
    assert set(producers(llm.model)) == {"sliding_attention", "full_attention"}
