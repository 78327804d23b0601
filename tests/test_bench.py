"""`hearth bench` on the demo model: result rows, JSON, the transformers comparison, clear errors, quality."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from hearthlm import LLM, bench
from hearthlm.cli import main

FAST = ["--prompt-len", "8", "--gen-len", "4", "--runs", "2", "--bandwidth", "20"]  # bandwidth given: no measuring


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["bench", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_rows_and_the_transformers_ratio(capsys):
    rc, out, err = run_cli(capsys, *FAST, "--vs", "transformers", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    rows = {r["engine"]: r for r in doc["rows"]}
    assert set(rows) == {"hearthlm", "transformers"}
    for r in rows.values():
        assert r["model"] == "hearth-demo" and r["dtype"] == "bfloat16" and r["quant"] is None
        assert r["prompt_tokens"] == 8 and r["generated_tokens"] == 4
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
            stat = r[key]
            assert len(stat["samples"]) == 2 and 0 < stat["min"] <= stat["median"] <= stat["max"]
        assert r["peak_memory"] > 0 and r["fit_memory"] > 0 and r["bytes_per_token"] > 0
        assert r["bandwidth_gbps"] == 20 and r["roofline_fraction"] > 0
        assert r["quality"] is None
    (ratio,) = doc["ratios"]
    assert ratio["versus"] == "transformers" and ratio["model"] == "hearth-demo"
    expected = rows["hearthlm"]["decode_tok_s"]["median"] / rows["transformers"]["decode_tok_s"]["median"]
    assert ratio["decode"] == pytest.approx(expected)
    assert ratio["prefill"] > 0 and ratio["ttft"] > 0
    assert doc["settings"]["gen_len"] == 4 and doc["machine"]["bandwidth_gbps"] == 20


def test_quant_surfaces_the_loader_error_cleanly(capsys):
    rc, out, err = run_cli(capsys, "--quant", "int3", "--prompt-len", "4", "--gen-len", "2", "--runs", "1")
    assert rc == 2 and "error:" in err
    assert "hearthlm on hearth-demo" in err and "unknown quantization 'int3'" in err
    assert "Traceback" not in err


def _no_module(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_missing_llama_cpp_gives_a_clear_message(capsys, monkeypatch):
    _no_module(monkeypatch, "llama_cpp")
    rc, _, err = run_cli(capsys, "--vs", "llama.cpp")
    assert rc == 2 and "pip install llama-cpp-python" in err and "Traceback" not in err


def test_llama_cpp_needs_a_gguf(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "llama_cpp" else real(n, *a))
    rc, _, err = run_cli(capsys, "--vs", "llama.cpp")
    assert rc == 2 and ".gguf" in err


def test_missing_transformers_gives_a_clear_message(capsys, monkeypatch):
    _no_module(monkeypatch, "transformers")
    rc, _, err = run_cli(capsys, "--vs", "transformers")
    assert rc == 2 and "pip install" in err and "transformers" in err


def _result() -> bench.Result:
    def row(engine: str, decode: float) -> bench.Row:
        s = bench.Stat.of
        return bench.Row(
            "m", "/m", engine, "bfloat16", None, "cpu", 8, 4, s([0.01, 0.02]), s([400.0, 800.0]), s([decode]),
            1.0, 10**8, 9 * 10**7, 10**7, 20.0, 2000.0, decode / 2000, None,
        )  # fmt: skip

    rows = [row("hearthlm", 50.0), row("transformers", 25.0)]
    return bench.Result(rows, bench._ratios(rows), {"prompt_len": 8, "gen_len": 4, "runs": 2}, {})


def test_table_and_ratios():
    result = _result()
    (ratio,) = result.ratios
    assert ratio.decode == pytest.approx(2.0) and ratio.peak_memory == pytest.approx(1.0)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench.table(result))
    text = console.export_text()
    assert "hearthlm / transformers" in text and "2.00×" in text


def test_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if it were not installed
    rc, _, err = run_cli(capsys, "--plot", str(tmp_path / "chart.png"))
    assert rc == 2 and "pip install matplotlib" in err
    assert not (tmp_path / "chart.png").exists()


def test_plot_writes_a_png(tmp_path):
    path = bench.plot(_result(), tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_same_model_and_dtypes():
    fp32, bf16 = LLM(dtype="float32"), LLM(dtype="bfloat16")
    ids = bench.quality_ids(fp32)
    same = bench.compare(fp32, fp32, ids)
    assert same.tokens == len(ids) > 10
    assert same.kl_mean == pytest.approx(0, abs=1e-9) and same.top1_agreement == 1.0
    assert same.ppl_reference == pytest.approx(same.ppl_candidate)
    diff = bench.compare(fp32, bf16, ids)
    assert 1e-9 < diff.kl_mean < 0.05 and diff.kl_max >= diff.kl_mean
    assert diff.top1_agreement > 0.8


# -- GGUF files: hearthlm and llama.cpp on the same file ------------------------------------------------


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """A 2-layer Qwen2 as a Q8_0 GGUF with a real (the demo's, padded) vocabulary, which llama.cpp needs."""
    import gguf
    import torch
    from gguf_files import demo_vocab, write_gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    tensors = ((n, t.detach().float().numpy()) for n, t in model.state_dict().items())
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf"
    return write_gguf(
        path, "Qwen2ForCausalLM", cfg.to_dict(), tensors, gguf.GGMLQuantizationType.Q8_0, demo_vocab(4096)
    )


def _file_bytes(path) -> int:
    from hearthlm.weights.gguf import GGUFFile

    return sum(t.nbytes for t in GGUFFile(path).tensors.values())


def test_bench_runs_a_gguf_file_with_its_weight_bytes(capsys, q8_gguf):
    rc, out, err = run_cli(capsys, str(q8_gguf), *FAST, "--json")
    assert rc == 0, err
    (row,) = json.loads(out)["rows"]
    assert row["engine"] == "hearthlm" and row["model"] == "tiny-Q8_0.gguf" and row["generated_tokens"] == 4
    assert row["fit_memory"] is None  # fit prices formats, not a file's mix of types
    # Q8_0 is held as read (int8 + an fp16 scale per 32 values); only the F32 norm vectors shrink to bf16.
    assert 0.97 * _file_bytes(q8_gguf) < row["bytes_per_token"] < 1.01 * _file_bytes(q8_gguf)
    assert row["roofline_fraction"] > 0


def test_gguf_rejects_quant_and_transformers(capsys, q8_gguf):
    rc, _, err = run_cli(capsys, str(q8_gguf), *FAST, "--quant", "int4")
    assert rc == 2 and "already quantized" in err
    rc, _, err = run_cli(capsys, str(q8_gguf), *FAST, "--vs", "transformers")
    assert rc == 2 and "--vs llama.cpp" in err and "Traceback" not in err


def test_vs_llama_cpp_on_the_same_file(capsys, q8_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional peer (pip install llama-cpp-python)")
    rc, out, err = run_cli(capsys, str(q8_gguf), *FAST, "--vs", "llama.cpp", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    rows = {r["engine"]: r for r in doc["rows"]}
    assert set(rows) == {"hearthlm", "llama.cpp"}
    assert rows["llama.cpp"]["generated_tokens"] == 4 and rows["llama.cpp"]["decode_tok_s"]["median"] > 0
    assert rows["llama.cpp"]["bytes_per_token"] == _file_bytes(q8_gguf)
    (ratio,) = doc["ratios"]
    assert ratio["versus"] == "llama.cpp"
    expected = rows["hearthlm"]["decode_tok_s"]["median"] / rows["llama.cpp"]["decode_tok_s"]["median"]
    assert ratio["decode"] == pytest.approx(expected)


def test_llama_cpp_engine_reads_the_real_logits(q8_gguf):
    """The llama.cpp rows pick tokens from the context's logits: llama-cpp-python leaves `scores` at zero unless
    every position's logits are computed, which once made every llama.cpp token 0. On the same Q8_0 file the
    first greedy token is hearthlm's."""
    pytest.importorskip("llama_cpp")
    from hearthlm import LLM, SamplingParams
    from hearthlm.bench.engines import LlamaCppEngine

    prompt = list(range(300, 320))
    # In this process, so without llama.cpp's repacked buffers, whose AMX path crashes on some CPUs that report AMX
    # (the bench retries without them in its worker; test_vs_llama_cpp_on_the_same_file runs that path there).
    spec = {"path": str(q8_gguf), "prompt": prompt, "gen_len": 4, "device": "cpu", "extra_buffers": False}
    engine = LlamaCppEngine(spec)
    engine.llm.eval(prompt)
    ours = LLM(q8_gguf).generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0].token_ids
    assert [engine._next()] == ours != [0]


def test_llama_cpp_extra_buffers_switch_off_only_inside():
    llama_cpp = pytest.importorskip("llama_cpp").llama_cpp
    from hearthlm.bench.engines import _extra_buffers

    assert llama_cpp.llama_model_default_params().use_extra_bufts
    with _extra_buffers(False):
        assert not llama_cpp.llama_model_default_params().use_extra_bufts
    with _extra_buffers(True):
        assert llama_cpp.llama_model_default_params().use_extra_bufts
    assert llama_cpp.llama_model_default_params().use_extra_bufts
