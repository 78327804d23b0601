"""Weight quantization at load (int8 / int4) and the checkpoints `hearth quantize` writes.

Quality is bounded on the trained demo model, whose next-token distributions are real (random tiny
models have nearly flat ones): KL divergence and top-1 agreement against the unquantized model on
held-out text, and perplexity. benchmarks/quality.py prints the same figures for every format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import FAMILIES, VOCAB

from hearthlm import LLM, SamplingParams
from hearthlm.bench.results import compare
from hearthlm.cli import main
from hearthlm.kernels import cpu
from hearthlm.quant.quantize import QuantSpecError, parse_quant
from hearthlm.quant.tensor import QuantTensor
from hearthlm.weights.safetensors import CheckpointError

HELDOUT = Path(__file__).parents[1] / "benchmarks" / "data" / "heldout.txt"


@pytest.fixture(scope="module")
def demo_reference():
    llm = LLM(None, dtype="float32")
    return llm, llm.tokenizer.encode(HELDOUT.read_text())[:768]


# Bounds: measured figures (benchmarks/quality.py, README "Quantization") with room for kernel-level noise.
@pytest.mark.parametrize(
    "fmt, top1, kl, ppl_ratio",
    [("int8", 0.99, 2e-4, 1.002), ("int4", 0.93, 6e-3, 1.015), ("int4-g128", 0.93, 6e-3, 1.015)],
)
def test_demo_quality(demo_reference, fmt, top1, kl, ppl_ratio):
    ref, ids = demo_reference
    q = compare(ref, LLM(None, dtype="float32", quant=fmt), ids)
    assert q.top1_agreement >= top1
    assert q.kl_mean <= kl
    assert q.ppl_candidate <= q.ppl_reference * ppl_ratio


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_path_quality(demo_reference, fmt):
    """Token by token through the KV cache, as generation runs (the GEMV kernel, activations rounded to int8
    per 32 values): against the same model computing in float on its dequantized weights."""
    ref, ids = demo_reference
    llm = LLM(None, dtype="float32", quant=fmt)
    exact = _dequantized(LLM(None, dtype="float32", quant=fmt))
    q = compare(exact, llm, ids[:160], step=1)
    assert q.kl_mean <= 3e-4 and q.top1_agreement >= 0.98


def test_what_gets_quantized(checkpoint):
    """Linear and expert matrices in the chosen format; embeddings / LM head int8 per row; routers and
    norms in float; Gemma 4's PLE table stays in its stored dtype."""
    _, folder = checkpoint("gemma4_all")
    model = LLM(folder, quant="int4").model
    assert isinstance(model.embed.weight, QuantTensor) and model.embed.weight.bits == 8
    assert model.embed.weight.group == model.config.hidden_size  # one scale per row
    layer = model.layers[0]
    assert isinstance(layer.attn.qkv.weight, QuantTensor) and layer.attn.qkv.weight.bits == 4
    assert layer.attn.qkv.weight.group == 32
    assert isinstance(layer.mlp.gate_up.weight, QuantTensor)
    moe = next(m for m in model.modules() if type(m).__name__ == "Experts")
    assert isinstance(moe.gate_up, QuantTensor) and moe.gate_up.shape[0] == model.config.num_experts
    router = next(m for m in model.modules() if type(m).__name__ == "Router")
    assert isinstance(router.proj.weight, torch.Tensor)
    assert isinstance(model.ple.table, torch.Tensor) and model.ple.table.dtype == torch.float32  # as saved
    assert model.norm.weight.dtype == torch.float32


def _dequantized(llm: LLM) -> LLM:
    """The same model with every QuantTensor replaced by its float values (tensor.py's reference)."""
    for name, module in list(llm.model.named_modules()):
        if isinstance(module, QuantTensor):
            owner, _, attr = name.rpartition(".")
            parent = llm.model.get_submodule(owner)
            delattr(parent, attr)
            setattr(parent, attr, torch.nn.Parameter(module.dequantize(), requires_grad=False))
    return llm


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_family_computes_its_quantized_weights(checkpoint, name, fmt, kernel_path):
    """Each family quantized gives the logits of the float model holding the dequantized weights: exactly where
    prefill takes the dequantized tiles (HEARTHLM_ISA=torch once the kernels are loaded: no integer GEMM; but
    experts get few tokens each, so MoE layers take the GEMV there too), within the int8 rounding of activations
    on the decode-sized GEMV kernel path (<= 8 rows).
    Random tiny models amplify weight errors chaotically, so quality itself is bounded on the demo model above,
    not here."""
    kernel_path("torch")
    _, folder = checkpoint(name)
    llm = LLM(folder, dtype="float32", quant=fmt)
    ref = _dequantized(LLM(folder, dtype="float32", quant=fmt))
    ids = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    # Kernel path: the activations' int8 rounding, amplified by these random nets' chaos (on the trained demo
    # model it is 0.6%, see test_decode_path_quality); a misread layout moves logits by ~100%.
    kernel = 0.25
    exact = kernel if llm.config.num_experts else 1e-4
    for n, bound in ((20, exact), (6, kernel)):
        a, b = ref.logits(ids[:n]), llm.logits(ids[:n])
        assert ((a - b).abs().max() / a.abs().max()).item() <= bound, n


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("path", ["amx", "avx512", "avx2"])
def test_every_family_prefills_through_the_integer_gemm(checkpoint, name, fmt, path, kernel_path, monkeypatch):
    """On the AMX, AVX-512 and AVX2 paths a prefill of more rows than quant_linear gives the GEMV multiplies the quantized
    weights with the integer GEMM. It rounds each row of activations as the decode GEMV does and sums the same
    integer products, so every product in the model's forward (each family's shapes, biases, experts) must equal
    GEMV calls on 8 rows at a time of the same input, up to float32 summation order. (Whole-model logits are no tighter test: float-order differences
    flip the int8 rounding of single activations downstream, which these random nets amplify.)"""
    kernel_path(path)
    _, folder = checkpoint(name)
    llm = LLM(folder, dtype="float32", quant=fmt)
    n = cpu.QUANT_GEMV_ROWS_VNNI + 8
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    real, rows, errors = cpu.quant_gemm, [], []

    def checked(x, *args):
        y = real(x, *args)
        flat = x.reshape(-1, x.shape[-1])
        ref = torch.cat([cpu.quant_gemv(flat[i : i + 8], *args) for i in range(0, len(flat), 8)])
        rows.append(len(flat))
        errors.append(((y.reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item())
        return y

    monkeypatch.setattr(cpu, "quant_gemm", checked)
    llm.logits(ids)
    assert rows and max(rows) == n  # the dense projections took the GEMM
    assert max(errors) <= 1e-5


@pytest.mark.parametrize("name", ["qwen3_moe", "gemma4_dense"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_device_agnostic_path_computes_the_dequantized_weights(checkpoint, name, fmt, monkeypatch):
    """What runs off the CPU (CUDA) and where the kernels are not built: every product with a quantized weight
    dequantizes tiles with the PyTorch reference and multiplies in float, whatever the row count, so prefill
    and decode both give the dequantized model's logits and greedy tokens (experts and PLE included)."""
    _, folder = checkpoint(name)
    llm = LLM(folder, dtype="float32", quant=fmt)
    ref = _dequantized(LLM(folder, dtype="float32", quant=fmt))
    monkeypatch.setattr("hearthlm.kernels.cpu.available", lambda: False)
    ids = torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    for n in (20, 6, 1):
        a, b = ref.logits(ids[:n]), llm.logits(ids[:n])
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4, n
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert llm.generate([ids[:7]], params)[0].token_ids == ref.generate([ids[:7]], params)[0].token_ids


def test_quantize_command_round_trip(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo-int4"
    assert main(["quantize", "demo", "--to", "int4", "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "hearthlm", "format": "int4-g32"}
    assert (out / "tokenizer.json").exists()
    fresh = LLM(None, quant="int4")
    import hearthlm.weights.loader as loader

    monkeypatch.setattr(loader, "quantize", lambda *a: pytest.fail("a quantized checkpoint was quantized again"))
    again = LLM(out)
    assert again.quant == "int4-g32"
    ids = fresh.tokenizer.encode("In the beginning God created")
    assert torch.equal(fresh.logits(ids), again.logits(ids))
    # smaller than the bf16 demo: int4 matrices, int8 embeddings
    size = (out / "model.safetensors").stat().st_size
    demo = sum(f.stat().st_size for f in Path(fresh.path).glob("*.safetensors"))
    assert size < 0.6 * demo
    # and it refuses to be quantized once more
    with pytest.raises(CheckpointError, match="already quantized"):
        LLM(out, quant="int8")


def test_unknown_format_is_a_clear_error():
    with pytest.raises(QuantSpecError, match="unknown quantization 'int3'.*int8, int4"):
        LLM(None, quant="int3")
    with pytest.raises(QuantSpecError, match="int4-g48"):
        parse_quant("int4-g48")
    assert main(["run", "hi", "--quant", "q4"]) == 2


def test_foreign_quantized_checkpoint_is_refused(checkpoint, tmp_path):
    _, folder = checkpoint("llama")
    copy = tmp_path / "gptq"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with 'gptq'.*--quant"):
        LLM(copy)
