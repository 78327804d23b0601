"""Sampler: greedy, filters, seeds, parameter validation, EOS and max_tokens handling."""

from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.engine import sampler
from hearthlm.engine.sampler import draw, filter_logits, pick, sample


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


def _filtered_over_every_token(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters' definition, written out over the whole vocabulary (what filter_logits computed before it
    worked on candidates): a reference that sorts every token."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        ranked, order = torch.sort(probs, descending=True, stable=True)
        drop = torch.cumsum(ranked, 0) - ranked >= p.top_p
        probs = probs.scatter(0, order, ranked.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat (the nucleus passes the probe), in between, peaked
@pytest.mark.parametrize(
    "kw",
    [dict(top_k=40), dict(top_k=64, top_p=0.95), dict(top_p=0.9), dict(top_p=0.5, min_p=0.05),
     dict(top_k=40, top_p=0.9, min_p=0.05, temperature=0.7), dict(top_k=5000), dict(temperature=1.3)],
)  # fmt: skip
def test_candidates_give_what_the_filters_over_every_token_give(kw, spread):
    g = torch.Generator().manual_seed(int(spread * 10))
    logits = torch.randn(sampler.NUCLEUS_PROBE * 5, generator=g) * spread
    logits[100:103] = logits.topk(20).values[-1]  # ties inside the top k (not at a nucleus' edge: that tie splits
    # either way, as any sort's order among equals does)
    p = SamplingParams(**({"temperature": 1.0} | kw))
    want, got = _filtered_over_every_token(logits, p), filter_logits(logits, p)
    assert torch.equal(got > 0, want > 0)  # the same tokens
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    ids, probs = sampler.candidates(logits, p)
    if kw.get("top_k") or kw.get("top_p"):  # the draw runs over the candidates only
        assert ids is not None and torch.equal(ids[probs > 0].sort().values, (want > 0).nonzero().flatten())


def test_top_k_keeps_ties_with_the_kth_and_a_grammar_may_leave_fewer_than_k():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert torch.equal(filter_logits(logits, SamplingParams(top_k=2)) > 0, logits >= 2.0)  # 3 and every 2
    masked = torch.full((10,), float("-inf"))
    masked[[2, 7]] = torch.tensor([1.0, 0.0])  # two tokens allowed, top_k 5
    probs = filter_logits(masked, SamplingParams(top_k=5, top_p=0.99))
    assert torch.allclose(probs, _filtered_over_every_token(masked, SamplingParams(top_k=5, top_p=0.99)))
    assert set(probs.nonzero().flatten().tolist()) == {2, 7}
    picks = {pick(masked, SamplingParams(top_k=5, seed=s), torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {2, 7}


def test_draw_follows_the_probabilities_and_never_gives_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0]) * 7  # unnormalised; zeros first, inside and last
    g = torch.Generator().manual_seed(3)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20_000)]), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = probs.double() / probs.sum() * 20_000
    chi2 = float(((counts[[1, 3, 4]] - expected[[1, 3, 4]]) ** 2 / expected[[1, 3, 4]]).sum())
    assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001
    assert draw(torch.tensor([0.0, 0.0, 1e-30]), g) == 2
    for kw in ({}, {"top_k": 2}, {"top_p": 0.9}, {"min_p": 0.1}):  # every path refuses NaN, inf and nothing allowed
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="cannot sample: the largest logit is"):
                pick(torch.tensor([0.0, bad, 1.0]), SamplingParams(temperature=1.0, **kw), g)
        with pytest.raises(ValueError, match="cannot sample"):
            pick(torch.full((3,), float("-inf")), SamplingParams(temperature=1.0, **kw), g)
    with pytest.raises(ValueError, match="sum to 0"):
        draw(torch.zeros(4), g)


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
