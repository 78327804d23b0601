"""Speculative decoding (engine/speculative.py, engine/lookup.py): the same tokens as plain decoding, greedy, on
every family's tiny checkpoint (rollback across KV blocks, sliding windows and KV-shared layers included); the
target's exact distribution when sampling (a chi-square test); stop strings, max_tokens, EOS, logprobs,
penalties and grammars as without drafting; the adaptive pause; the entry points (LLM, CLI, server)."""

from __future__ import annotations

import random
import subprocess
import sys

import httpx
import pytest
import torch
from checkpoints import VOCAB
from prometheus_client.parser import text_string_to_metric_families
from serving import idle

from hearthlm import LLM, SamplingParams
from hearthlm.engine.lookup import PromptLookup
from hearthlm.engine.sampler import filter_logits, penalize
from hearthlm.engine.speculative import Adaptive

NEVER_PAUSE = Adaptive(row_cost=0.0, try_cost=0.0, fit_rows=False)  # for drafters whose acceptance is set by the test


def repeating(seed: int, n: int = 10, times: int = 3) -> list[int]:
    """A prompt that repeats itself, so that prompt lookup finds drafts at once."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, VOCAB, (n,), generator=g).tolist()
    return base * times + base[: n // 2]


def plain(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    llm.engine(draft=None, block_size=4)
    return [c.token_ids for c in llm.generate(prompts, params)]


class Oracle:
    """A drafter that knows the plain greedy replies: of the k tokens it may propose it makes all right (half the
    time) or a random number (0..k-1) and the rest wrong, so every accepted length, and a rollback after each,
    happens."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], seed: int = 0):
        self.replies, self.rng, self.right = replies, random.Random(seed), []

    def propose(self, seqs, ks):
        drafts = []
        for seq, k in zip(seqs, ks):
            reply, at = self.replies[tuple(seq.prompt)], len(seq.output)
            right = k if self.rng.random() < 0.5 else self.rng.randint(0, k - 1)  # all right half the time: k grows
            self.right.append(right)
            drafts.append(reply[at : at + right] + [(t + 1) % VOCAB for t in reply[at + right : at + k]])
        return drafts


class Fixed:
    """A drafter that always proposes the same tokens."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def propose(self, seqs, ks):
        return [self.tokens[:k] for k in ks]


class Replay:
    """A drafter that proposes the next tokens of a known reply (all of them right until it diverges)."""

    def __init__(self, reply: list[int]):
        self.reply = reply

    def propose(self, seqs, ks):
        return [self.reply[len(s.output) : len(s.output) + k] for s, k in zip(seqs, ks)]


# -- greedy: the same tokens as plain decoding ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mixtral", "gemma3", "gemma4_dense", "gemma4_all"])
def test_prompt_lookup_is_lossless_greedy(loaded, family):
    _, llm = loaded(family)
    prompts = [repeating(seed) for seed in range(3)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = plain(llm, prompts, params)
    engine = llm.engine(draft="lookup", block_size=4)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    stats = engine.stats()
    assert stats.accepted_tokens > 0 and stats.drafted_tokens > stats.accepted_tokens  # kept some, rolled back some
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("family", ["gemma4_dense", "gemma4_all", "gemma3", "llama"])
def test_rollback_across_blocks_windows_and_shared_layers(loaded, family):
    """Batched rows that keep 0..8 draft tokens each step, blocks of 4 positions, sliding windows of 8 (Gemma),
    KV-shared layers (gemma4_*): every rollback point, batched with rows of other draft lengths."""
    _, llm = loaded(family)
    prompts = [repeating(1, 5, 1), repeating(2, 13, 1), repeating(3, 9, 2)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = plain(llm, prompts, params)
    oracle = Oracle({tuple(p): r for p, r in zip(prompts, expected)})
    engine = llm.engine(draft=oracle, block_size=4, adaptive=NEVER_PAUSE)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    stats = engine.stats()
    assert stats.accepted_tokens == sum(oracle.right)  # exactly the right prefix of every draft was kept
    assert 0 in oracle.right and max(oracle.right) >= 6
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("family", ["llama", "gemma4_dense"])
def test_verification_as_one_prefill_per_sequence(loaded, family, monkeypatch):
    """Off CPU (and here, with CPU verification turned off) a sequence's positions run as one short prefill."""
    from hearthlm.engine import runner

    monkeypatch.setattr(runner, "_verify_rows", None)
    monkeypatch.setattr(runner.cpu, "available", lambda: False)
    _, llm = loaded(family)
    prompts = [repeating(1, 5, 1), repeating(2, 13, 1), repeating(3, 9, 2)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    expected = plain(llm, prompts, params)
    oracle = Oracle({tuple(p): r for p, r in zip(prompts, expected)}, seed=1)
    engine = llm.engine(draft=oracle, block_size=4, adaptive=NEVER_PAUSE)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    assert engine.stats().accepted_tokens == sum(oracle.right)


def test_preempted_drafting_rows_stay_lossless(loaded):
    _, llm = loaded("gemma4_dense")
    prompts = [repeating(seed, 7, 2) for seed in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = plain(llm, prompts, params)
    engine = llm.engine(draft="lookup", block_size=4, kv_blocks=24)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    assert engine.stats().preemptions > 0 and engine.stats().accepted_tokens > 0


def test_rows_without_drafts_decode_beside_drafting_rows(loaded):
    _, llm = loaded("qwen3")
    g = torch.Generator().manual_seed(7)
    prompts = [repeating(4), torch.randint(3, VOCAB, (9,), generator=g).tolist()]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    expected = plain(llm, prompts, params)
    want = {tuple(prompts[0]): expected[0]}

    class OneRow(Oracle):  # drafts for the first prompt only
        def propose(self, seqs, ks):
            return [
                super(OneRow, self).propose([s], [k])[0] if tuple(s.prompt) in want else [] for s, k in zip(seqs, ks)
            ]

    llm.engine(draft=OneRow(want), block_size=4, adaptive=NEVER_PAUSE)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected


# -- sampling: the target's exact distribution -----------------------------------------------------------------
def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities, cells with expected count < 5 pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def second_token_law(llm: LLM, prompt: list[int], p: SamplingParams) -> torch.Tensor:
    """The exact distribution of the second generated token, summed over the first, as the engine defines it."""
    first = filter_logits(penalize(llm.logits(prompt)[-1], p, prompt, []), p).double()
    rows = llm.logits([prompt + [t] for t in range(VOCAB)])[:, -1]  # [V, V]
    law = torch.zeros(VOCAB, dtype=torch.float64)
    for t in range(VOCAB):
        if first[t] > 0:
            law += first[t] * filter_logits(penalize(rows[t], p, prompt + [t], [t]), p).double()
    return law


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.8, top_k=12), dict(temperature=0.6, top_p=0.9, presence_penalty=0.7, repetition_penalty=1.3)],
)
def test_sampled_tokens_keep_the_target_distribution(loaded, options):
    """The second token is judged against a fixed draft (the likeliest second token): its counts over 3000 seeded
    requests fit the exact law (chi-square), and reject the law of a judge that forgot to remove the rejected
    draft before resampling, so the test can fail."""
    _, llm = loaded("llama")
    prompt = [5, 17, 33, 8, 21, 40]
    base = SamplingParams(max_tokens=3, ignore_eos=True, **options)
    law = second_token_law(llm, prompt, base)
    draft = int(law.argmax())
    engine = llm.engine(draft=Fixed([draft]), adaptive=NEVER_PAUSE)
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for batch in range(6):
        for i in range(500):
            seed = batch * 500 + i
            engine.add_request(f"s{seed}", prompt, SamplingParams(max_tokens=3, ignore_eos=True, seed=seed, **options))
        outs: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(out.request_id, []).extend(out.token_ids)
        for tokens in outs.values():
            counts[tokens[1]] += 1
    assert engine.stats().draft_steps == 3000
    assert 0.02 < engine.stats().accepted_tokens / 3000 < 0.98  # the draft was kept sometimes, not always
    assert chi2_pvalue(counts, law) > 1e-3
    kept = float(law[draft])
    forgot = kept * torch.nn.functional.one_hot(torch.tensor(draft), VOCAB).double() + (1 - kept) * law
    assert chi2_pvalue(counts, forgot) < 1e-6


# -- the request's own rules, with accepted runs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    return LLM(None, dtype="float32")


QUOTE = (
    "Copy this line exactly: In the beginning God created the heaven and the earth. And the earth was without "
    "form, and void. Now copy it again: In the beginning God created the heaven and the earth. And the earth"
)


def both(llm: LLM, params: SamplingParams, prompt: str = QUOTE):
    """(without drafting, with prompt lookup) completions of `prompt`, and the engine that drafted."""
    llm.engine(draft=None)
    off = llm.generate(prompt, params)[0]
    engine = llm.engine(draft="lookup")
    return off, llm.generate(prompt, params)[0], engine


@pytest.mark.parametrize(
    "options",
    [
        dict(max_tokens=50),
        dict(max_tokens=60, stop=["and I"]),  # inside a run of accepted tokens
        dict(max_tokens=60, stop=[" to the LORD, and the LORD hath given me a man to"]),  # spans many tokens
        dict(max_tokens=60, logprobs=3),
        dict(max_tokens=60, regex=r"[A-Za-z ,.]{10,200}"),  # drafts verified through the grammar
    ],
)
def test_stops_lengths_logprobs_and_grammars_behave_as_without_drafting(demo, options):
    """The demo model falls into a loop on this prompt, which prompt lookup then drafts."""
    params = SamplingParams(temperature=0, **options)
    off, on, engine = both(demo, params)
    assert (on.token_ids, on.text, on.finish_reason) == (off.token_ids, off.text, off.finish_reason)
    assert engine.stats().accepted_tokens > 0
    if "stop" in options:
        assert on.finish_reason == "stop" and options["stop"][0] not in on.text
    if params.max_tokens == 50:
        assert len(on.token_ids) == 50 and on.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "gemma4_dense"])
def test_penalties_apply_position_by_position(loaded, family):
    """Penalties depend on every token before: each accepted draft token must count for the next position."""
    _, llm = loaded(family)
    prompts = [repeating(8), repeating(9, 6, 2)]
    params = SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.4,
        frequency_penalty=0.3,
    )  # fmt: skip
    expected = plain(llm, prompts, params)
    oracle = Oracle({tuple(p): r for p, r in zip(prompts, expected)}, seed=3)
    engine = llm.engine(draft=oracle, block_size=4, adaptive=NEVER_PAUSE)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    assert engine.stats().accepted_tokens == sum(oracle.right) > 20


def test_logprobs_of_accepted_tokens_are_the_targets(demo):
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=2)
    demo.engine(draft=None)
    ids = demo.tokenizer.encode(QUOTE)
    off = run_outputs(demo, ids, params)
    engine = demo.engine(draft="lookup")
    on = run_outputs(demo, ids, params)
    assert engine.stats().accepted_tokens > 0 and max(len(o.token_ids) for o in on) > 1  # runs of several tokens
    a = [lp for o in off for lp in o.logprobs]
    b = [lp for o in on for lp in o.logprobs]
    assert [x.token_id for x in a] == [x.token_id for x in b]
    for x, y in zip(a, b):
        assert abs(x.logprob - y.logprob) < 1e-4
        assert [t for t, _ in x.top] == [t for t, _ in y.top]


def run_outputs(llm: LLM, ids: list[int], params: SamplingParams):
    engine = llm.engine()
    engine.add_request("r", ids, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.token_ids]
    return outs


def test_eos_inside_an_accepted_run_ends_the_request(loaded):
    _, llm = loaded("gemma4_dense")
    prompt = repeating(5)
    free = plain(llm, [prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = free[20]
    params = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop])
    expected = plain(llm, [prompt], params)[0]
    assert expected == free[: free.index(stop)]
    engine = llm.engine(draft=Replay(free), block_size=4, adaptive=NEVER_PAUSE)  # drafts run past the stop token
    out = llm.generate([prompt], params)[0]
    assert out.token_ids == expected and out.finish_reason == "stop"
    assert engine.stats().kv_blocks_used == 0


# -- adaptive: drafts that never pay stop themselves --------------------------------------------------------------
def test_rejected_drafts_stop_drafting(loaded):
    """Every draft rejected: the verified rows cost at most the starting credit, one try's overshoot and `earn`
    per plain step, so the slowdown is bounded by about `earn` (the benchmark's worst case measures it)."""
    _, llm = loaded("llama")
    prompt = repeating(6)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    expected = plain(llm, [prompt], params)
    wrong = [t for t in range(3, VOCAB) if t not in expected[0]][0]
    policy = Adaptive()
    engine = llm.engine(draft=Fixed([wrong] * 8), adaptive=policy)
    assert [c.token_ids for c in llm.generate([prompt], params)] == expected
    stats = engine.stats()
    assert stats.accepted_tokens == 0 and stats.draft_steps >= 2
    spent = stats.draft_steps * policy.try_cost + stats.drafted_tokens * policy.row_cost  # batch 1: one row a try
    assert spent <= policy.start + policy.cost(policy.k_start, 1, 0) + policy.earn * 200
    one_try = policy.cost(1, 1, 0)
    assert stats.draft_steps <= (policy.start + 200 * policy.earn) / one_try + 2  # then one try per ~25 tokens


def test_drafts_that_pay_keep_drafting(loaded):
    """Half the drafted tokens kept (two of every four): that pays, so the credit never runs out."""
    _, llm = loaded("llama")
    prompt = repeating(6)
    params = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    expected = plain(llm, [prompt], params)[0]

    class Half:
        def propose(self, seqs, ks):
            out = []
            for seq in seqs:
                right = expected[len(seq.output) : len(seq.output) + 2]
                out.append(right + [t for t in range(3, VOCAB) if t not in right][:2])
            return out

    engine = llm.engine(draft=Half(), adaptive=Adaptive(k_start=4, k_max=4, fit_rows=False))
    assert llm.generate([prompt], params)[0].token_ids == expected
    stats = engine.stats()
    assert stats.accepted_tokens >= 2 * stats.draft_steps - 2 and stats.draft_steps >= 90 // 3 - 2


@pytest.mark.parametrize("path", ["avx512", "avx2"])
def test_verify_steps_fit_the_row_cap(loaded, monkeypatch, path):
    """On CPU the drafts are trimmed so that a verify step runs at most cpu.verify_rows() rows (decode rows and
    draft tokens): 16 where the GEMVs take a batch in one pass over the weights (AVX-512), 8 on AVX2. Four
    requests that each want 8 draft tokens fill the cap exactly, and their tokens stay the plain ones."""
    from hearthlm.engine import engine as engine_module
    from hearthlm.kernels import cpu

    if not cpu.available() or path not in cpu.gemv_paths():
        pytest.skip(f"this CPU has no {path} GEMV path")
    _, llm = loaded("gemma4_dense")
    prompts = [repeating(s) for s in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    replies = {tuple(p): r for p, r in zip(prompts, plain(llm, prompts, params))}

    class Right:
        def propose(self, seqs, ks):
            return [replies[tuple(q.prompt)][len(q.output) : len(q.output) + k] for q, k in zip(seqs, ks)]

    rows, real = [], engine_module.run_verify

    def counted(model, cache, seqs, drafts):
        rows.append(sum(len(d) + 1 for d in drafts))
        return real(model, cache, seqs, drafts)

    monkeypatch.setattr(engine_module, "run_verify", counted)
    before = cpu.gemv_isa()
    cpu.set_gemv_isa(path)
    try:
        llm.engine(draft=Right(), adaptive=Adaptive(k_start=8, k_max=8, row_cost=0.0, try_cost=0.0))
        got = [c.token_ids for c in llm.generate(prompts, params)]
    finally:
        cpu.set_gemv_isa(before)
    assert got == [replies[tuple(p)] for p in prompts]
    assert cpu.verify_rows() == (cpu.VERIFY_ROWS_WIDE if before == "avx512" else cpu.MAX_ROWS)  # the path restored
    assert max(rows) == (cpu.VERIFY_ROWS_WIDE if path == "avx512" else cpu.MAX_ROWS)


def test_draft_length_grows_with_acceptance(loaded):
    _, llm = loaded("gemma4_dense")
    prompt = repeating(1)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = plain(llm, [prompt], params)[0]
    engine = llm.engine(draft=Replay(expected), adaptive=Adaptive(k_start=1, k_max=8))
    assert llm.generate([prompt], params)[0].token_ids == expected
    stats = engine.stats()
    assert stats.drafted_tokens / stats.draft_steps > 4  # 1, 3, 5, 7, 8, 8, ...


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    from hearthlm.engine.sequence import Sequence
    from hearthlm.engine.speculative import SpecState

    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    seq = Sequence("r", [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3], SamplingParams(), None, None, 100)
    seq.spec = SpecState(lookup, Adaptive())
    assert lookup.propose([seq], [3]) == [[4, 6, 7]]  # "2 3" last seen before "4 6 7"
    seq.tokens += [4]  # "2 3 4" is longer: its latest match came before "6 7 2"
    assert lookup.propose([seq], [3]) == [[6, 7, 2]]
    seq.tokens += [8]
    assert lookup.propose([seq], [3]) == [[]]
    seq.tokens += [7, 7]  # the latest "7" is right before the end: the run repeats
    assert lookup.propose([seq], [4]) == [[7, 7, 7, 7]]
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_prompt_lookup_needs_two_matching_tokens_by_default():
    from hearthlm.engine.sequence import Sequence
    from hearthlm.engine.speculative import SpecState

    lookup = PromptLookup()
    seq = Sequence("r", [5, 1, 2, 9, 8, 1], SamplingParams(), None, None, 100)
    seq.spec = SpecState(lookup, Adaptive())
    assert lookup.propose([seq], [2]) == [[]]  # only "1" recurs: no draft
    seq.tokens += [2]
    assert lookup.propose([seq], [2]) == [[9, 8]]  # "1 2" did occur: what followed it


# -- entry points ---------------------------------------------------------------------------------------------
def test_per_request_switch_and_unknown_names(loaded):
    _, llm = loaded("llama")
    prompt = repeating(2)
    engine = llm.engine(draft="lookup")
    llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, speculative=False))
    assert engine.stats().draft_steps == 0
    engine = llm.engine(draft=None)
    llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, speculative=True))
    assert engine.stats().draft_steps > 0
    with pytest.raises(ValueError, match="unknown draft 'eagle'.*'lookup'"):
        llm.engine(draft="eagle")
    with pytest.raises(ValueError, match="speculative must be"):
        SamplingParams(speculative="yes")


def test_llm_draft_is_the_engines_default(checkpoint):
    _, folder = checkpoint("llama")
    llm = LLM(folder, dtype="float32", draft="lookup")
    assert llm.engine().drafter is not None and llm.engine(draft=None).drafter is None
    with pytest.raises(ValueError, match="unknown draft 'eagle'"):  # before the weights load
        LLM(folder, draft="eagle")


def hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearthlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_draft_option(demo):
    prompt = "And the LORD said unto Moses,"
    expected = demo.generate(prompt, SamplingParams(max_tokens=40, temperature=0))[0].text
    result = hearth("run", "--raw", "--draft", "lookup", "--dtype", "float32", "--temperature", "0", "--max-tokens",
                    "40", prompt)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    result = hearth("run", "--draft", "eagle", "hi")
    assert result.returncode == 2 and "--draft" in result.stderr and "'lookup', 'off'" in result.stderr


def test_server_switch_and_metrics(client, server, served):
    body = dict(model="hearth-demo", prompt=QUOTE, temperature=0, max_tokens=40)
    off = client.completions.create(**body, extra_body={"speculative": False})
    idle(served)
    before = served.engine.stats()
    assert before.draft_steps == 0  # the demo server drafts only when asked
    on = client.completions.create(**body, extra_body={"speculative": True})
    assert on.choices[0].text == off.choices[0].text
    idle(served)
    text = httpx.get(server.url + "/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["hearth_draft_tokens_total"] > 0
    assert 0 < values["hearth_draft_accepted_tokens_total"] <= values["hearth_draft_tokens_total"]
    rate = values["hearth_draft_accepted_tokens_total"] / values["hearth_draft_tokens_total"]
    assert values["hearth_draft_acceptance_rate"] == pytest.approx(rate)
    bad = httpx.post(server.url + "/v1/completions", json=body | {"speculative": "maybe"})
    assert bad.status_code == 400
