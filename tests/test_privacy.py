"""Routing privacy (issue 23): the audit's pieces on small inputs, and what each mitigation switch changes.

No timed assertions: what the timing attackers see is checked through the page cache itself (mincore), the
pool's counters and the feature rows; the measured accuracies live in docs/privacy.md."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hearthlm import LLM
from hearthlm.cli import main
from hearthlm.moe import MoEStats, private
from hearthlm.moe.noise import RouterNoise
from hearthlm.privacy import cross_validate, parse_mitigations, probe, topics, wilson
from hearthlm.privacy.curve import quality, routing_rows
from hearthlm.privacy.observers import Worker, a1_features, a2_features, a4_features, proc_counters
from hearthlm.privacy.victim import RoutingRecorder
from hearthlm.store import resolve

DEMO = resolve("hearth-demo-moe")


@pytest.fixture
def demo_copy():
    """A copy of the demo MoE of our own (no other test's reads disturb its page cache), in a folder that the
    A1 process, user nobody, can reach (pytest's tmp_path is the owner's only)."""
    root = Path(tempfile.mkdtemp(prefix="hearth-privacy-test-", dir="/var/tmp"))
    dst = root / "moe"
    shutil.copytree(DEMO, dst)
    os.sync()  # dirty pages cannot be dropped: written back first
    for path in (root, dst, *dst.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield dst
    shutil.rmtree(root)


def expert_pages(folder) -> list[int]:
    """Probe offsets of every expert of the checkpoint, as A1 would pick them."""
    ranges = probe.expert_ranges(str(folder / "model.safetensors"))
    return [off for r in ranges.values() for off in probe.probe_offsets(r)]


def drop_all(folder) -> None:
    probe.drop_path(folder / "model.safetensors")


# -- the classifier ---------------------------------------------------------------------------------------
def test_classifier_recovers_a_planted_signal():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.normal(size=(90, 20))
    x[np.arange(90), y] += 3.0  # class c raises feature c: three informative features among noise
    score = cross_validate(x, y)
    assert score.accuracy > 0.8 and score.ci[0] > score.chance


def test_classifier_reports_chance_on_noise():
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    score = cross_validate(rng.normal(size=(90, 20)), y)
    assert score.at_chance, score


def test_classifier_refuses_too_few_samples():
    with pytest.raises(ValueError, match="at least two per class"):
        cross_validate(np.zeros((3, 2)), np.array([0, 1, 2]))


def test_wilson_interval():
    lo, hi = wilson(45, 90)
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


# -- topics and options -------------------------------------------------------------------------------------
def test_default_topics_are_interleaved():
    names, prompts = topics.load()
    assert names == ["fortunes", "kjv", "pydocs"]
    assert [p.label for p in prompts[:6]] == [0, 1, 2, 0, 1, 2]
    assert len(prompts) >= 90


def test_topic_file_errors(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"topics": {"only": ["a", "b"]}}))
    with pytest.raises(ValueError, match="at least two topics"):
        topics.load(bad)
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="not a topic file"):
        topics.load(bad)


def test_parse_mitigations():
    assert parse_mitigations("private_reads,fixed-shape,noise=2") == {
        "private_reads": True,
        "fixed_shape": True,
        "noise": 2.0,
    }
    assert parse_mitigations(None) == {}
    assert parse_mitigations("defaults") == {"defaults": True}
    with pytest.raises(ValueError, match="unknown mitigation"):
        parse_mitigations("magic")
    with pytest.raises(ValueError, match="needs a scale"):
        parse_mitigations("noise")


# -- what each observer records ---------------------------------------------------------------------------
def test_expert_ranges_match_the_file():
    ranges = probe.expert_ranges(str(DEMO / "model.safetensors"))
    assert len(ranges) == 6 * 8 and all(len(r) == 2 for r in ranges.values())  # gate_up and down slices
    spans = sorted(s for r in ranges.values() for s in r)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    for r in ranges.values():
        offsets = probe.probe_offsets(r)
        assert len(offsets) == 8 and all(off % probe.PAGE == 0 for off in offsets)
        assert all(any(s <= off and off + probe.PAGE <= e for s, e in r) for off in offsets)  # whole pages inside


def test_a1_probe_process_drops_and_times(demo_copy):
    path = demo_copy / "model.safetensors"
    pages = expert_pages(demo_copy)
    path.read_bytes()  # everything cached
    assert all(probe.resident(str(path), pages))
    worker = Worker("hearthlm.privacy.probe", str(path), True, probe.__file__)
    try:
        assert worker.ask({"op": "drop"}) == {"ok": True}
        assert not any(probe.resident(str(path), pages))  # a reader emptied the page cache of the file
        reply = worker.ask({"op": "probe"})
    finally:
        worker.close()
    assert len(reply["ns"]) == 48 and all(len(t) == 8 and min(t) > 0 for t in reply["ns"])
    assert a1_features(reply).shape == (48,)


def test_a1_learns_nothing_from_an_owner_only_checkpoint(demo_copy):
    """The default for pulled models (0600 in a 0700 folder): the A1 process, user nobody, cannot open the file,
    so it can neither drop its pages nor time them. (Not root: the file is made unreadable to its owner too.)"""
    path = demo_copy / "model.safetensors"
    pages = expert_pages(demo_copy)
    os.chmod(demo_copy, 0o700)
    os.chmod(path, 0o600 if os.geteuid() == 0 else 0)
    fd = os.open(path, os.O_RDONLY) if os.geteuid() == 0 else None
    worker = Worker("hearthlm.privacy.probe", str(path), True, probe.__file__)
    try:
        if fd is not None:
            os.pread(fd, path.stat().st_size, 0)  # the owner's run cached every page
        assert "denied" in worker.ask({"op": "drop"})
        if fd is not None:
            assert all(probe.resident(str(path), pages))  # the drop did nothing
        reply = worker.ask({"op": "probe"})
    finally:
        worker.close()
        if fd is not None:
            os.close(fd)
        os.chmod(path, 0o644)
    assert "Permission denied" in reply["denied"] and "ns" not in reply
    assert a1_features(reply).tolist() == [0.0]  # the same observation whatever the victim asked


def test_routing_recorder_and_a4_features():
    llm = LLM(DEMO)
    recorder = RoutingRecorder(llm.model)
    llm.logits([2, 10, 20, 30, 40])
    routing = recorder.close()
    assert len(routing) == 6 and all(sum(r) == 5 * 2 for r in routing)  # top-2 of 8 per token, per layer
    features = a4_features(routing).reshape(6, 8)
    assert np.allclose(features.sum(1), 1.0)


def test_a2_counters_of_a_process():
    before = proc_counters(os.getpid())
    (DEMO / "config.json").read_text()
    after = proc_counters(os.getpid())
    assert after[1] > before[1] and after[2] > before[2]  # rchar and read calls grew
    assert a2_features(before, after, 0.1).shape == (5,)


def test_routing_tells_the_demo_topics_apart():
    """A4 on the demo MoE, unprotected: the upper bound is far above chance (docs/privacy.md has the figures)."""
    llm = LLM(DEMO)
    _, prompts = topics.load(per_topic=12)
    score = cross_validate(routing_rows(llm, prompts), np.array([p.label for p in prompts]))
    assert score.ci[0] > score.chance, score


# -- mitigations change what the observers see, not the outputs ---------------------------------------------
def test_private_reads_leave_no_expert_page_cached(demo_copy):
    path, pages = str(demo_copy / "model.safetensors"), expert_pages(demo_copy)
    drop_all(demo_copy)
    llm = LLM(demo_copy, expert_budget="25%", moe_profile=False)
    plain = llm.logits([2, 10, 20, 30, 40, 50, 60, 70])
    assert sum(probe.resident(path, pages)) > len(pages) // 4  # what A1 reads: the pages of used experts
    private.private_reads(llm.model.expert_pool)
    assert not any(probe.resident(path, pages))  # enabling drops what the load and the run left
    assert torch.equal(llm.logits([2, 10, 20, 30, 40, 50, 60, 70]), plain)
    assert not any(probe.resident(path, pages))
    private.private_reads(llm.model.expert_pool, on=False)
    assert torch.equal(llm.logits([2, 10, 20, 30, 40, 50, 60, 70]), plain)


def test_fixed_shape_reads_the_same_count_every_step():
    llm = LLM(DEMO, expert_budget="25%", moe_profile=False)
    pool = llm.model.expert_pool
    plain = [llm.logits([t]) for t in (5, 500, 3000)]
    private.fixed_shape(pool, seed=0)
    pool.reset_stats()
    fixed = [llm.logits([t]) for t in (5, 500, 3000)]
    s = pool.snapshot()
    assert s.decoys > 0 and s.misses + s.decoys == 3 * 6 * 2  # top_k reads per layer step, whatever hit
    assert s.bytes_fetched == 3 * 6 * 2 * s.expert_bytes
    assert all(torch.equal(a, b) for a, b in zip(plain, fixed))


def test_clear_empties_the_pool_and_keeps_outputs():
    llm = LLM(DEMO, expert_budget="50%", moe_profile=False)
    first = llm.logits([2, 10, 20, 30])
    pool = llm.model.expert_pool
    assert pool.where
    private.clear(pool)
    assert not pool.where and (pool.slot_row == -1).all()
    assert sum(pool.snapshot().resident.values()) == 0
    assert torch.equal(llm.logits([2, 10, 20, 30]), first)


def test_router_noise_changes_outputs_only_when_on():
    llm = LLM(DEMO)
    ids = [2, 10, 20, 30, 40, 50]
    clean = llm.logits(ids)
    noise = RouterNoise(llm.model, 0.0)
    assert torch.equal(llm.logits(ids), clean)
    noise.close()
    noise = RouterNoise(llm.model, 4.0, seed=0)
    noisy = llm.logits(ids)
    noise.close()
    assert not torch.equal(noisy, clean)
    assert torch.equal(llm.logits(ids), clean)  # closed: the model as it was
    kl, top1, ppl, ppl_clean = quality(clean, noisy, ids)
    assert kl > 0 and 0 <= top1 <= 1 and ppl > 0 and ppl_clean > 0
    with pytest.raises(ValueError, match=">= 0"):
        RouterNoise(llm.model, -1.0)


def test_moe_stats_hold_no_per_request_expert_ids():
    """/metrics and --moe-stats export MoEStats: aggregate counters only (resident: a count per layer)."""
    names = {f.name for f in dataclasses.fields(MoEStats)}
    assert names == {
        "hits", "misses", "transient", "bytes_fetched", "fetch_seconds", "prefetches", "prefetch_used",
        "prefetch_bytes", "decoys", "tokens", "slots", "expert_bytes", "resident",
    }  # fmt: skip
    llm = LLM(DEMO, expert_budget="25%", moe_profile=False)
    llm.logits([2, 10, 20])
    assert all(isinstance(v, int) for v in llm.moe_stats().resident.values())


# -- end to end -----------------------------------------------------------------------------------------------
def test_cli_audit_runs_end_to_end(capsys):
    assert main(["privacy-audit", "--attackers", "A2,A4", "--per-topic", "2", "--max-tokens", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["attacker"] for r in rows] == ["A2", "A4"]
    assert all(r["n"] == 6 and r["chance"] == pytest.approx(1 / 3) for r in rows)


def test_defaults_mean_the_cli_defaults():
    from hearthlm.moe.options import PrivacyOptions
    from hearthlm.privacy.victim import privacy_options

    assert privacy_options({}) is None and privacy_options({"private_reads": True}) is None
    assert privacy_options({"defaults": True}) == PrivacyOptions("auto", fixed_shape=False)
    assert privacy_options({"defaults": True, "fixed_shape": True}) == PrivacyOptions("auto", fixed_shape=True)


def test_audit_of_the_defaults_on_an_owner_only_copy(demo_copy):
    """The audit's "defaults" row on a checkpoint stored as `hearth pull` stores it: A1 is refused the file, and
    with --evict every request's load reads its dense weights from disk again (the counters A2 reads show it)."""
    from hearthlm.privacy.audit import observe_processes

    os.chmod(demo_copy, 0o700)
    os.chmod(demo_copy / "model.safetensors", 0o600 if os.geteuid() == 0 else 0o000)
    prompts = topics.load(per_topic=2)[1][:3]
    try:
        if os.geteuid() != 0:  # the victim is this user: let it read, the prober (also this user) then can too
            pytest.skip("needs root: the victim must read the file while user nobody may not")
        obs = observe_processes(demo_copy, prompts, "25%", {"defaults": True}, 1, {"A1", "A2", "A4"}, evict=True)
    finally:
        os.chmod(demo_copy / "model.safetensors", 0o644)
    assert all(row.tolist() == [0.0] for row in obs.rows["A1"])
    assert all(row[0] > np.log1p(1e6) for row in obs.rows["A2"])  # > 1 MB read from disk per request
    assert len(obs.labels) == 3
