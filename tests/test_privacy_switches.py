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
