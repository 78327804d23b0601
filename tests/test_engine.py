"""The serving engine on tiny random checkpoints: paged cache == transformers == contiguous cache, continuous
batching == one by one, prefix cache on == off, preemption and chunked prefill change nothing, sampling
options against hand computations, the async front, and input errors."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import replace as dataclasses_replace

import pytest
import torch
from checkpoints import VOCAB
from transformers import GenerationConfig

from hearthlm import LLM, ContextLengthError, SamplingParams
from hearthlm.engine.async_engine import AsyncEngine
from hearthlm.engine.block_manager import BlockManager
from hearthlm.engine.detokenize import TextStream
from hearthlm.engine.engine import Engine, RequestOutput
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens
from hearthlm.engine.sequence import Sequence

WINDOW = 8  # the tiny sliding configs' window
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded machine two OpenMP threads made
    these tests ~20x slower (measured: 8 s against 0.3 s for the same 48 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: dict, add_at: dict | None = None) -> dict[str, list[RequestOutput]]:
    """Add requests (id -> (prompt, params)) at their step in add_at (default 0); step until all finish."""
    add_at = add_at or {}
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    step = 0
    while True:
        for rid, (prompt, params) in requests.items():
            if add_at.get(rid, 0) == step:
                engine.add_request(rid, prompt, params)
        if not engine.has_unfinished() and step >= max(add_at.values(), default=0):
            return outs
        for out in engine.step():
            outs[out.request_id].append(out)
        step += 1


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def alone(llm: LLM, prompt: list[int], params: SamplingParams = GREEDY, **kw) -> list[int]:
    return tokens(run(Engine(llm, **kw), {"r": (prompt, params)})["r"])


def contiguous_greedy(llm: LLM, prompt: list[int], steps: int) -> list[int]:
    cache = ContiguousKVCache(llm.config.layers, 1, len(prompt) + steps, llm.dtype, llm.device)
    h = forward_tokens(llm.model, cache, torch.tensor([prompt]), torch.tensor([0]))
    out = []
    for _ in range(steps):
        out.append(int(llm.model.logits(h[:, -1]).argmax()))
        h = forward_tokens(llm.model, cache, torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + len(out) - 1]))
    return out


# -- the paged cache against the references -------------------------------------------------------------
@pytest.mark.parametrize(
    "name, block_size",
    [
        ("gemma4_all", 3),
        ("gemma4_all", 16),
        ("gemma4_plain", 5),
        ("llama", 5),
        ("qwen2", 3),
        ("mistral", 5),
        ("qwen3_moe", 7),
    ],
)
def test_paged_generation_equals_transformers_and_contiguous(name, block_size, loaded):
    ref, llm = loaded(name)
    prompt = ids(3 * WINDOW + 2, seed=1)  # longer than the window; 26 is no multiple of 3 or 16
    new = 16
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    assert alone(llm, prompt, params, block_size=block_size, prefill_chunk=7) == expected
    assert contiguous_greedy(llm, prompt, new) == expected


def test_sliding_pools_recycle_blocks_and_shared_layers_store_nothing(loaded):
    _, llm = loaded("gemma4_all")
    engine = Engine(llm, block_size=4)
    assert set(engine.cache.k) == {0, 1, 2}  # layers 3-5 are KV-shared
    assert set(engine.blocks.pools) == {WINDOW, None}
    engine.add_request("r", ids(40, seed=2), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        seq = next(iter(engine.scheduler.running), None)
        if seq is not None:  # a window of 8 spans at most 3 blocks of 4 (4 while a chunk is computed)
            assert sum(b is not None for b in seq.tables[WINDOW]) <= 3
            assert all(b is not None for b in seq.tables[None])
    assert engine.stats().kv_blocks_used == 0


# -- continuous batching ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2", "gemma4_all"])
def test_sixteen_requests_joining_at_different_steps_equal_each_alone(name, loaded):
    _, llm = loaded(name)
    lengths = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 21, 25, 30, 33, 40]
    requests = {f"r{i}": (ids(n, seed=100 + i), GREEDY) for i, n in enumerate(lengths)}
    add_at = {f"r{i}": (i * 3) % 11 for i in range(len(lengths))}
    engine = Engine(llm, max_running=16, block_size=5, prefill_chunk=16)
    together = run(engine, requests, add_at)
    for rid, (prompt, params) in requests.items():
        assert tokens(together[rid]) == alone(llm, prompt, params), rid
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


def test_same_seed_same_sample_alone_and_in_a_batch(loaded):
    _, llm = loaded("qwen3")
    prompt = ids(10, seed=3)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    solo = alone(llm, prompt, params)
    others = {f"o{i}": (ids(5 + i, seed=50 + i), SamplingParams(max_tokens=20, temperature=1.0)) for i in range(5)}
    batch = run(Engine(llm), {"x": (prompt, params), **others}, {"o0": 0, "x": 2, "o1": 1, "o2": 3})
    assert tokens(batch["x"]) == solo
    other_seed = alone(llm, prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed != solo


# -- prefix cache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma4_all"])
def test_prefix_cache_hit_gives_the_cold_output(name, loaded):
    _, llm = loaded(name)
    shared = ids(37, seed=4)
    a, b = shared + ids(5, seed=5), shared + ids(9, seed=6)
    engine = Engine(llm, block_size=4)
    first = run(engine, {"a": (a, GREEDY)})["a"]
    assert first[-1].cached_tokens == 0
    second = run(engine, {"b": (b, GREEDY)})["b"]
    assert second[-1].cached_tokens == 36  # the 9 full blocks of the shared prefix
    assert engine.stats().prefix_hit_tokens == 36
    assert tokens(second) == alone(llm, b) and tokens(first) == alone(llm, a)
    again = run(engine, {"a2": (a, GREEDY)})["a2"]  # the whole prompt cached: one token is still computed
    assert again[-1].cached_tokens == 40 and tokens(again) == tokens(first)
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_plan_equals_the_general_plan(block_size):
    """A CPU decode step's slots and masks come from NumPy (PagedKVCache._plan_decode): field for field what the
    general torch plan gives, over full and sliding windows, rows of different lengths (masked padding), one row
    whose blocks are consecutive (a slice), scattered blocks, and positions on and off block boundaries."""
    from hearthlm.config import LayerSpec, RopeSpec
    from hearthlm.engine.paged_cache import PagedKVCache

    layers = [LayerSpec(head_dim=8, num_kv_heads=1, rope=RopeSpec(), sliding_window=w) for w in (None, 8, 40)]
    cache = PagedKVCache(layers, {None: 64, 8: 64, 40: 64}, block_size, torch.float32, torch.device("cpu"))
    rng = random.Random(block_size)
    cases = [[0], [block_size - 1], [block_size], [37]]  # one row: consecutive blocks, a slice
    cases += [[rng.randrange(0, 120) for _ in range(b)] for b in (1, 2, 3, 5, 8) for _ in range(6)]
    for starts in cases:
        tables = []
        for p in starts:
            table = list(range(64))
            if len(starts) > 1 or rng.random() < 0.5:
                rng.shuffle(table)  # scattered blocks
            tables.append(table[: p // block_size + 1])
        positions = torch.tensor(starts)[:, None]
        for window in (None, 8, 40):
            fast, general = (
                cache._plan_decode(window, starts, tables),
                cache._plan_general(window, positions, starts, tables),
            )
            assert fast.S == general.S and fast.causal == general.causal, (starts, window)
            assert type(fast.read) is type(general.read) and torch.equal(fast.write, general.write)
            if isinstance(fast.read, slice):
                assert fast.read == general.read
            else:
                assert torch.equal(fast.read, general.read)
            assert (fast.mask is None) == (general.mask is None)
            if fast.mask is not None:
                assert torch.equal(fast.mask, general.mask) and torch.equal(fast.decode[4], general.decode[4])
            assert fast.decode[2:4] == general.decode[2:4]


@pytest.mark.parametrize("block_size", [4, 16])
def test_a_padded_row_plans_what_it_plans_alone_and_writes_no_pad(block_size):
    """Rows of a packed prefill (runner.run_paged) begin with pads: copies of the row's first position. Each row
    reads, masks and writes what it does alone, its pads write nothing, and its pads' queries see only its keys."""
    from hearthlm.config import LayerSpec, RopeSpec
    from hearthlm.engine.paged_cache import PagedKVCache

    layers = [LayerSpec(head_dim=8, num_kv_heads=1, rope=RopeSpec(), sliding_window=w) for w in (None, 8)]
    cache = PagedKVCache(layers, {None: 128, 8: 128}, block_size, torch.float32, torch.device("cpu"))
    rng = random.Random(block_size)
    for _ in range(20):
        b = rng.randrange(2, 6)
        starts, counts = [rng.randrange(0, 40) for _ in range(b)], [rng.randrange(2, 13) for _ in range(b)]
        T = max(counts)
        free, tables = rng.sample(range(128), 128), []  # each row its own blocks, scattered
        for p, c in zip(starts, counts):
            need = (p + c - 1) // block_size + 1
            tables.append(free[:need])
            free = free[need:]
        positions = torch.tensor([[p] * (T - c) + list(range(p, p + c)) for p, c in zip(starts, counts)])
        for window in (None, 8):
            packed = cache._plan_general(window, positions, starts, tables)
            assert packed.write.shape == (sum(counts),) and len(set(packed.write.tolist())) == sum(counts)
            writes = packed.write.split(counts)
            read = packed.read.view(b, packed.S)
            for r, (p, c) in enumerate(zip(starts, counts)):
                one = cache._plan_general(window, torch.arange(p, p + c)[None], [p], [tables[r]])
                assert torch.equal(writes[r], one.write), (starts, counts, window, r)
                slots = torch.arange(one.S) if isinstance(one.read, slice) else one.read
                if isinstance(one.read, slice):
                    slots = slots + one.read.start
                mask = torch.ones(c, one.S, dtype=torch.bool) if one.mask is None else one.mask[0, 0]
                seen = read[r, : one.S]  # past its own keys a row's reads are padding, masked out
                assert torch.equal(seen[mask.any(0)], slots[mask.any(0)])
                row_mask = packed.mask[r, 0]
                assert torch.equal(row_mask[T - c :, : one.S], mask) and not row_mask[:, one.S :].any()
                pads = row_mask[: T - c, : one.S]  # a pad is its row's first token again
                assert torch.equal(pads, mask[:1].expand_as(pads))


@pytest.mark.parametrize("name", ["gemma4_all", "llama", "qwen3_moe"])
def test_prompts_of_different_lengths_prefill_in_one_padded_forward(name, loaded):
    """Prompts that arrive together share one prefill forward, the shorter ones padded (runner.packs), and each
    still gets the reference's greedy tokens and what it gets alone."""
    ref, llm = loaded(name)
    prompts = {f"r{n}": ids(n, seed=200 + n) for n in (9, 10, 11, 12)}  # 4 x 12 padded <= 1.25 x 42 tokens
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = Engine(llm, block_size=5, prefill_chunk=64)
    shapes, begin = [], engine.cache.begin
    engine.cache.begin = lambda positions, *a, **kw: (shapes.append(tuple(positions.shape)), begin(positions, *a, **kw))
    out = run(engine, {rid: (p, params) for rid, p in prompts.items()})
    assert shapes[0] == (4, 12) and shapes[1:] == [(4, 1)] * 9  # one packed prefill, then batched decodes
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    for rid, prompt in prompts.items():
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
        assert tokens(out[rid]) == expected == alone(llm, prompt, params), rid


def test_packs_group_chunks_while_padding_stays_small():
    from hearthlm.engine.runner import packs
    from hearthlm.engine.scheduler import Work

    def sizes(ns):
        return [[w.n for w in group] for group in packs([Work(None, n) for n in ns])]

    assert sizes([30, 28, 31, 29]) == [[28, 29, 30, 31]]
    assert sizes([2000, 10, 12]) == [[10, 12], [2000]]  # a long prompt pads no short one to its length
    assert sizes([4, 5, 100, 110, 120]) == [[4, 5], [100, 110, 120]]
    assert sizes([7]) == [[7]] and sizes([]) == []


def test_a_sliding_prefix_hit_needs_the_last_window_cached():
    bm = BlockManager({None: 32, 4: 32}, block_size=2)
    params = SamplingParams()

    def seq(toks):
        return Sequence("s", toks, params, TextStream(None, []), None, 100)

    first = seq(list(range(3, 15)))  # 12 tokens: 6 blocks
    assert bm.allocate(first, 12)
    first.num_computed = 12
    bm.register(first)
    bm.free(first)
    second = seq(list(range(3, 15)) + [20, 21])
    assert bm.match_prefix(second) == 12
    # Evict the sliding pool's block 4 (positions 8-9): a query at 12 reads 9..12, so 12 is no longer a hit;
    # at 10 it reads 7..10 (blocks 3, 4): no hit either; 8 reads 5..8 (blocks 2, 3): a hit.
    pool = bm.pools[4]
    block = pool.by_key[second.hashes[4]]
    pool.evictable.pop(block)
    del pool.by_key[pool.key.pop(block)]
    pool.free.append(block)
    assert bm.match_prefix(second) == 8


# -- preemption, abort ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma4_all"])
def test_preempted_requests_are_recomputed_to_the_same_output(name, loaded):
    _, llm = loaded(name)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    requests = {f"r{i}": (ids(10 + 3 * i, seed=10 + i), params) for i in range(4)}
    engine = Engine(llm, block_size=4, kv_blocks=10, prefill_chunk=8)  # 40 positions; each needs 24-33
    out = run(engine, requests)
    assert engine.stats().preemptions > 0
    for rid, (prompt, p) in requests.items():
        assert tokens(out[rid]) == alone(llm, prompt, p), rid
    assert engine.stats().kv_blocks_used == 0


def test_a_request_that_can_never_fit_is_refused_at_add_time(loaded):
    _, llm = loaded("llama")
    engine = Engine(llm, block_size=4, kv_blocks=4)
    with pytest.raises(ValueError, match="kv_blocks"):
        engine.add_request("r", ids(16, seed=1), GREEDY)  # 17 positions need 5 blocks
    engine.add_request("ok", ids(15, seed=1), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    # The cache holds 16 positions: the request ends there, with reason "length".
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 1


def test_abort_frees_blocks_and_emits_a_final_output(loaded):
    _, llm = loaded("qwen3")
    engine = Engine(llm, block_size=4)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", ids(20, seed=i), params)
    for _ in range(3):
        engine.step()
    used = engine.stats().kv_blocks_used
    engine.abort("r1")
    assert engine.stats().kv_blocks_used == used - 6  # 21..23 positions in blocks of 4
    engine.abort("r1")  # twice, or an unknown id: nothing happens
    engine.abort("nope")
    outs = engine.step()
    final = [o for o in outs if o.request_id == "r1"]
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "abort"
    while engine.has_unfinished():
        assert all(o.request_id != "r1" for o in engine.step())
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


def test_requests_past_sixteen_are_admitted_between_steps_up_to_the_kv_cache(loaded):
    # 48 streams: every one is admitted and gets its first token while the first ones are still generating, and
    # within a number of steps that depends on the prompts ahead of it, not on how long the others generate.
    _, llm = loaded("qwen2")
    engine = Engine(llm, block_size=4, prefill_chunk=64)
    assert engine.max_running > 16
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    first: dict[str, int] = {}
    for i in range(8):
        engine.add_request(f"early{i}", ids(6, seed=300 + i), long)
    for step in range(40):
        if step == 10:  # the early ones are decoding; 40 more arrive at once
            for i in range(40):
                engine.add_request(f"late{i}", ids(6, seed=400 + i), long)
        outs = engine.step()
        assert not any(o.finished for o in outs)
        for o in outs:
            if o.token_ids:
                first.setdefault(o.request_id, step)
        assert engine.stats().running <= engine.max_running
    assert len(first) == 48
    # 40 prompts of 6 tokens, 64 prompt tokens a step: all prefilled within ceil(240 / 64) = 4 steps of arriving
    assert max(first[f"late{i}"] for i in range(40)) <= 10 + 4
    assert engine.stats().running == 48 and engine.stats().waiting == 0


def test_past_max_running_requests_wait_in_order(loaded):
    _, llm = loaded("qwen2")
    engine = Engine(llm, max_running=3, block_size=4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    requests = {f"r{i}": (ids(5, seed=500 + i), params) for i in range(7)}
    order, running, got = [], [], {rid: [] for rid in requests}
    for rid, (prompt, p) in requests.items():
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished():
        outs = engine.step()
        running.append(engine.stats().running)
        for o in outs:
            got[o.request_id] += o.token_ids
        order += [o.request_id for o in outs if o.finished]
    assert max(running) == 3 and order == list(requests)  # first come, first served
    for rid, (prompt, p) in requests.items():
        assert got[rid] == alone(llm, prompt, p)


def test_batched_greedy_logprobs_equal_the_log_softmax(loaded):
    # 12 greedy rows with logprobs (picked and scored in one batched op) beside a penalized and a sampled row
    # (scored row by row): each row's tokens equal its run alone, and its logprobs the model's log-softmax.
    _, llm = loaded("gemma4_all")
    plain = {f"g{i}": (ids(5 + i, seed=600 + i), dataclasses_replace(GREEDY, logprobs=i % 4)) for i in range(12)}
    others = {
        "pen": (ids(9, seed=700), dataclasses_replace(GREEDY, logprobs=2, repetition_penalty=1.5)),
        "hot": (ids(9, seed=701), SamplingParams(max_tokens=12, temperature=0.8, seed=5, logprobs=1, ignore_eos=True)),
    }
    requests = plain | others
    outs = run(Engine(llm), requests)
    for rid, (prompt, params) in requests.items():
        got = tokens(outs[rid])
        assert got == alone(llm, prompt, params)
        lps = [lp for o in outs[rid] for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == got
        if rid in plain:
            expected = torch.log_softmax(llm.logits(prompt + got), -1)
            for i, lp in enumerate(lps):
                row = expected[len(prompt) + i - 1]
                assert math.isclose(lp.logprob, float(row[got[i]]), abs_tol=1e-4)
                assert [t for t, _ in lp.top] == torch.topk(row, params.logprobs).indices.tolist()


# -- chunked prefill --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2", "gemma4_all"])
def test_chunked_prefill_interleaves_with_decodes_and_matches_unchunked(name, loaded):
    _, llm = loaded(name)
    short, long = ids(4, seed=7), ids(70, seed=8)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = Engine(llm, block_size=4, prefill_chunk=16)
    out = run(engine, {"short": (short, params), "long": (long, params)}, {"short": 0, "long": 2})
    assert tokens(out["long"]) == alone(llm, long, params, prefill_chunk=512)
    assert tokens(out["short"]) == alone(llm, short, params)
    # While the 70-token prompt was prefilled 16 tokens a step (5 steps), the short request kept streaming.
    streamed = [o for o in out["short"] if o.token_ids]
    assert len(streamed) == 20 and len(out["long"]) == 20


@pytest.mark.parametrize("name", ["qwen2", "gemma4_all"])
def test_a_long_prefill_never_stalls_the_running_streams(name, loaded):
    # Three streams decode; a 150-token prompt arrives. Until its first token (ceil(150 / 16) = 10 steps of
    # prefill chunks), every step still gives each stream its next token.
    _, llm = loaded(name)
    engine = Engine(llm, block_size=4, prefill_chunk=16)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    streams = {f"s{i}": ids(3 + i, seed=800 + i) for i in range(3)}
    for rid, prompt in streams.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, list[int]] = {rid: [] for rid in [*streams, "long"]}
    for _ in range(3):
        for o in engine.step():
            got[o.request_id] += o.token_ids
    long = ids(150, seed=900)
    engine.add_request("long", long, params)
    steps = 0
    while not got["long"]:
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        assert all(len(outs[rid].token_ids) == 1 for rid in streams), f"a stream stalled at step {steps}"
        for rid, o in outs.items():
            got[rid] += o.token_ids
    assert steps == math.ceil(150 / 16)
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.token_ids
    for rid, prompt in [*streams.items(), ("long", long)]:
        assert got[rid] == alone(llm, prompt, params)


# -- sampling options -------------------------------------------------------------------------------------
def _hand_penalized(logits: torch.Tensor, p: SamplingParams, seen: list[int], generated: list[int]) -> torch.Tensor:
    out = logits.clone()
    for t in set(seen):
        x = float(logits[t])
        out[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
    for t in set(generated):
        out[t] -= generated.count(t) * p.frequency_penalty + p.presence_penalty
    return out


@pytest.mark.parametrize(
    "kwargs",
    [dict(repetition_penalty=1.8), dict(presence_penalty=1.5), dict(frequency_penalty=0.7, presence_penalty=-0.3)],
)
def test_penalties_follow_the_hand_computation(kwargs, loaded):
    _, llm = loaded("qwen3")
    prompt = ids(6, seed=9) * 2
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3, **kwargs)
    outs = run(Engine(llm), {"r": (prompt, p)})["r"]
    got = tokens(outs)
    assert got != alone(llm, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    logprobs = [lp for o in outs for lp in o.logprobs]
    full = llm.logits(prompt + got)
    for i, t in enumerate(got):
        penalized = _hand_penalized(full[len(prompt) + i - 1], p, prompt + got[:i], got[:i])
        assert int(penalized.argmax()) == t
        expected = torch.log_softmax(penalized, -1)
        assert logprobs[i].token_id == t and math.isclose(logprobs[i].logprob, float(expected[t]), abs_tol=1e-4)


def test_logprobs_are_log_softmax_of_the_model_logits(loaded):
    _, llm = loaded("gemma4_all")
    prompt = ids(12, seed=11)
    p = SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True, logprobs=5)
    outs = run(Engine(llm), {"r": (prompt, p)})["r"]
    got = tokens(outs)
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == got
    expected = torch.log_softmax(llm.logits(prompt + got), -1)
    for i, lp in enumerate(lps):
        row = expected[len(prompt) + i - 1]
        assert math.isclose(lp.logprob, float(row[got[i]]), abs_tol=1e-4)
        best = torch.topk(row, 5)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert all(math.isclose(x, y, abs_tol=1e-4) for (_, x), y in zip(lp.top, best.values.tolist()))
    zero = run(Engine(llm), {"r": (prompt, SamplingParams(max_tokens=2, logprobs=0))})["r"]
    assert all(lp.top == [] for o in zero for lp in o.logprobs)
    off = run(Engine(llm), {"r": (prompt, SamplingParams(max_tokens=2))})["r"]
    assert all(o.logprobs is None for o in off)


def test_stop_token_ids_end_the_request_without_the_token(loaded):
    _, llm = loaded("qwen3")
    prompt = ids(8, seed=12)
    free = alone(llm, prompt, GREEDY)
    stop = free[5]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    outs = run(Engine(llm), {"r": (prompt, params)})["r"]
    assert tokens(outs) == free[: free.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].completion_tokens == free.index(stop)


@pytest.fixture(scope="module")
def demo():
    return LLM()  # the shipped demo model: the only checkpoint here with a real tokenizer


def test_stop_strings_across_token_boundaries_are_never_emitted(demo):
    prompt = demo.tokenizer.encode("And God said unto Moses,")
    params = SamplingParams(max_tokens=24, temperature=0)
    free = run(Engine(demo), {"r": (prompt, params)})["r"]
    pieces = [demo.tokenizer.decode([t]) for t in tokens(free)]
    text = "".join(o.text for o in free)
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = text.index(stop)
    outs = run(Engine(demo), {"r": (prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop, "zzzz"]))})["r"]
    streamed = [o.text for o in outs]
    assert "".join(streamed) == text[:cut]
    assert all(stop not in s for s in streamed)
    assert outs[-1].finish_reason == "stop"
    assert demo.generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop=stop))[0].text == text[:cut]


def test_without_detokenize_outputs_carry_ids_only_and_stop_strings_still_stop(demo):
    """detokenize=False (what the server asks, since it decodes the ids itself): the same tokens, no text; a
    request with stop strings still ends where its text reaches one."""
    prompt = demo.tokenizer.encode("And God said unto Moses,")
    plain = run(Engine(demo), {"r": (prompt, SamplingParams(max_tokens=24, temperature=0))})["r"]
    quiet = run(Engine(demo), {"r": (prompt, SamplingParams(max_tokens=24, temperature=0, detokenize=False))})["r"]
    assert tokens(quiet) == tokens(plain) and all(o.text == "" for o in quiet)
    assert "".join(o.text for o in plain) != ""
    text = "".join(o.text for o in plain)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    ended = [
        run(Engine(demo), {"r": (prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop], detokenize=d))})
        for d in (True, False)
    ]
    assert tokens(ended[0]["r"]) == tokens(ended[1]["r"]) and len(tokens(ended[1]["r"])) < 24
    assert ended[1]["r"][-1].finish_reason == "stop"


def test_text_stream_holds_back_possible_stop_prefixes(demo):
    stream = TextStream(demo.tokenizer, ["END"])
    emitted = ""
    for t in demo.tokenizer.encode("one E two EN three", add_special_tokens=False):
        emitted += stream.push(t)
        assert not emitted.endswith(("E", "EN"))  # a possible start of "END" is held back
    emitted += stream.finish()
    assert emitted == "one E two EN three" and not stream.stopped
    stream = TextStream(demo.tokenizer, ["END"])
    out = [stream.push(t) for t in demo.tokenizer.encode("abc ENDING", add_special_tokens=False)]
    assert "".join(out) + stream.finish() == "abc " and stream.stopped


# -- the async front --------------------------------------------------------------------------------------
def test_async_engine_streams_concurrent_requests_and_aborts_cancelled_ones(loaded):
    _, llm = loaded("qwen2")
    engine = Engine(llm, block_size=4)
    front = AsyncEngine(engine)
    prompts = [ids(5 + 3 * i, seed=20 + i) for i in range(4)]

    async def consume(prompt, n):
        got = []
        async for out in front.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
            got += out.token_ids
        return got

    async def settle():
        for _ in range(500):
            if engine.stats().kv_blocks_used == 0 and not engine.has_unfinished():
                return
            await asyncio.sleep(0.01)

    async def main():
        together = await asyncio.gather(*(consume(p, 10) for p in prompts))
        slow = asyncio.create_task(consume(prompts[0], 200))
        while engine.stats().running == 0:
            await asyncio.sleep(0.01)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        await settle()
        assert engine.stats().kv_blocks_used == 0
        closed = front.generate(prompts[1], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await closed.__anext__()
        await closed.aclose()  # what a server does when the client disconnects
        await settle()
        stream = front.generate([], SamplingParams())
        with pytest.raises(ValueError, match="empty prompt"):
            await stream.__anext__()
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await front.generate([VOCAB + 5], SamplingParams()).__anext__()
        return together

    try:
        together = asyncio.run(main())
        assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        assert together == [alone(llm, p, params) for p in prompts]
    finally:
        front.shutdown()


# -- bad input --------------------------------------------------------------------------------------------
def test_bad_requests_are_refused_with_clear_errors(loaded):
    _, llm = loaded("llama")
    engine = Engine(llm)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\)"):
        engine.add_request("a", [1, VOCAB], GREEDY)
    with pytest.raises(ContextLengthError, match="at most 255 tokens"):
        engine.add_request("a", [5] * 256, GREEDY)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("a", [5], SamplingParams(stop_token_ids=[VOCAB]))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", [5], SamplingParams(stop=["x"]))
    engine.add_request("a", [5], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [6], GREEDY)
    with pytest.raises(ValueError, match="max_running"):
        Engine(llm, max_running=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(frequency_penalty=-2.5),
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(stop_token_ids=[-1]),
        dict(stop=[""]),
    ],
)
def test_bad_sampling_params_are_refused(kwargs):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kwargs)


def test_prefix_caching_off_prefills_every_repeat(checkpoint):
    """Benchmarks repeat one prompt and must time a cold prefill each time."""
    _, folder = checkpoint("llama")
    llm = LLM(folder, dtype="float32")
    prompt = list(range(3, 40))
    for caching, expected in [(True, 32), (False, 0)]:
        engine = llm.engine(prefix_caching=caching)
        assert llm.engine() is engine  # no options: the same engine
        cached = []
        for i in range(2):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=2, temperature=0))
            while engine.has_unfinished():
                cached += [o.cached_tokens for o in engine.step() if o.finished]
        assert cached == [0, expected]


def test_async_engine_steps_on_the_callers_thread_when_asked(loaded):
    # hearth serve steps on the main thread (OpenMP regions cost ~20x more from other threads): the HTTP side
    # lives on another thread, and shutdown() from there ends run().
    _, llm = loaded("qwen2")
    front = AsyncEngine(Engine(llm, block_size=4), background=False)
    prompt, params = ids(7, seed=3), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got, stepped_on = [], []

    async def client():
        async for out in front.generate(prompt, params):
            got.extend(out.token_ids)

    def http_side():
        asyncio.run(client())
        front.shutdown()

    import threading

    original = front.engine.step
    front.engine.step = lambda: (stepped_on.append(threading.current_thread()), original())[1]
    side = threading.Thread(target=http_side)
    side.start()
    front.run()  # returns once the other thread shuts the engine down
    side.join()
    assert got == llm.generate([prompt], params)[0].token_ids
    assert set(stepped_on) == {threading.main_thread()}
    threaded = AsyncEngine(Engine(llm, block_size=4))
    with pytest.raises(RuntimeError, match="stepped by another thread"):
        threaded.run()
    threaded.shutdown()


def test_a_failing_row_ends_its_request_alone(loaded, monkeypatch):
    """A request whose token cannot be picked (here: its sampler raises) ends with finish_reason "error" and the
    reason; the batch it shared goes on, and the other request's tokens are those it gets alone."""
    import hearthlm.engine.engine as engine_module

    _, llm = loaded("qwen2")
    real = engine_module.pick

    def pick(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("a sampler fault")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "pick", pick)
    engine = Engine(llm, block_size=4)
    good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    bad = SamplingParams(max_tokens=6, temperature=0.7, seed=666, ignore_eos=True)
    engine.add_request("good", ids(9, seed=1), good)
    engine.add_request("bad", ids(5, seed=2), bad)
    outs: dict[str, list[RequestOutput]] = {"good": [], "bad": []}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    last = outs["bad"][-1]
    assert last.finished and last.finish_reason == "error" and "a sampler fault" in last.error
    assert [t for o in outs["good"] for t in o.token_ids] == llm.generate([ids(9, seed=1)], good)[0].token_ids
    assert engine.stats().kv_blocks_used == 0


def test_resident_kv_bytes_count_the_blocks_written(loaded):
    """The KV pools are reserved but take memory only where a block has been written: stats() reports those
    bytes (what the cache adds to RSS), counted from the config here. The prefix cache keeps a finished request's
    blocks, so an unrelated prompt writes fresh ones, and the same prompt again reuses them."""
    _, llm = loaded("llama")
    engine = Engine(llm, block_size=4)
    layers = [s for s in engine.config.layers if s.kv_source is None]
    block = sum(2 * s.num_kv_heads * 4 * s.head_dim * 4 for s in layers)  # K and V, 4 positions, float32
    assert engine.stats().kv_bytes_resident == 0
    assert engine.stats().kv_bytes_reserved == engine.stats().kv_blocks_total * block
    a, b = ids(42, seed=70), ids(42, seed=71)  # 42 + 12 generated: 54 positions, 14 blocks of 4
    run(engine, {"a": (a, GREEDY)})
    assert engine.stats().kv_bytes_resident == 14 * block
    # a's 13 full blocks stay cached (53 positions computed: the last token is sampled, never fed); its partial
    # 14th is free, and b takes it before 13 fresh ones
    run(engine, {"b": (b, GREEDY)})
    assert engine.stats().kv_bytes_resident == 27 * block and engine.stats().kv_blocks_used == 0
    first = engine.stats().prefix_hit_tokens
    # a again: its 10 full prompt blocks are found; blocks 10-13 are written anew, into b's freed partial block
    # and 3 fresh ones
    run(engine, {"a2": (a, GREEDY)})
    assert engine.stats().prefix_hit_tokens - first == 40
    assert engine.stats().kv_bytes_resident == 30 * block
