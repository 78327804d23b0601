"""GGUF files: read by our reader, run by our model code, against transformers.

Float GGUF files must give transformers' logits (the names, metadata and llama.cpp's reorderings are
undone exactly); quantized ones must give the logits of transformers running the same weights dequantized
by the `gguf` package's reference code (up to the int8 rounding of activations in our kernels). Broken
files must fail with a GGUFError that says what is wrong.
"""

from __future__ import annotations

import copy
import functools

import gguf
import gguf_files
import numpy as np
import pytest
import torch
import transformers as tf
from checkpoints import FAMILIES, VOCAB, _decoder, build, perturb
from gguf_files import write

from hearthlm import LLM
from hearthlm.weights.gguf import GGUFError, GGUFFile

T = gguf.GGMLQuantizationType
GGUF_FAMILIES = ["llama", "qwen2_plain", "qwen3", "qwen3_moe", "mixtral_plain", "gemma3_hub", "gemma4_all",
                 "gemma4_plain"]  # fmt: skip


def _build(name: str):
    if name == "qwen2_plain":  # llama.cpp's qwen2 has no sliding window (Qwen2.5 checkpoints don't use it)
        cfg = tf.Qwen2Config(**_decoder(tie_word_embeddings=False))
        model = tf.Qwen2ForCausalLM(cfg).eval()
    elif name == "mixtral_plain":
        cfg = tf.MixtralConfig(
            **_decoder(intermediate_size=64, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
        )
        model = tf.MixtralForCausalLM(cfg).eval()
    elif name == "llama_wide":  # rows of 256 and more: room for the K-quants' 256-element blocks
        cfg = tf.LlamaConfig(
            **_decoder(
                hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64, tie_word_embeddings=False
            )
        )
        model = tf.LlamaForCausalLM(cfg).eval()
    elif name == "gemma4_ple16":  # gemma4_all with a PLE table whose rows (6 layers x 16) fit 32-wide blocks
        kwargs = FAMILIES["gemma4_all"][2] | {"hidden_size_per_layer_input": 16}
        model = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**kwargs)).eval()
    else:
        return build(name)[0]
    model.config._attn_implementation = "eager"
    perturb(model, seed=sum(map(ord, name)))
    return model


@pytest.fixture(scope="module")
def models():
    """models(name) -> the reference model, built once per test module."""
    return functools.cache(_build)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_float_gguf_matches_transformers(name, models, tmp_path):
    ref = models(name)
    path = write(ref, tmp_path / f"{name}.gguf")
    llm = LLM(path, dtype="float32")
    ids = _ids(24)
    with torch.no_grad():
        expected = ref(ids).logits[0]
    got = llm.logits(ids[0].tolist())
    assert (got - expected).abs().max().item() <= 1e-4
    # greedy decoding with the cache, 20 tokens
    want = ref.generate(ids[:, :6], max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 6:].tolist()
    from hearthlm import SamplingParams

    out = llm.generate([ids[0, :6].tolist()], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want


def _dequantized_reference(model, qtype):
    """transformers running the weights as the GGUF file of type `qtype` holds them (gguf's own dequantizer)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name == "lm_head.weight" and ref.config.tie_word_embeddings:
                continue
            data, ttype = gguf_files.encode(p.detach().float().numpy(), qtype)
            if ttype != T.F32:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(data, ttype).reshape(p.shape)))
    return ref


@pytest.mark.parametrize(
    "qtype, name",
    [(T.F16, "llama"), (T.Q8_0, "llama"), (T.Q4_0, "qwen2_plain"), (T.Q4_1, "qwen3"), (T.Q5_0, "llama"),
     (T.Q5_1, "qwen3_moe"), (T.Q8_0, "mixtral_plain"), (T.Q4_K, "llama_wide"), (T.Q5_K, "llama_wide"),
     (T.Q6_K, "llama_wide"), (T.Q8_0, "gemma4_ple16"), (T.Q4_0, "gemma4_ple16"), (T.Q4_1, "gemma4_plain"),
     (T.Q8_0, "gemma3_hub"), (T.Q4_0, "gemma3_hub")],
)  # fmt: skip
def test_quantized_gguf_matches_dequantized_reference(qtype, name, models, tmp_path, kernel_path):
    kernel_path("torch")  # 16 prompt tokens: the exact prefill tiles (the integer GEMMs have their own test below)
    _check_quantized(models(name), write(models(name), tmp_path / f"{name}-{qtype.name}.gguf", qtype), qtype)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_quantized_ple_table_stays_in_the_file(qtype, models, tmp_path):
    """Gemma 4's per-layer embedding table (2.5 GB for E2B at Q8_0) is not repacked into memory: the model holds
    a view of the file's bytes and dequantizes the rows it gathers, exactly as the reference dequantizes them."""
    from hearthlm.quant import ggml

    path = write(models("gemma4_ple16"), tmp_path / f"ple-{qtype.name}.gguf", qtype)
    table = LLM(path, dtype="float32").model.ple.table
    assert isinstance(table, ggml.GGMLRows) and table.type == qtype
    f = GGUFFile(path)
    info = f.tensors["per_layer_token_embd.weight"]
    assert _mapped_file(table.raw.data_ptr()) == str(path)  # the file's mapping itself, not a copy
    assert torch.equal(table.raw.reshape(-1), f.raw(info.name))
    ids = torch.tensor([5, 0, 5, VOCAB - 1])
    reference = torch.from_numpy(gguf.quants.dequantize(f.raw(info.name).numpy(), qtype)).reshape(info.shape)
    assert torch.equal(table.rows(ids), reference[ids])


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (/proc/self/maps), None for anonymous memory."""
    for line in open("/proc/self/maps"):
        span, *rest = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return rest[4].strip() if len(rest) == 5 else None
    return None


def _check_quantized(model, path, qtype):
    llm = LLM(path, dtype="float32")
    ref = _dequantized_reference(model, qtype)
    ids = _ids(16, seed=1)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        plain = model(ids).logits[0]
    got = llm.logits(ids[0].tolist())
    err = (got - expected).abs().max().item()
    quant_err = (plain - expected).abs().max().item()  # what the format itself changes
    # Our kernels round activations to int8 per 32 values: far below the format's own error, and far below
    # what a misplaced nibble or scale would do (that moves logits by as much as the format error or more).
    assert err <= 0.02 * expected.abs().max().item()
    if qtype != T.F16:
        assert err < 0.5 * quant_err
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_mixed_types_in_fused_projections(models, tmp_path, monkeypatch, kernel_path):
    """Q4_K_M files store attn_v (and some ffn_down) in Q6_K beside Q4_K: the fused q|k|v runs part by part."""
    model = models("llama_wide")
    path = tmp_path / "mixed.gguf"
    original = gguf_files.encode
    # k and v (2 heads x 64 rows of 256) in Q6_K, everything else in Q4_K
    monkeypatch.setattr(gguf_files, "encode", lambda d, q: original(d, T.Q6_K if d.shape == (128, 256) else q))
    write(model, path, T.Q4_K)
    f = GGUFFile(path)
    assert {f.tensors["blk.0.attn_q.weight"].ggml_type, f.tensors["blk.0.attn_v.weight"].ggml_type} == {T.Q4_K, T.Q6_K}
    kernel_path("torch")  # the exact prefill tiles
    _check_quantized(model, path, T.Q4_K)


# -- broken files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(models, tmp_path_factory):
    return write(models("qwen3"), tmp_path_factory.mktemp("g") / "small.gguf", T.Q8_0)


@pytest.mark.parametrize("keep", [3, 20, 200, 0.5, 0.999])
def test_truncated_file_is_a_clear_error(small_gguf, tmp_path, keep):
    data = small_gguf.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(GGUFError, match="truncated|too short"):
        LLM(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(bad)


def test_corrupt_counts_and_types(small_gguf, tmp_path):
    data = bytearray(small_gguf.read_bytes())
    bad = tmp_path / "counts.gguf"
    data[8:16] = (2**60).to_bytes(8, "little")  # tensor count
    bad.write_bytes(data)
    with pytest.raises(GGUFError, match="corrupt"):
        GGUFFile(bad)
    # an unsupported tensor type: rewrite one tensor's type id in place to IQ2_XXS (16)
    f = GGUFFile(small_gguf)
    data = bytearray(small_gguf.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims u32, two u64 dims
    assert int.from_bytes(data[at : at + 4], "little") == f.tensors["blk.0.attn_q.weight"].ggml_type
    data[at : at + 4] = (16).to_bytes(4, "little")
    bad.write_bytes(data)
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        LLM(bad)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'bert' is not supported"):
        LLM(path)


def test_metadata_round_trip(small_gguf):
    """Our reader against gguf's own reader: every key and every tensor's type, shape and bytes."""
    ours = GGUFFile(small_gguf)
    theirs = gguf.GGUFReader(small_gguf)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == pytest.approx(field.contents()), key
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        assert bytes(ours.raw(t.name).numpy()) == t.data.tobytes()
