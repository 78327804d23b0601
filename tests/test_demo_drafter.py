"""The demo model's trained MTP drafter (src/hearthlm/demo/hearth-demo-assistant): it loads and fits the demo,
`draft="auto"` / `--draft auto` pick it, greedy output with it is the output without it, and `hearth bench
--draft` reports both. Store models: `auto` finds a pulled <model>-assistant and skips an unfinished pull."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from hearthlm import LLM, SamplingParams, bench
from hearthlm.engine.mtp import MTPDrafter, check_pair, find_assistant
from hearthlm.models.gemma4_assistant import load_assistant
from hearthlm.store import DEMO_DIR

DEMO = DEMO_DIR / "hearth-demo"
ASSISTANT = DEMO_DIR / "hearth-demo-assistant"
PROMPTS = [
    "And the LORD said unto Moses,",
    "The for statement in Python",
    "<|turn>user\nTell me a fortune.<turn|>\n<|turn>model\n",
]


@pytest.fixture(scope="module")
def demo():
    return LLM(None, dtype="float32")


def test_the_shipped_drafter_loads_and_fits_the_demo(demo):
    drafter = load_assistant(ASSISTANT, demo.dtype, demo.device)
    check_pair(drafter, demo.model, str(ASSISTANT))
    assert sum(p.numel() for p in drafter.parameters()) < 1.5e6
    assert sum(f.stat().st_size for f in ASSISTANT.iterdir()) < 4e6
    assert find_assistant(DEMO) == ASSISTANT


def test_auto_picks_it(demo, caplog):
    with caplog.at_level(logging.WARNING, logger="hearthlm.engine"):
        llm = LLM(None, dtype="float32", draft="auto")
    assert isinstance(llm.draft, MTPDrafter) and "prompt lookup" not in caplog.text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_with_the_drafter_is_greedy_without(demo, dtype):
    llm = demo if dtype == "float32" else LLM(None, dtype=dtype)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    llm.engine(draft=None)
    plain = [c.token_ids for c in llm.generate(ids, params)]
    engine = llm.engine(draft="auto")
    assert [c.token_ids for c in llm.generate(ids, params)] == plain  # batched
    assert llm.generate([ids[0]], params)[0].token_ids == plain[0]  # alone
    s = engine.stats()
    assert s.drafted_tokens > 0 and s.accepted_tokens / s.drafted_tokens > 0.3  # it was trained: it guesses well


def test_cli_run_draft_auto_gives_the_same_text(demo):
    prompt = "And the LORD said unto Moses,"
    expected = demo.generate(prompt, SamplingParams(max_tokens=32, temperature=0))[0].text
    args = ["run", "--raw", "--draft", "auto", "--dtype", "float32", "--temperature", "0", "--max-tokens", "32"]
    result = subprocess.run([sys.executable, "-m", "hearthlm.cli", *args, prompt], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and "prompt lookup" not in result.stderr


def test_running_the_drafter_alone_says_what_it_is():
    with pytest.raises(ValueError, match="a speculative-decoding drafter.*--draft"):
        LLM("hearth-demo-assistant")


def test_auto_finds_a_pulled_drafter_and_skips_an_unfinished_one(tmp_path, caplog):
    target = shutil.copytree(DEMO, tmp_path / "google--gemma-4-tiny-it")
    assert find_assistant(target) is None
    pulled = shutil.copytree(ASSISTANT, tmp_path / "google--gemma-4-tiny-it-assistant")
    meta = {"repo_id": "google/gemma-4-tiny-it-assistant", "complete": True}
    (pulled / "hearth.json").write_text(json.dumps(meta))
    assert find_assistant(target) == pulled
    assert isinstance(LLM(target, dtype="float32", draft="auto").draft, MTPDrafter)
    (pulled / "hearth.json").write_text(json.dumps(meta | {"complete": False}))
    with caplog.at_level(logging.WARNING, logger="hearthlm.engine"):
        assert find_assistant(target) is None
    assert "hearth pull google/gemma-4-tiny-it-assistant" in caplog.text


def test_bench_draft_rows_and_table():
    result = bench.bench(None, ["float32"], prompt_len=16, gen_len=16, runs=1, draft="auto")
    off, on = result.rows
    assert (off.draft, on.draft) == (None, "auto") and off.acceptance is None
    assert 0 < on.acceptance <= 1 and on.generated_tokens == off.generated_tokens == 16
    assert result.settings["draft"] == "auto"
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(bench.table(result))
    text = console.export_text()
    assert "ACCEPTED" in text and "DECODE VS OFF" in text and "draft auto" in text
    with pytest.raises(ValueError, match="unknown draft 'eagle'"):
        bench.bench(None, ["float32"], prompt_len=16, gen_len=8, runs=1, draft="eagle")
