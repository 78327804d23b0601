"""The routing-privacy switches as users reach them (issue 23): `--private-reads/--fixed-shape/--isolate-clients`
on the CLI and server, LLM(privacy=...), the store's owner-only permissions, per-client pool isolation in the
engine, and what private reads read from disk. docs/privacy.md has the figures; tests/test_privacy.py the audit."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from hearthlm import LLM
from hearthlm.cli import main
from hearthlm.moe import options, profile
from hearthlm.moe.options import PrivacyOptions
from hearthlm.store import private_dir, resolve, write_private

DEMO = resolve("hearth-demo-moe")
IDS = [2, 10, 20, 30, 40, 50, 60, 70]


def _copy(mode: int) -> tuple[Path, Path]:
    """(root, model): a copy of the demo MoE whose folders and files have `mode` (files without x bits)."""
    root = Path(tempfile.mkdtemp(prefix="hearth-switches-", dir="/var/tmp"))
    dst = root / "moe"
    shutil.copytree(DEMO, dst)
    os.sync()  # dirty pages cannot be dropped: written back first
    for path in (root, dst, *dst.iterdir()):
        os.chmod(path, mode if path.is_dir() else mode & 0o666)
    return root, dst


@pytest.fixture
def shared_copy():
    root, dst = _copy(0o755)
    yield dst
    shutil.rmtree(root)


@pytest.fixture
def own_copy():
    root, dst = _copy(0o700)
    yield dst
    shutil.rmtree(root)


def _pool_private(llm) -> bool:
    return all(t.private is not None for t in llm.model.expert_pool.tiers.values())


# -- the options and the auto rule --------------------------------------------------------------------------
def test_readable_by_others_needs_a_read_bit_and_a_way_in(tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    f = outer / "w.safetensors"
    f.write_bytes(b"x")
    os.chmod(f, 0o644)
    for d in (outer, *outer.parents):
        if not os.stat(d).st_mode & (stat.S_IXGRP | stat.S_IXOTH):
            break
    else:
        pytest.skip("no owner-only folder above tmp_path")
    assert not options.readable_by_others(f)  # a 0644 file in an owner-only folder: nobody else gets there
    root, dst = _copy(0o755)
    try:
        assert options.readable_by_others(dst / "model.safetensors")
        os.chmod(dst / "model.safetensors", 0o600)
        assert not options.readable_by_others(dst / "model.safetensors")
    finally:
        shutil.rmtree(root)


def test_options_refuse_bad_modes_and_switches_without_a_budget():
    with pytest.raises(ValueError, match="auto, on, off"):
        PrivacyOptions("maybe")
    options.check(PrivacyOptions(), None)  # the defaults ask for nothing
    with pytest.raises(ValueError, match="--fixed-shape.*only under an expert budget: add --expert-budget"):
        options.check(PrivacyOptions(fixed_shape=True), None)
    with pytest.raises(ValueError, match="--private-reads on"):
        LLM(DEMO, privacy=PrivacyOptions("on"))


def test_auto_turns_private_reads_on_for_a_shared_checkpoint(shared_copy):
    plain = LLM(shared_copy, expert_budget="25%", moe_profile=False)  # privacy=None: nothing applied
    assert plain.privacy_note is None and not _pool_private(plain)
    want = plain.logits(IDS)
    llm = LLM(shared_copy, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions())
    assert _pool_private(llm) and "private reads on (model.safetensors is readable by other users)" in llm.privacy_note
    assert torch.equal(llm.logits(IDS), want)


def test_auto_keeps_the_page_cache_for_an_owner_only_checkpoint(own_copy):
    llm = LLM(own_copy, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions())
    assert not _pool_private(llm) and "private reads off (only its owner can read" in llm.privacy_note


def test_off_on_a_shared_checkpoint_warns(shared_copy):
    with pytest.warns(UserWarning, match="readable by other users and private reads are off.*chmod -R go-rwx"):
        LLM(shared_copy, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions("off"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLM(shared_copy, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions())  # auto: no warning


# -- the CLI flags ------------------------------------------------------------------------------------------
def _run(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["run", str(DEMO), "And it came to pass", "--max-tokens", "12", "--temperature", "0", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_switches_keep_the_output_and_say_what_was_chosen(capsys):
    code, want, err = _run(capsys, "--expert-budget", "25%", "--private-reads", "off")
    assert code == 0 and "private reads off (asked)" in err
    for flags in (("--private-reads", "on"), ("--fixed-shape",), ("--private-reads", "on", "--fixed-shape")):
        code, out, err = _run(capsys, "--expert-budget", "25%", *flags)
        assert code == 0 and out == want, flags
        assert "routing privacy: private reads" in err
        assert ("fixed-shape fetching" in err) == ("--fixed-shape" in flags)
    code, out, err = _run(capsys)  # no budget, no switch: no privacy line
    assert code == 0 and "routing privacy" not in err


def test_cli_switches_without_a_budget_are_refused(capsys):
    code, _, err = _run(capsys, "--fixed-shape")
    assert code == 2 and "--fixed-shape" in err and "add --expert-budget" in err
    with pytest.raises(SystemExit):
        main(["run", str(DEMO), "hi", "--private-reads", "sometimes"])
    with pytest.raises(SystemExit):  # a server's switch
        main(["run", str(DEMO), "hi", "--isolate-clients"])


def test_serve_parses_the_switches(monkeypatch):
    from hearthlm import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.update(kw))
    assert main(["serve", "--expert-budget", "25%", "--isolate-clients", "--private-reads", "on"]) == 0
    assert seen["privacy"] == PrivacyOptions("on", False, True) and seen["expert_budget"] == "25%"
    seen.clear()
    assert main(["serve", "--isolate-clients"]) == 2 and not seen  # refused before the server starts


# -- owner-only files -------------------------------------------------------------------------------------
def test_store_folders_and_files_are_created_owner_only(tmp_path):
    folder = private_dir(tmp_path / "home" / "models" / "acme--m")
    for d in (folder, folder.parent, folder.parent.parent):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(tmp_path, 0o755)
    assert stat.S_IMODE(os.stat(private_dir(tmp_path)).st_mode) == 0o755  # an existing folder keeps its mode
    write_private(folder / "hearth.json", "{}")
    assert stat.S_IMODE(os.stat(folder / "hearth.json").st_mode) == 0o600


def test_moe_profile_is_written_owner_only(own_copy):
    path = profile.write(own_copy, {"model": "m", "tokens": 1, "top_k": 2, "layers": {}})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- client isolation (A3) ------------------------------------------------------------------------------------
A_IDS = [2, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # the victim's prompt
B_IDS = [2, 700, 800, 900, 1000]  # the attacker's probe


def _engine(isolate: bool):
    from hearthlm.engine.engine import Engine

    llm = LLM(DEMO, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions(isolate_clients=isolate))
    return Engine(llm, max_running=4)


def _drive(engine, batches: list[list[tuple[str, list[int]]]]) -> dict[str, list[tuple[int, int]]]:
    """Submit each batch of (client, prompt) at once and step until it is done; -> per client, the pool's
    (hits, misses) of each step that ran its sequences. Asserts that no step mixes clients."""
    from hearthlm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    pool, seen = engine.llm.model.expert_pool, {}
    schedule = engine.scheduler.schedule
    for b, batch in enumerate(batches):
        for i, (client, ids) in enumerate(batch):
            engine.add_request(f"{b}-{i}", ids, params, client=client)
        while engine.has_unfinished():
            work = []
            engine.scheduler.schedule = lambda: work.extend(schedule()) or work  # noqa: B023
            before = pool.snapshot()
            engine.step()
            after = pool.snapshot()
            owners = {w.seq.client for w in work}
            assert len(owners) <= 1 or engine.scheduler.on_switch is None, owners
            for c in owners:
                seen.setdefault(c, []).append((after.hits - before.hits, after.misses - before.misses))
    return seen


def test_isolated_clients_see_the_same_pool_whatever_the_other_ran():
    alone = _drive(_engine(True), [[("B", B_IDS)]])["B"]
    after = _drive(_engine(True), [[("A", A_IDS)], [("B", B_IDS)]])["B"]
    together = _drive(_engine(True), [[("A", A_IDS), ("B", B_IDS)]])["B"]  # one batch: run one client at a time
    assert after == alone and together == alone


def test_without_isolation_the_victim_changes_the_probe_hits():
    """The channel the isolation closes: on a shared pool, the probe's hits follow what ran before it."""
    alone = _drive(_engine(False), [[("B", B_IDS)]])["B"]
    after = _drive(_engine(False), [[("A", A_IDS)], [("B", B_IDS)]])["B"]
    assert after != alone


def test_isolation_keeps_outputs_and_needs_a_budget():
    from hearthlm import SamplingParams
    from hearthlm.engine.engine import Engine

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [c.token_ids for c in LLM(DEMO).generate([A_IDS, B_IDS], params)]
    engine = _engine(True)
    for i, (client, ids) in enumerate((("A", A_IDS), ("B", B_IDS))):
        engine.add_request(str(i), ids, params, client=client)
    got: dict[str, list[int]] = {"0": [], "1": []}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.token_ids
    assert [got["0"], got["1"]] == want
    with pytest.raises(ValueError, match="expert budget"):
        Engine(LLM(DEMO), isolate_clients=True)


def test_client_identity_trusts_keys_and_peers_not_forwarding_headers():
    from hearthlm.server import clients

    def scope(headers: dict[bytes, bytes], peer: str = "10.0.0.1"):
        return {"headers": list(headers.items()), "client": (peer, 5000)}

    a, b = scope({b"authorization": b"Bearer k1"}), scope({b"authorization": b"Bearer k2"})
    assert clients.identity(a) != clients.identity(b) and "k1" not in clients.identity(a)
    assert clients.identity(scope({b"x-api-key": b"k1"})) == clients.identity(a)
    assert clients.identity(scope({})) == "addr:10.0.0.1"
    assert clients.identity(scope({b"x-forwarded-for": b"1.2.3.4"})) == "addr:10.0.0.1"


def test_server_passes_each_key_as_a_client_to_the_engine():
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from serving import LiveServer

    from hearthlm.server import load
    from hearthlm.server.app import create_app

    served = load(str(DEMO), expert_budget="25%", privacy=PrivacyOptions(isolate_clients=True))
    engine, asked = served.engine.engine, []
    add = engine.add_request
    engine.add_request = lambda *a, client=None, **kw: asked.append(client) or add(*a, client=client, **kw)
    server = LiveServer(create_app(served, api_key="k1,k2"))
    try:
        body = {"model": served.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for key in ("k1", "k2", "k1", "k3"):
            r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)  # fmt: skip
            assert r.status_code == (401 if key == "k3" else 200), r.text
    finally:
        server.stop()
    assert len(asked) == 3 and asked[0] == asked[2] != asked[1] and all(c.startswith("key:") for c in asked)


# -- private reads: O_DIRECT, or buffered reads and drops ----------------------------------------------------
@pytest.mark.parametrize("direct", [True, False])
def test_private_reads_direct_or_buffered_keep_outputs_and_cache_nothing(shared_copy, monkeypatch, direct):
    from hearthlm.privacy import probe

    path = str(shared_copy / "model.safetensors")
    pages = [off for r in probe.expert_ranges(path).values() for off in probe.probe_offsets(r)]
    monkeypatch.setenv("HEARTHLM_NO_DIRECT", "0" if direct else "1")
    probe.drop_path(path)  # as A1 does before a request (pages that the load maps stay whatever the prompt)
    llm = LLM(shared_copy, expert_budget="25%", moe_profile=False, privacy=PrivacyOptions("on"))
    reads = next(iter(llm.model.expert_pool.tiers.values())).private
    assert reads.direct == direct
    got = [llm.logits(IDS), llm.logits(IDS[::-1])]
    assert not any(probe.resident(path, pages))
    plain = LLM(shared_copy, expert_budget="25%", moe_profile=False)  # after: its mapping would hold pages
    assert torch.equal(got[0], plain.logits(IDS)) and torch.equal(got[1], plain.logits(IDS[::-1]))


# -- read what you need ---------------------------------------------------------------------------------------
def test_a_budgeted_load_reads_the_dense_weights_not_the_experts(shared_copy):
    """/proc/self/io of a fresh process: readahead around the dense tensors no longer pulls in expert pages."""
    import subprocess
    import sys

    from hearthlm.privacy import probe

    path = shared_copy / "model.safetensors"
    experts = sum(b - a for r in probe.expert_ranges(str(path)).values() for a, b in r)
    dense = path.stat().st_size - experts
    probe.drop_path(path)
    code = (
        "import pathlib; from hearthlm import LLM; io = lambda: int(pathlib.Path('/proc/self/io').read_text()"
        ".split('read_bytes:')[1].split()[0]); before = io(); "
        f"LLM({str(shared_copy)!r}, expert_budget='25%', moe_profile=False); print(io() - before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    read = int(done.stdout.split()[-1])
    assert read < dense + 2 * 2**20 and read < (dense + experts) * 0.6, (read, dense, experts)


def test_isolated_clients_find_only_their_own_prefixes():
    """The prefix cache is a cross-client channel too (a hit shortens time to first token and tells one client that
    another sent the same prefix); an isolating engine keys each client's blocks apart."""
    from hearthlm import SamplingParams

    prompt = list(range(100, 100 + 3 * 16 + 5))  # three full blocks and a bit
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def hits(engine, client: str) -> int:
        before = engine.stats().prefix_hit_tokens
        engine.add_request(f"{client}-{before}", prompt, params, client=client)
        while engine.has_unfinished():
            engine.step()
        return engine.stats().prefix_hit_tokens - before

    isolated = _engine(True)
    assert hits(isolated, "A") == 0
    assert hits(isolated, "B") == 0  # the same prompt from another client: its own blocks, computed again
    assert hits(isolated, "A") >= 3 * isolated.block_size  # the client's own prefix still hits
    shared = _engine(False)
    assert hits(shared, "A") == 0 and hits(shared, "B") >= 3 * shared.block_size


def test_metrics_leave_out_the_pool_counters_when_clients_are_isolated():
    """/metrics' expert-pool counters move with every client's routing: under isolation they would be a channel
    around it, so they go; the engine's own series stay."""
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from serving import LiveServer

    from hearthlm.server import load
    from hearthlm.server.app import create_app

    for isolate in (False, True):
        served = load(str(DEMO), expert_budget="25%", privacy=PrivacyOptions(isolate_clients=isolate))
        server = LiveServer(create_app(served))
        try:
            body = {"model": served.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            text = httpx.get(server.url + "/metrics", timeout=60).text
        finally:
            server.stop()
        assert ("hearth_moe_expert_misses_total" in text) is not isolate
        assert "hearth_kv_bytes_resident" in text
