"""The demo models that ship inside the package: real trained Gemma 4 checkpoints, so they double as a
parity check of hearthlm against transformers on trained (not random) weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from hearthlm import LLM, SamplingParams

DEMO = Path(__file__).parents[1] / "src" / "hearthlm" / "demo"
VARIANTS = ["hearth-demo", "hearth-demo-moe"]
PROMPT = "And God said unto Moses,"


def test_shipped_size_is_within_budget():
    files = [f for v in VARIANTS for f in (DEMO / v).iterdir()]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in files}
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    assert (DEMO / "README.md").read_text().count("perplexity") >= 1


def test_no_model_name_means_the_dense_demo():
    assert LLM().path.resolve() == (DEMO / "hearth-demo").resolve()


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_on_trained_weights(variant):
    folder = DEMO / variant
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, dtype="float32")
    ids = llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0].float()
    got = llm.logits(ids)
    assert (got - want).abs().max().item() <= 1e-3 * max(1.0, want.abs().max().item())
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    out = llm.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == greedy[0, len(ids) :].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_answers_and_ends_its_turn(variant):
    llm = LLM(DEMO / variant)
    reply = llm.chat([{"role": "user", "content": "Tell me a fortune."}], SamplingParams(max_tokens=200, temperature=0))
    assert reply.finish_reason == "stop"
    assert len(reply.text.split()) >= 3 and "<turn|>" not in reply.text
