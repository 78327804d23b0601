"""The fused CPU decode step (layers/decode_step.py) against the module-by-module path it stands in for: it runs
the same kernels on the same values, so every layer's output must be equal bit for bit, whatever the weights'
format, the cache's dtype, the rows in the batch or the sliding window."""

from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.kernels import cpu
from hearthlm.layers import decode_step
from hearthlm.quant.quantize import parse_quant, quantize
from hearthlm.quant.tensor import RowConcat

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs a CPU with AVX2/FMA/F16C and a compiler")

# llama3 RoPE and tied embeddings, qkv bias with sliding layers (qwen2), one KV head and a window on every layer
# (mistral), q/k norms (qwen3), a dense layer between MoE layers (qwen3_moe), Gemma 3's norms around each block
# (gemma3, with biases: gemma3_bias), Gemma 4's PLE, KV-shared layers and k=v (gemma4_dense), Gemma 4 with
# none of those (gemma4_plain), and Gemma 4 whose layers all have experts: none fused (gemma4_all).
FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "gemma3", "gemma3_bias", "gemma4_dense",
            "gemma4_plain", "gemma4_all"]  # fmt: skip
FORMATS = [("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int4")]


def _compare_each_step(monkeypatch) -> list[tuple[int, int, bool]]:
    """Make every fused step also run its layer module by module and require the same output; returns (layer,
    rows, whether the keys read were one run of slots) of every fused step."""
    real, fused, inside = decode_step.step, [], []

    def step(layer, x, batch, *ple):
        if inside:  # the module-by-module run below
            return None
        out = real(layer, x, batch, *ple)
        if out is not None:
            inside.append(True)
            try:
                expected = layer(x, batch, *ple)  # writes the same K/V to the same slots again
            finally:
                inside.clear()
            diff = (out - expected).abs().max().item()
            assert torch.equal(out, expected), f"layer {layer.attn.layer}: fused step differs by {diff}"
            one_run = batch.cache.decode_slots(layer.attn.layer)[3] is None  # no per-key slots
            fused.append((layer.attn.layer, x.shape[0], one_run))
        return out

    monkeypatch.setattr(decode_step, "step", step)
    return fused


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in (13, 21)]  # longer than the window (8)


@pytest.mark.parametrize("dtype, quant", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
def test_fused_decode_step_equals_the_module_path(name, dtype, quant, checkpoint, monkeypatch):
    _, folder = checkpoint(name)
    llm = LLM(folder, dtype=dtype, quant=quant)
    fused = _compare_each_step(monkeypatch)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm.generate(_prompts(), params)  # two rows: each reads its keys slot by slot
    llm.generate([list(range(40, 57))], params)  # one row alone: its keys are one run of slots
    dense = {i for i, spec in enumerate(llm.config.layers) if not spec.moe}
    assert {layer for layer, _, _ in fused} == dense  # every dense layer ran fused, the MoE ones module by module
    assert {(rows, one_run) for _, rows, one_run in fused} == ({(1, True), (2, False)} if dense else set())


@pytest.mark.parametrize("dtype, quant", [("bfloat16", None), ("float32", "int8"), ("bfloat16", "int4")])
def test_fused_decode_step_equals_the_module_path_past_one_gemv_pass(
    dtype, quant, checkpoint, monkeypatch, kernel_path
):
    """A decode batch of 14 rows on the AVX2 path, wider than one GEMV pass (8 rows): 16-bit projections stay on the
    GEMV up to 16 rows (cpu.GEMV_ROWS) and quantized ones take the integer GEMM past 12 (QUANT_GEMV_ROWS_AVX2), in
    the fused step as in the module path, so the two still agree bit for bit."""
    kernel_path("avx2")
    before = cpu.gemv_isa()
    cpu.set_gemv_isa("avx2")
    try:
        _, folder = checkpoint("qwen2")  # qkv bias: the GEMM adds it too
        llm = LLM(folder, dtype=dtype, quant=quant)
        fused = _compare_each_step(monkeypatch)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 90, (4 + i,), generator=g).tolist() for i in range(14)]
        llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finally:
        cpu.set_gemv_isa(before)
    assert 14 in {rows for _, rows, _ in fused}


def test_fused_decode_step_runs_projections_of_mixed_formats(checkpoint, monkeypatch):
    """A q|k|v whose parts were quantized differently (a Q4_K_M GGUF's Q6_K v) runs part by part, as `linear`
    runs a RowConcat, bias added after."""
    _, folder = checkpoint("qwen2")
    llm = LLM(folder, dtype="float32")
    qkv = llm.model.layers[0].attn.qkv
    w = qkv._parameters.pop("weight")
    q_rows = llm.config.num_heads * llm.config.layers[0].head_dim
    qkv.weight = RowConcat([quantize(w[:q_rows], parse_quant("int4")), quantize(w[q_rows:], parse_quant("int8"))])
    assert qkv.bias is not None
    fused = _compare_each_step(monkeypatch)
    llm.generate(_prompts(), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert 0 in {layer for layer, _, _ in fused}


def test_layers_the_kernels_cannot_read_run_module_by_module(checkpoint):
    _, folder = checkpoint("llama")
    llm = LLM(folder, dtype="float32")
    layer = llm.model.layers[0]
    assert decode_step.compile_layer(layer) is not None
    layer.input_norm.weight.data = layer.input_norm.weight.data.bfloat16()  # not the float32 the kernel reads
    assert decode_step.compile_layer(layer) is None
