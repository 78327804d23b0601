"""benchmarks/quality.py and benchmarks/contention.py: their arguments, their arithmetic on made-up figures, a tiny
quality run on the demo model, the busy processes that contention starts and kills, and llama.cpp loaded the way
contention loads it on CPUs with AMX. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hearthlm.bench.results import Quality

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # they import each other (decode.py) as scripts do
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return _script("quality")


@pytest.fixture(scope="module")
def contention():
    return _script("contention")


# -- quality.py ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--paths", "fast"], "unknown fast"),
        (["--gguf", "Q3_X"], "unknown Q3_X"),
        (["--files", "Q4_0,IQ9"], "unknown IQ9"),
        (["--llama-cpp"], "--llama-cpp runs the --files files"),
        (["demo", "--random", "llama3.2-1b"], "MODEL or --random"),
        (["--tokens", "1"], "--tokens >= 2"),
    ],
)
def test_quality_refuses_bad_arguments(quality, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        quality.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_quality_kernel_path_sets_and_restores_the_isa(quality, monkeypatch):
    from hearthlm.kernels import cpu

    monkeypatch.setenv("HEARTHLM_ISA", "avx2")
    cpu.isa.cache_clear()
    with quality.kernel_path("exact"):  # no integer GEMM: the dequantized tiles
        assert os.environ["HEARTHLM_ISA"] == "torch" and cpu.isa() == "torch"
    assert os.environ["HEARTHLM_ISA"] == "avx2" and cpu.isa() == "avx2"
    monkeypatch.delenv("HEARTHLM_ISA")
    cpu.isa.cache_clear()


def test_quality_table_adds_the_gemm_cost_next_to_the_format(quality):
    def q(kl: float) -> Quality:
        return Quality(8, kl, 2 * kl, 0.9, 10.0, 10.5)

    added = quality.added("gemm")
    results = {"int4": {"exact": q(0.02), "gemm": q(0.021), added: q(0.001)}}
    table = quality.report("t", results, ["exact", "gemm"])
    cells = {c.header: c._cells[0] for c in table.columns}
    assert cells[f"KL {added}"] == "1.00e-03" and cells["gemm / format"] == "0.05"
    assert cells["exact: KL mean (max) top-1 ppl"] == "2.00e-02 (4.0e-02) 90.0% 10.50"
    assert "amx / format" not in cells


def test_quality_runs_each_path_on_the_demo_model(quality, monkeypatch, capsys):
    paths = [p for p in quality.PATHS if quality.missing_path(p) is None]
    argv = ["quality.py", "--tokens", "16", "--formats", "int8", "--gguf", "", "--dtypes", "bfloat16"]
    monkeypatch.setattr(sys, "argv", [*argv, "--paths", ",".join(paths)])
    quality.main()
    out = capsys.readouterr().out
    assert "16 held-out tokens" in out and "int8" in out and "bfloat16" in out
    assert all(f"{p}: KL mean" in out for p in paths)
    assert all((quality.added(g) in out) == (g in paths and "exact" in paths) for g in quality.GEMMS)


# -- contention.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--busy", "0,x"], "comma-separated counts"),
        (["--busy=-1,0"], "counts >= 0"),
        (["--rounds", "0"], "--rounds >= 1"),
        (["--gguf", "Q9_9"], "invalid choice"),
        (["--model", "gpt-5"], "invalid choice"),
    ],
)
def test_contention_refuses_bad_arguments(contention, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        contention.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_contention_defaults(contention):
    args = contention.parse_args([])
    assert (args.model, args.gguf, args.busy, args.prompt_len, args.rounds) == (
        "qwen2.5-0.5b",
        "Q4_0",
        [0, 1, 2],
        512,
        3,
    )
    assert contention.parse_args(["--busy", "2,0,2"]).busy == [0, 2]


def test_contention_slowdown_is_against_the_engines_own_idle_figure(contention):
    S = contention.Sample
    samples = [
        S("hearthlm", 0, 0, 100.0, 20.0, 0.0), S("hearthlm", 0, 1, 120.0, 22.0, 0.0),
        S("hearthlm", 2, 0, 40.0, 10.0, 1.0), S("hearthlm", 2, 1, 60.0, 12.0, 1.0),
        S("llama.cpp", 0, 0, 80.0, 16.0, 0.0), S("llama.cpp", 0, 1, 80.0, 16.0, 0.0),
        S("llama.cpp", 2, 0, 40.0, 4.0, 1.0), S("llama.cpp", 2, 1, 40.0, 4.0, 1.0),
    ]  # fmt: skip
    result = contention.summary(samples, [0, 2])
    ours = result["hearthlm"]
    assert ours[0]["prefill"] == 110.0 and ours[2]["prefill"] == 50.0 and ours[2]["prefill_slowdown"] == 2.2
    assert ours[0]["prefill_slowdown"] == 1.0 and ours[2]["decode_slowdown"] == 21.0 / 11.0
    assert result["llama.cpp"][2]["decode_slowdown"] == 4.0
    prefill, decode = contention.verdict(result)
    assert "hearthlm slows 2.20x, MORE than llama.cpp's 2.00x" in prefill
    assert "hearthlm slows 1.91x, no more than llama.cpp's 4.00x" in decode and "(at 0 busy: 1.31x)" in decode


def test_busy_processes_spin_and_are_killed(contention):
    with contention.busy(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)


def test_llama_cpp_loads_without_amx_and_repacks_q4_0(tmp_path):
    """decode.py's llama.cpp loader (ctypes into ggml) in a child process, as a wrong signature would crash it:
    a Q4_0 file runs, with its block matrices in llama.cpp's CPU_REPACK buffer and none in AMX."""
    pytest.importorskip("llama_cpp")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(BENCHMARKS)!r}, {str(Path(__file__).parent)!r}]
        import gguf, torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from gguf_files import demo_vocab, write_gguf
        import decode, llama_cpp
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
        tensors = ((n, t.detach().float().numpy()) for n, t in model.state_dict().items())
        path = write_gguf({str(tmp_path / "tiny-Q4_0.gguf")!r}, "Qwen2ForCausalLM", cfg.to_dict(), tensors,
                          gguf.GGMLQuantizationType.Q4_0, demo_vocab(4096))
        with decode.llama_cpp_without_amx(path):
            llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=True)
        llm.eval(list(range(300, 316)))
        print("evaluated", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "evaluated" in run.stdout, run.stderr[-2000:]
    assert "CPU_REPACK model buffer size" in run.stderr and "AMX model buffer" not in run.stderr


def test_quality_of_logits_needs_matching_shapes():
    import torch

    from hearthlm.bench.results import quality

    with pytest.raises(ValueError, match="two \\[T, vocab\\] logits"):
        quality(torch.zeros(4, 8), torch.zeros(4, 9), [1, 2, 3, 4])
    q = quality(torch.zeros(4, 8), torch.zeros(4, 8), [1, 2, 3, 4])
    assert q.kl_mean == 0 and q.top1_agreement == 1 and q.ppl_candidate == pytest.approx(8)


# -- prefill_share.py ------------------------------------------------------------------------------------------


def _prefill_share(*argv: str) -> subprocess.CompletedProcess:
    script = str(BENCHMARKS / "prefill_share.py")
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=300)


def test_prefill_share_splits_a_prefill_into_its_gemms_and_the_rest():
    from hearthlm.kernels import cpu

    run = _prefill_share("hearth-demo", "--prompt-len", "48", "--rounds", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    rounds = next(line for line in lines if line.startswith("hearthlm tok/s by round: "))
    assert len(rounds.split(": ")[1].split(", ")) == 2
    rows = [line.split() for line in lines if line.split()[:1] in (["half_gemm"], ["bf16_gemm"], ["rest"])]
    assert rows[-1][0] == "rest"
    if cpu.half_gemm_available() or cpu.bf16_gemm_available():
        # the demo's fused qkv (4 query heads of 64, one K and one V head), in its 4 layers that are not KV-shared
        assert ["384", "x", "256", "4"] in [row[1:5] for row in rows[:-1]], run.stdout


def test_prefill_share_refuses_llama_cpp_without_a_gguf_file():
    run = _prefill_share("hearth-demo", "--llama-cpp")
    assert run.returncode == 2 and "give a .gguf file as MODEL" in run.stderr
