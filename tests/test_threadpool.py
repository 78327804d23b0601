"""hearthlm's thread pool for its CPU kernels (kernels/threadpool.cpp), through its test hook pool_check: every chunk
runs exactly once, job after job, at 1 to 4 threads; nested jobs run inline; a chunk's exception reaches the caller;
the kernels give the same bits at every thread count; a forked child gets a pool of its own; PyTorch's OpenMP
threads get a short spin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hearthlm.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs a CPU with AVX2/FMA/F16C and a compiler")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_every_chunk_runs_once(threads, count, n):
    torch.set_num_threads(count)
    runs, used, _ = cpu._load().pool_check(n, 200, 0.0, False, -1)
    assert runs.shape == (200, n) and bool((runs == 1).all())
    assert 1 <= used <= count


def test_the_workers_take_chunks(threads):
    # Chunks long enough (20 us) that a worker wakes up during the 300 jobs (100 ms), even on a loaded machine.
    torch.set_num_threads(2)
    runs, used, _ = cpu._load().pool_check(16, 300, 20.0, False, -1)
    assert bool((runs == 1).all()) and used == 2


@pytest.mark.parametrize("count", [1, 3])
def test_nested_jobs_run_inline(threads, count):
    torch.set_num_threads(count)
    runs, _, nested_inline = cpu._load().pool_check(9, 20, 1.0, True, -1)
    assert bool((runs == 1).all()) and nested_inline


@pytest.mark.parametrize("count", [1, 2, 4])
def test_an_exception_in_a_chunk_reaches_the_caller(threads, count):
    torch.set_num_threads(count)
    with pytest.raises(RuntimeError, match="pool_check: chunk 5 throws"):
        cpu._load().pool_check(12, 3, 1.0, False, 5)
    runs, _, _ = cpu._load().pool_check(12, 3, 1.0, False, -1)  # the pool still works
    assert bool((runs == 1).all())


def test_kernels_give_the_same_bits_at_every_thread_count(threads):
    # Each output row is one piece's work, so where the pieces split never changes a result.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 896, generator=g), torch.randn(4864, 896, generator=g).to(torch.bfloat16)
    q = torch.randint(-128, 128, (1000, 640), generator=g, dtype=torch.int16).to(torch.int8)
    s = (torch.randn(1000, 640 // 32, generator=g) * 0.02).half()
    xq = torch.randn(5, 640, generator=g)
    qa, k, v = torch.randn(4, 14, 64, generator=g), torch.randn(4, 2, 77, 64, generator=g), torch.randn(4, 2, 77, 64)
    outs = []
    for count in (1, 2, 3, 4):
        torch.set_num_threads(count)
        outs.append(
            (cpu.gemv(x, w), cpu.quant_gemv(xq, q, s, None, 8, 32), cpu.decode_attention(qa, k, v, None, 0.125))
        )
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_a_forked_child_gets_its_own_pool(threads):
    code = """
import os, torch
from hearthlm.kernels import cpu
torch.set_num_threads(2)
cpu._load().pool_check(8, 10, 1.0, False, -1)  # the parent's pool has its worker
pid = os.fork()
if pid == 0:
    runs, used, _ = cpu._load().pool_check(8, 300, 20.0, False, -1)
    os._exit(0 if bool((runs == 1).all()) and used == 2 else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr  # and the parent exits with its workers asleep, without a hang
    assert out.stdout.strip() == "0"


def test_pytorchs_threads_spin_briefly_unless_the_user_says_otherwise():
    # hearthlm sets GOMP_SPINCOUNT before torch loads, so libgomp's idle threads free their core within ~0.3 ms.
    code = "import hearthlm, os, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"
