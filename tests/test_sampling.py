"""Sampler: greedy, filters, seeds, parameter validation, EOS and max_tokens handling."""

from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.engine.sampler import filter_logits, sample


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.allclose(filter_logits(logits, SamplingParams(temperature=1.0)), torch.tensor([0.5, 0.25, 0.15, 0.1]))
    top_k = filter_logits(logits, SamplingParams(top_k=2))
    assert torch.allclose(top_k, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    top_p = filter_logits(logits, SamplingParams(top_p=0.7))  # 0.5 < 0.7 <= 0.75: keep two
    assert torch.allclose(top_p, torch.tensor([2 / 3, 1 / 3, 0, 0]))
    min_p = filter_logits(logits, SamplingParams(min_p=0.3))  # keep p >= 0.15
    assert torch.allclose(min_p, torch.tensor([0.5, 0.25, 0.15, 0]) / 0.9)
    hot = filter_logits(logits, SamplingParams(temperature=2.0))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]).sqrt()
    assert torch.allclose(hot, expected / expected.sum())


def test_sampling_follows_the_distribution_and_seeds_repeat():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = SamplingParams(temperature=1.0, seed=5)
    g = p.generator()
    draws = [sample(logits, [p], [g])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)
    g1, g2 = p.generator(), p.generator()
    assert [sample(logits, [p], [g1])[0] for _ in range(50)] == [sample(logits, [p], [g2])[0] for _ in range(50)]


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=2)]
)
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kwargs)


def test_generation_stops_on_eos_and_seeds_are_reproducible(checkpoint):
    _, folder = checkpoint("qwen3")
    llm = LLM(folder, dtype="float32")
    prompt = [[5, 9, 14, 20]]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    # Declare the 5th greedy token an EOS: generation must stop right before it, with reason "stop".
    eos = greedy.token_ids[4]
    llm.config.eos_token_ids = [eos]
    cut = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0))[0]
    first = greedy.token_ids.index(eos)
    assert cut.token_ids == greedy.token_ids[:first] and cut.finish_reason == "stop"
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a, b = llm.generate(prompt, params)[0], llm.generate(prompt, params)[0]
    assert a.token_ids == b.token_ids and a.finish_reason == "length" and len(a.token_ids) == 12
    other = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
