"""Budgeted expert residency (moe/): logits equal full residency at every budget, for every MoE family, the
demo MoE model and quantized experts; budget parsing and the too-small error; the policy against LRU; the
counters; the experts staying in the checkpoint; the CLI and the profile."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from checkpoints import VOCAB

from hearthlm import LLM
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens
from hearthlm.layers.moe import Experts
from hearthlm.moe import Budget, BudgetError, parse_budget
from hearthlm.moe.policy import LRU, NextUse
from hearthlm.moe.pool import ExpertPool
from hearthlm.moe.tier import HostTier, layout
from hearthlm.quant.tensor import QuantTensor
from hearthlm.weights.export import write_quantized

MOE_FAMILIES = ["gemma4_all", "qwen3_moe", "mixtral"]
DEMO_MOE = "hearth-demo-moe"


def _ids(n: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def _trace(llm: LLM, ids: torch.Tensor, steps: int = 4) -> list[torch.Tensor]:
    """Logits of a prefill of ids [B, T], then of `steps` cached decode steps (fixed tokens)."""
    model, (B, T) = llm.model, ids.shape
    cache = ContiguousKVCache(llm.config.layers, B, T + steps, llm.dtype, llm.device)
    out = [model.logits(forward_tokens(model, cache, ids, torch.zeros(B, dtype=torch.long)))]
    for i in range(steps):
        tok = ids[:, i : i + 1].flip(0)
        h = forward_tokens(model, cache, tok, torch.full((B,), T + i, dtype=torch.long))
        out.append(model.logits(h))
    return out


def _min_bytes(llm: LLM) -> int:
    pool = llm.model.expert_pool
    return llm.config.experts_per_token * pool.expert_bytes


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), f"max |diff| {(x - y).abs().max().item()}"


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_families_equal_full_residency_at_every_budget(checkpoint, name):
    _, folder = checkpoint(name)
    ids = _ids(12, batch=2)
    full = _trace(LLM(folder), ids)
    minimum = _min_bytes(LLM(folder, expert_budget=1.0))
    for budget in (minimum, 0.5, "100%"):  # the minimum: 2 slots, fewer than a batch of 2 routes to
        llm = LLM(folder, expert_budget=budget)
        _assert_same(_trace(llm, ids), full)
        assert (llm.moe_stats().misses > 0) == (budget != "100%")  # room for all: all loaded at load


def test_demo_moe_at_a_quarter_equals_full_residency():
    full, budgeted = LLM(DEMO_MOE), LLM(DEMO_MOE, expert_budget="25%")
    ids = torch.tensor([full.tokenizer.encode("The little fox ran into the forest and found a cave where")])
    _assert_same(_trace(budgeted, ids, steps=8), _trace(full, ids, steps=8))
    stats = budgeted.moe_stats()
    assert stats.slots == 12 and stats.hits > 0  # 25% of 6 layers x 8 experts
    assert 0 < stats.transient < stats.misses  # some misses were not worth a slot: run from the mapped file


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_under_a_budget_equal_the_same_quant_resident(fmt):
    ids = torch.tensor([[5, 99, 300, 17, 2048, 7, 64, 1000]])
    full = _trace(LLM(DEMO_MOE, quant=fmt), ids)
    budgeted = LLM(DEMO_MOE, quant=fmt, expert_budget=0.25)  # quantized on fetch
    assert budgeted.model.expert_pool.storage[0].__class__.__name__ == "QuantTensor"
    _assert_same(_trace(budgeted, ids), full)


def test_quantized_checkpoint_under_a_budget_reads_the_stored_experts(tmp_path):
    """A folder `hearth quantize` wrote is the quantized slow tier on disk: fetches copy its bytes."""
    folder = write_quantized(LLM(DEMO_MOE, quant="int4").model, LLM(DEMO_MOE).path, tmp_path / "q", "int4-g32")
    ids = torch.tensor([[5, 99, 300, 17, 2048, 7]])
    budgeted = LLM(folder, expert_budget="30%")
    tier = budgeted.model.expert_pool.tiers[0]
    if isinstance(tier, HostTier):  # on a GPU: the stored int4 experts, held once in host memory
        assert all(isinstance(w, QuantTensor) and w.bits == 4 for w in tier.stacks)
    else:
        assert tier.spec == [None, None]  # nothing quantized on fetch
    _assert_same(_trace(budgeted, ids), _trace(LLM(folder), ids))


def test_too_small_a_budget_states_the_minimum():
    minimum = _min_bytes(LLM(DEMO_MOE, expert_budget=1.0))
    with pytest.raises(BudgetError) as e:
        LLM(DEMO_MOE, expert_budget=minimum - 1)
    message = str(e.value)
    assert f"at least {minimum} bytes" in message and "% of the" in message and "top-2" in message
    LLM(DEMO_MOE, expert_budget=minimum)  # the minimum itself runs


def test_budget_parsing():
    assert parse_budget("6GB") == Budget(bytes=6 * 10**9)
    assert parse_budget("512MB") == Budget(bytes=512 * 10**6)
    assert parse_budget("2GiB") == Budget(bytes=2 * 2**30)
    assert parse_budget("1.5g") == Budget(bytes=1_500_000_000)
    assert parse_budget("123456") == parse_budget(123456) == Budget(bytes=123456)
    assert parse_budget("25%") == parse_budget("0.25") == parse_budget(0.25) == Budget(fraction=0.25)
    assert parse_budget(1.0).resolve(1000) == 1000 and parse_budget("10%").resolve(1000) == 100
    for bad in ("lots", "6XB", "-1GB", "0", "0%", "150%", "1.5", 0.0, 2.0, True, ""):
        with pytest.raises(BudgetError, match="expert budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="no experts"):
        LLM(None, expert_budget="25%")  # the dense demo model


class _FakeTier:
    def read(self, e):
        return torch.zeros(2, 8), torch.zeros(8, 1)

    def load(self, e, slot):
        pass


def _replay(policy, seed: int = 0) -> ExpertPool:
    """A skewed routing trace (Zipf-like expert popularity per layer, 4 of 32 experts per token, 4 layers)
    through a pool holding a quarter of the experts."""
    layers, experts, k, steps = 4, 32, 4, 600
    g = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, experts + 1).float() ** 1.1
    perms = [torch.randperm(experts, generator=g) for _ in range(layers)]
    pool = ExpertPool({i: _FakeTier() for i in range(layers)}, experts, k, Budget(fraction=0.25), policy, "cpu")
    for _ in range(steps):
        for layer in range(layers):
            picks = torch.multinomial(popularity, k, generator=g)
            active = sorted(perms[layer][picks].tolist())
            list(pool.experts(layer, active, [1] * k))
    return pool


def test_policy_fetches_fewer_bytes_than_lru_on_skewed_routing():
    freq, lru = _replay(NextUse()), _replay(LRU())
    assert freq.stats.bytes_fetched < 0.8 * lru.stats.bytes_fetched, (freq.stats, lru.stats)
    again = _replay(NextUse()).stats
    assert (again.hits, again.bytes_fetched) == (freq.stats.hits, freq.stats.bytes_fetched)  # deterministic


def test_experts_stored_in_different_formats_are_refused_with_the_reason():
    class Wide(_FakeTier):
        def read(self, e):
            return torch.zeros(2, 8, dtype=torch.float16), torch.zeros(8, 1, dtype=torch.float16)

    with pytest.raises(BudgetError, match="MoE layer 1 are stored in another format"):
        ExpertPool({0: _FakeTier(), 1: Wide()}, 8, 2, Budget(fraction=0.5), NextUse(), "cpu")


def _demo_routing(tokens: int = 80) -> list[tuple[int, list[int], list[int]]]:
    """The demo model's real routing, greedy from three prompts: (layer, experts, tokens routed to each)."""
    llm, steps = LLM(DEMO_MOE), []

    def record(layer):
        def hook(module, args):
            counts = torch.bincount(args[1].reshape(-1), minlength=module.num_experts).tolist()
            steps.append((layer, [e for e, c in enumerate(counts) if c], [c for c in counts if c]))

        return hook

    for name, m in llm.model.named_modules():
        if isinstance(m, Experts):
            m.register_forward_pre_hook(record(int(name.split(".")[1])))
    for text in ("The little fox ran into the forest", "My grandmother kept a garden", "The ship sailed north"):
        ids = llm.tokenizer.encode(text)
        cache = ContiguousKVCache(llm.config.layers, 1, len(ids) + tokens, llm.dtype, llm.device)
        h = forward_tokens(llm.model, cache, torch.tensor([ids]), torch.zeros(1, dtype=torch.long))
        for pos in range(len(ids), len(ids) + tokens - 1):
            tok = llm.model.logits(h[:, -1]).argmax(-1, keepdim=True)
            h = forward_tokens(llm.model, cache, tok, torch.tensor([pos]))
    return steps


def test_policy_fetches_fewer_bytes_than_lru_on_the_demo_routing():
    """Real routing through pools shared by 6 layers: the next-use policy against LRU at 10%, 25% and 50%."""
    steps = _demo_routing()
    for fraction in (0.1, 0.25, 0.5):
        fetched = []
        for policy in (NextUse(), LRU()):
            pool = ExpertPool({i: _FakeTier() for i in range(6)}, 8, 2, Budget(fraction=fraction), policy, "cpu")
            for layer, active, counts in steps:
                list(pool.experts(layer, active, counts))
            fetched.append(pool.stats.bytes_fetched)
        assert fetched[0] < fetched[1], (fraction, fetched)


def test_stats_add_up():
    llm = LLM(DEMO_MOE, expert_budget="25%")
    uses = []
    for m in llm.model.modules():
        if isinstance(m, Experts):
            m.register_forward_pre_hook(lambda mod, args: uses.append(len(torch.unique(args[1]))))
    ids = torch.tensor([[5, 99, 300, 17, 2048, 7, 64, 1000]])
    _trace(llm, ids, steps=5)
    s = llm.moe_stats()
    assert s.hits + s.misses == sum(uses)
    assert s.bytes_fetched == s.misses * s.expert_bytes
    assert s.tokens == 8 + 5
    assert sum(s.resident.values()) == s.slots == 12 and set(s.resident) == set(range(6))
    assert "hit rate" in s.summary(1.0)


def _tensor_bytes(llm: LLM) -> int:
    model = llm.model
    held = [t for t in model.state_dict().values()]
    pool = getattr(model, "expert_pool", None)
    if pool is not None:
        held += [t for w in pool.storage for t in ((w.qdata, w.scales, w.mins) if hasattr(w, "qdata") else (w,))]
    return sum(t.numel() * t.element_size() for t in held if t is not None)


def test_experts_are_not_resident_at_load():
    full, budgeted = LLM(DEMO_MOE, dtype="float32"), LLM(DEMO_MOE, dtype="float32", expert_budget="25%")
    experts = [m for m in budgeted.model.modules() if isinstance(m, Experts)]
    assert experts and all(not hasattr(m, "gate_up") and not hasattr(m, "down") for m in experts)
    expert_bytes = sum(
        m.gate_up.numel() * 4 + m.down.numel() * 4 for m in full.model.modules() if isinstance(m, Experts)
    )
    # Everything the budgeted model holds: the full model less three quarters of the experts.
    assert _tensor_bytes(budgeted) == _tensor_bytes(full) - expert_bytes + expert_bytes // 4


def hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearthlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_with_a_budget_prints_the_same_answer_and_the_stats():
    args = ("run", DEMO_MOE, "Tell me about the sea.", "--temperature", "0", "--max-tokens", "12")
    plain = hearth(*args)
    budgeted = hearth(*args, "--expert-budget", "25%", "--moe-stats")
    assert plain.returncode == 0 and budgeted.returncode == 0, budgeted.stderr
    assert budgeted.stdout == plain.stdout
    assert "hit rate" in budgeted.stderr and "MB fetched per token" in budgeted.stderr
    bad = hearth(*args, "--expert-budget", "lots")
    assert bad.returncode == 2 and "not understood" in bad.stderr


def test_moe_profile_is_written_and_seeds_the_pool(tmp_path):
    folder = tmp_path / "moe"
    shutil.copytree(LLM(DEMO_MOE).path, folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the sea.\nWhat do foxes eat?\n")
    result = hearth("moe-profile", str(folder), "--prompts", str(prompts), "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert (folder / "moe_profile.json").exists()
    seeded = LLM(folder, expert_budget="25%")
    assert sum(seeded.moe_stats().resident.values()) == 12  # filled from the profile at load
    policy = seeded.model.expert_pool.policy
    assert isinstance(policy, NextUse) and policy.uses.sum() > 0
    cold = LLM(folder, expert_budget="25%", moe_profile=False)
    assert sum(cold.moe_stats().resident.values()) == 0
    ids = torch.tensor([[5, 99, 300, 17]])
    _assert_same(_trace(seeded, ids), _trace(cold, ids))


def test_bench_reports_the_expert_pool():
    from hearthlm import bench

    result = bench.bench(["hearth-demo-moe"], prompt_len=8, gen_len=4, runs=1, expert_budget="25%")
    (row,) = result.rows
    assert row.expert_budget == "25%" and set(row.moe) == {"hit_rate", "mb_per_token", "fetch_share"}
    assert row.moe["mb_per_token"] > 0
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(bench.table(result))
    text = console.export_text()
    assert "EXPERT HITS" in text and "experts 25%" in text


@pytest.mark.parametrize("quant", [None, "int8"])
def test_prefetch_and_fetch_thread_keep_logits_and_count_their_bytes(quant):
    """Prefetch (the next layer's router on this layer's input) fetches on a thread; its guesses may be wrong,
    the logits stay those of full residency, and every byte it reads is counted, apart and in the total. Misses
    without a slot run from the mapping (bf16) or are built on the thread into scratch buffers (int8)."""
    from hearthlm.moe import ahead

    ids = torch.tensor([[5, 99, 300, 17, 2048, 7, 64, 1000]])
    full = _trace(LLM(DEMO_MOE, quant=quant), ids, steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8: "experts are quantized on every fetch"
        llm = LLM(DEMO_MOE, expert_budget="25%", quant=quant)
    for t in llm.model.expert_pool.tiers.values():  # on the CPU the float experts run from the mapping itself
        assert isinstance(t, HostTier) if llm.device.type != "cpu" else t.in_place == (quant is None)
    fetching = ahead.enable(llm.model, prefetch=True)
    _assert_same(_trace(llm, ids, steps=8), full)
    fetching.close()
    s = llm.moe_stats()
    assert s.prefetches > 0 and 0 < s.prefetch_used <= s.prefetches
    assert s.prefetch_bytes == s.prefetches * s.expert_bytes
    assert s.bytes_fetched == (s.misses + s.prefetches) * s.expert_bytes
    assert s.transient > 0  # misses not worth a slot
    assert llm.model.expert_pool.executor is None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_gguf_experts_under_a_budget_equal_full_residency(tmp_path, qtype):
    """A qwen3moe GGUF: a fetch reads one expert's slice of the stacked ffn_*_exps tensors and repacks it into
    the format the full load runs (gate and up fused)."""
    import gguf
    import gguf_files
    from checkpoints import build

    path = gguf_files.write(build("qwen3_moe")[0], tmp_path / f"moe-{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
    ids = _ids(12, batch=2)
    full = LLM(path)
    resident = [layout(m.gate_up[0]) for m in full.model.modules() if isinstance(m, Experts)][0]
    reference = _trace(full, ids)
    for budget in (_min_bytes(LLM(path, expert_budget=1.0)), 0.5):
        llm = LLM(path, expert_budget=budget)
        assert layout(llm.model.expert_pool.slots[0][0]) == resident
        _assert_same(_trace(llm, ids), reference)
        assert llm.moe_stats().misses > 0


def test_metrics_carry_the_expert_counters_and_no_expert_ids():
    """`hearth serve --expert-budget`: /metrics exports the pool's aggregate counters, no label naming an expert."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from serving import LiveServer

    from hearthlm.server import load
    from hearthlm.server.app import create_app

    served = load(DEMO_MOE, expert_budget="25%")
    server = LiveServer(create_app(served))
    try:
        body = {"model": DEMO_MOE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    stats = served.llm.moe_stats()
    assert samples["hearth_moe_expert_hits_total"].value + samples["hearth_moe_expert_misses_total"].value > 0
    assert samples["hearth_moe_fetched_bytes_total"].value == stats.bytes_fetched > 0
    assert samples["hearth_moe_expert_slots"].value == stats.slots == 12
    for name in ("hearth_moe_fetch_seconds_total", "hearth_moe_prefetches_total", "hearth_moe_prefetched_bytes_total",
                 "hearth_moe_expert_unslotted_total", "hearth_moe_tokens_total"):  # fmt: skip
        assert name in samples, name
    assert all(not s.labels for name, s in samples.items() if name.startswith("hearth_moe_"))
