"""Threads: how many the model's compute runs on (kernels/cpu.py set_threads, `--threads`, HEARTHLM_THREADS)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hearthlm.kernels import cpu


# -- threads --------------------------------------------------------------------------------------------------
@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_default_to_the_physical_cores(torch_threads, monkeypatch):
    monkeypatch.delenv("HEARTHLM_THREADS", raising=False)
    cores = cpu.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert cpu.set_threads() == cores == torch.get_num_threads()
    monkeypatch.setenv("HEARTHLM_THREADS", "1")
    assert cpu.set_threads() == 1 == torch.get_num_threads()
    assert cpu.set_threads(2) == 2 == torch.get_num_threads()  # the option wins over the variable


@pytest.mark.parametrize("bad", ["0", "-3", "two", "1.5"])
def test_bad_thread_counts_are_clear_errors(torch_threads, monkeypatch, bad):
    monkeypatch.setenv("HEARTHLM_THREADS", bad)
    with pytest.raises(ValueError, match=f"HEARTHLM_THREADS='{bad}': give a whole number of threads"):
        cpu.set_threads()
    with pytest.raises(ValueError, match="--threads=0"):
        cpu.set_threads(0)


def test_threads_from_the_cli_and_the_environment(torch_threads, capsys):
    from hearthlm.cli import main

    assert main(["run", "--threads", "0", "--max-tokens", "1", "hi"]) == 2
    assert "--threads=0: give a whole number of threads" in capsys.readouterr().err
    assert main(["run", "--threads", "1", "--max-tokens", "1", "--temperature", "0", "hi"]) == 0
    assert torch.get_num_threads() == 1
    env = os.environ | {"HEARTHLM_THREADS": "1"}
    code = "import torch, hearthlm.kernels.cpu; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # the variable holds for the Python API too
