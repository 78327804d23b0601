"""`hearth run` end to end on a tiny checkpoint with a word-level tokenizer."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from checkpoints import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers

from hearthlm import LLM, SamplingParams


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory):
    _, src = checkpoint("gemma4_all")
    dst = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(src, dst)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return dst


def hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearthlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_streams_the_same_text_as_the_api(folder):
    prompt = "w5 w17 w33 w8"
    expected = LLM(folder).generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0].text
    result = hearth("run", str(folder), prompt, "--temperature", "0", "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "time to first token" in result.stderr


def test_run_reports_bad_input_without_a_traceback(folder, tmp_path):
    result = hearth("run", str(tmp_path / "missing"), "hi")
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a local checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = hearth("run", str(folder), "hi", "--top-p", "0")
    assert result.returncode == 2 and "top_p" in result.stderr
