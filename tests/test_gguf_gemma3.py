"""Gemma 3 GGUF files: the layout our test writer gives them is llama.cpp's (norm weights + 1 included), their
metadata becomes the config transformers' checkpoint states, what the file leaves out is what llama.cpp assumes,
and what we cannot run is refused with the file and the key named.

Logits and greedy decoding of our loader against transformers (float and quantized files) are in test_gguf.py,
with the other families.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from checkpoints import FAMILIES, VOCAB, build, perturb
from gguf_files import gemma3_vocab, write

from hearthlm import LLM
from hearthlm.models.gemma3 import Gemma3Model
from hearthlm.weights.gguf import GGUFError, GGUFFile
from hearthlm.weights.gguf_model import hf_config

HUB = FAMILIES["gemma3_hub"][2]
# 62 layers is Gemma 3 27B to llama.cpp, whose scores it scales by (hidden / heads) ** -0.5 (27B's
# query_pre_attn_scalar, 168), not by head_dim ** -0.5: here 64 / 4 = 16 with heads 32 wide.
WIDE_HEADS_62 = HUB | {"num_hidden_layers": 62, "head_dim": 32, "query_pre_attn_scalar": 16}


def _model(kwargs: dict, weights: torch.nn.Module | None = None) -> torch.nn.Module:
    config = tf.Gemma3TextConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).eval()
    if weights is None:
        perturb(model, seed=62)
    else:
        model.load_state_dict(weights.state_dict())
    return model


@pytest.fixture(scope="module")
def models():
    """models(name) -> a family's reference model, or the wide-heads one for any other name; built once."""
    return functools.cache(lambda name: build(name)[0] if name in FAMILIES else _model(WIDE_HEADS_62))


def _llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is an optional peer (pip install llama-cpp-python)"
    )
    f32 = 0  # GGML_TYPE_F32: a float32 KV cache, as transformers keeps it
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, type_k=f32, type_v=f32, verbose=False)
    llm.eval(ids.tolist())
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def _check_llama_cpp(model: torch.nn.Module, path, bound: float, top1: float = 1.0) -> None:
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(0))  # 3 windows of 8
    got = _llama_cpp_logits(path, ids)
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= top1
    assert (got - expected).abs().max().item() <= bound


@pytest.mark.parametrize("name, bound, top1", [("gemma3_hub", 0.05, 1.0), ("wide_heads_62", 0.5, 0.9)])
def test_llama_cpp_runs_our_file_as_transformers_runs_the_model(name, bound, top1, models, tmp_path):
    """llama.cpp is the oracle for the layout: names, norms + 1, one head size, linear RoPE scaling on full layers
    only, the sliding pattern and RoPE base it assumes, the 27B score scale. Its CPU kernels differ from float32
    transformers by ~0.01 on 7 layers (0.2 on 62 random layers, which amplify every rounding and so flip a near tie
    now and then); a wrong layout costs far more (norms without + 1: 6.2; linear scaling on sliding layers too: 8.1;
    head_dim's score scale at 62 layers: 8.3, a sixth of the top tokens kept)."""
    model = models(name)
    _check_llama_cpp(model, write(model, tmp_path / f"{name}.gguf", vocab=gemma3_vocab(VOCAB)), bound, top1)


@pytest.mark.parametrize("name", ["gemma3_hub", "wide_heads_62"])
def test_metadata_gives_the_config_transformers_states(name, models, tmp_path):
    model = models(name)
    path = write(model, tmp_path / f"{name}.gguf")
    ours = Gemma3Model.config_from_hf(hf_config(GGUFFile(path)), "Gemma3ForCausalLM", str(path))
    theirs = Gemma3Model.config_from_hf(model.config.to_dict(), "Gemma3ForCausalLM", "config.json")
    assert ours.layers == theirs.layers  # head size, KV heads, RoPE per type, windows, MLP width
    for key in ("vocab_size", "hidden_size", "num_heads", "norm_eps", "activation", "tie_embeddings", "qkv_bias",
                "attn_scale", "final_softcap", "max_position"):  # fmt: skip
        expected = getattr(theirs, key)  # GGUF floats are float32; strings, ints and None compare exactly
        assert getattr(ours, key) == (pytest.approx(expected, rel=1e-7) if isinstance(expected, float) else expected), (
            key
        )


def test_62_layer_file_loads_with_27bs_score_scale(models, tmp_path):
    model = models("wide_heads_62")
    llm = LLM(write(model, tmp_path / "62.gguf"), dtype="float32")
    ids = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    # 62 random layers amplify float32 rounding to ~2e-3; head_dim's scale instead moves the logits by ~9
    assert (llm.logits(ids.tolist()) - expected).abs().max().item() <= 0.02


def test_fit_prices_a_gemma3_file(models, tmp_path):
    """`hearth fit FILE.gguf`: the model it prices holds every tensor of the file (norms as float32 vectors), and
    its KV cache holds the sliding layers' last window only."""
    from hearthlm import fit

    model = models("gemma3_hub")
    path = write(model, tmp_path / "hub.gguf", gguf.GGMLQuantizationType.Q8_0)
    m = fit.load(str(path))
    assert m.params == sum(int(np.prod(t.shape)) for t in GGUFFile(path).tensors.values())
    per_layer = 2 * HUB["num_key_value_heads"] * HUB["head_dim"] * 2  # K and V, bf16
    full = model.config.layer_types.count("full_attention")
    sliding = HUB["num_hidden_layers"] - full
    assert fit.kv_cache_bytes(m.config, 100) == per_layer * (full * 100 + sliding * HUB["sliding_window"])


# -- keys llama.cpp reads that its converter does not write, and what it does where a key is absent ---------------

SLIDING_20K = {"sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0}}
VARIANTS = {  # name: (the config transformers runs, the change to the metadata llama.cpp's converter writes)
    "final softcap": ({"final_logit_softcapping": 2.0}, lambda w: w.add_final_logit_softcapping(2.0)),
    "sliding RoPE base": (
        {"rope_parameters": HUB["rope_parameters"] | SLIDING_20K},
        lambda w: w.add_rope_freq_base_swa(20_000.0),
    ),
    "sliding pattern": ({"sliding_window_pattern": 3}, lambda w: w.add_sliding_window_pattern(3)),
    "no sliding window": (
        {"layer_types": ["full_attention"] * HUB["num_hidden_layers"]},
        lambda w: w.kv_data[0].pop("gemma3.attention.sliding_window"),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_what_llama_cpp_reads_beyond_the_converter_we_read_alike(variant, models, tmp_path):
    over, edit = VARIANTS[variant]
    base = models("gemma3_hub")
    model = _model(HUB | over, weights=base)
    path = write(base, tmp_path / "variant.gguf", vocab=gemma3_vocab(VOCAB), edit=edit)
    _check_llama_cpp(model, path, 0.05)
    ours = Gemma3Model.config_from_hf(hf_config(GGUFFile(path)), "Gemma3ForCausalLM", str(path))
    theirs = Gemma3Model.config_from_hf(model.config.to_dict(), "Gemma3ForCausalLM", "config.json")
    assert (ours.layers, ours.final_softcap) == (theirs.layers, theirs.final_softcap)


# -- what a gemma3 file can say but hearthlm does not run ---------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.add_sliding_window_pattern([True] * 6 + [False]), "sliding_window_pattern=.*per-layer lists"),
        (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), "RoPE scaling 'yarn' is not supported"),
        (lambda w: w.add_value_length(8), "value_length differs from key_length"),
    ],
)
def test_what_we_cannot_run_is_refused(edit, message, models, tmp_path):
    path = write(models("gemma3_hub"), tmp_path / "odd.gguf", edit=edit)
    with pytest.raises(GGUFError, match=message) as e:
        LLM(path)
    assert str(path) in str(e.value)
