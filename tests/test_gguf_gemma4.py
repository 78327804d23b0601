"""Gemma 4 GGUF files: the layout our test writer gives them is llama.cpp's, their metadata becomes the config
transformers' checkpoint states, and what cannot be expressed is refused with the file and the key named.

Logits and greedy decoding of our loader against transformers (float and quantized files) are in test_gguf.py,
with the other families.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from checkpoints import VOCAB, build
from gguf_files import gemma4_vocab, write

from hearthlm import LLM
from hearthlm.models.gemma4 import Gemma4Model
from hearthlm.weights.gguf import GGUFError, GGUFFile
from hearthlm.weights.gguf_model import hf_config

GEMMA4 = ["gemma4_all", "gemma4_plain"]


@pytest.fixture(scope="module")
def models():
    made = {}

    def get(name):
        if name not in made:
            made[name] = build(name)[0]
        return made[name]

    return get


@pytest.mark.parametrize("name", GEMMA4)
def test_llama_cpp_runs_our_file_as_transformers_runs_the_model(name, models, tmp_path):
    """llama.cpp is the oracle for the layout: names, norms as stored, rope_freqs, k = v, KV sharing, PLE,
    the router's scales. Its CPU kernels differ from float32 transformers by ~0.02 (e.g. GELU read from an fp16 table);
    a wrong layout costs 1 or more (all dims rotated on full layers: 1.9; norms + 1: 5.4; no layer scalar: 1.4)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is an optional peer (pip install llama-cpp-python)"
    )
    model = models(name)
    path = write(model, tmp_path / f"{name}.gguf", vocab=gemma4_vocab(VOCAB))
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    f32 = 0  # GGML_TYPE_F32: a float32 KV cache, as transformers keeps it
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, type_k=f32, type_v=f32, verbose=False)
    llm.eval(ids.tolist())
    got = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max().item() <= 0.05


@pytest.mark.parametrize("name", GEMMA4)
def test_metadata_gives_the_config_transformers_states(name, models, tmp_path):
    model = models(name)
    path = write(model, tmp_path / f"{name}.gguf")
    ours = Gemma4Model.config_from_hf(hf_config(GGUFFile(path)), "Gemma4ForCausalLM", str(path))
    theirs = Gemma4Model.config_from_hf(model.config.to_dict(), "Gemma4ForCausalLM", "config.json")
    assert ours.layers == theirs.layers  # head sizes, KV heads, RoPE, windows, KV sources, k = v, MLP widths
    for key in ("vocab_size", "hidden_size", "num_heads", "norm_eps", "activation", "tie_embeddings", "attn_scale",
                "final_softcap", "num_experts", "experts_per_token", "moe_intermediate_size", "ple_dim",
                "ple_vocab_size", "max_position"):  # fmt: skip
        expected = getattr(theirs, key)  # GGUF floats are float32; strings, ints and None compare exactly
        assert getattr(ours, key) == (pytest.approx(expected, rel=1e-7) if isinstance(expected, float) else expected), (
            key
        )


# -- what llama.cpp's format can say but Gemma 4 (transformers, and so hearthlm) cannot ----------------------


def _write_patched(model, path, monkeypatch, metadata=None, tensors=None):
    """Write `model` with writer calls changed: `metadata` {writer method: value}, `tensors(name, data)` ->
    [(name, data)] for each tensor the writer adds."""
    for method, value in (metadata or {}).items():
        real = getattr(gguf.GGUFWriter, method)
        monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, _v, real=real, value=value: real(self, value))
    if tensors is not None:
        real_add = gguf.GGUFWriter.add_tensor

        def add(self, name, data, *args, **kwargs):
            for n, d in tensors(name, data):
                real_add(self, n, d, *args, **kwargs)

        monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add)
    write(model, path)
    monkeypatch.undo()
    return path


def _split_experts(name, data):
    if name.endswith("ffn_gate_up_exps.weight"):
        half = data.shape[1] // 2
        return [
            (name.replace("gate_up", "gate"), data[:, :half].copy()),
            (name.replace("gate_up", "up"), data[:, half:].copy()),
        ]
    return [(name, data)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metadata": {"add_sliding_window_pattern": [True] * 6}}, "makes the last layer sliding"),
        ({"metadata": {"add_shared_kv_layers": 2}}, "shared_kv_layers=2: llama.cpp would read layer 4's K/V"),
        ({"metadata": {"add_feed_forward_length": [48] * 5 + [96]}}, "feed_forward_length.*only KV-shared layers"),
        ({"metadata": {"add_head_count_kv": [2] * 5}}, "head_count_kv lists 5 values for 6 layers"),
        ({"tensors": lambda n, d: [] if n == "blk.0.attn_v.weight" else [(n, d)]}, r"layers \[0, 2\] have no attn_v"),
        ({"tensors": lambda n, d: [(n, d * 0 + 2)] if n == "rope_freqs.weight" else [(n, d)]}, "'rope_freqs.weight'"),
        ({"tensors": _split_experts}, "'blk.0.ffn_gate_up_exps.weight' is missing"),
    ],
)
def test_what_gemma4_cannot_express_is_refused(change, message, models, tmp_path, monkeypatch):
    path = _write_patched(models("gemma4_all"), tmp_path / "odd.gguf", monkeypatch, **change)
    with pytest.raises(GGUFError, match=message) as e:
        LLM(path)
    assert str(path) in str(e.value)


def test_no_rope_freqs_means_every_dimension_rotated(models, tmp_path, monkeypatch):
    """Without rope_freqs llama.cpp rotates all of a full layer's dimensions: default RoPE."""
    drop = lambda n, d: [] if n == "rope_freqs.weight" else [(n, d)]  # noqa: E731
    path = _write_patched(models("gemma4_plain"), tmp_path / "plain.gguf", monkeypatch, tensors=drop)
    rope = hf_config(GGUFFile(path))["rope_parameters"]["full_attention"]
    assert rope == {"rope_type": "default", "rope_theta": 1e5}


def test_bench_counts_the_routed_share_of_gemma4_experts(models, tmp_path):
    """`hearth bench --vs llama.cpp` prices a decode step at the file's bytes, experts at top_k / num_experts."""
    from types import SimpleNamespace

    from hearthlm.bench.engines import LlamaCppEngine

    path = write(models("gemma4_all"), tmp_path / "all.gguf")
    f = GGUFFile(path)
    experts = sum(t.nbytes for n, t in f.tensors.items() if "_exps." in n)
    rest = sum(t.nbytes for n, t in f.tensors.items() if "_exps." not in n)
    assert LlamaCppEngine.bytes_per_token(SimpleNamespace(path=path)) == int(rest + experts * 2 / 4)
