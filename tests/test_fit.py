"""`hearth fit`: parameter counts and KV figures of the known models, GGUF sizes, and the memory estimate
against the measured RSS of real loads (run in subprocesses, so that each starts from a clean process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf

from hearthlm import fit
from hearthlm.cli import main
from hearthlm.store import DEMO_DIR

# GEMMA4.md: text parameters (total, active) and K+V bytes per token (full layers, sliding layers).
GEMMA4 = {
    "gemma-4-E2B": (4.63e9, 4.63e9, 6 * 1024, 12 * 1024, 208e6),
    "gemma-4-E4B": (7.46e9, 7.46e9, 16 * 1024, 40 * 1024, 558e6),
    "gemma-4-26B-A4B": (25.2e9, 3.8e9, 10 * 1024, 200 * 1024, 545e6),
    "gemma-4-31B": (30.7e9, 30.7e9, 40 * 1024, 800 * 1024, 2181e6),
}


@pytest.mark.parametrize("name", sorted(GEMMA4))
def test_gemma4_parameters_and_kv_cache_match_the_published_figures(name):
    total, active, full, sliding, at_32k = GEMMA4[name]
    m = fit.known_model(name)
    assert m.params == pytest.approx(total, rel=0.003)
    assert m.active_params == pytest.approx(active, rel=0.02)
    e = fit.estimate(m, "bf16", context=32768)
    # GEMMA4.md counts one tensor on k=v (full) layers; hearthlm's cache stores K (normed, rotated) and V (v_norm
    # of the same projection) apart, so its full layers take twice that.
    twice = 2 if m.config.layers[-1].k_eq_v else 1
    assert e.kv_per_token == {"full": full * twice, "sliding": sliding}
    if twice == 1:
        assert e.kv_cache == pytest.approx(at_32k, rel=0.005)
    else:
        assert e.kv_cache == pytest.approx(at_32k + full * 32768, rel=0.005)


def test_gemma4_ple_table_and_experts():
    e2b = fit.known_model("google/gemma-4-E2B-it")  # HF ids resolve to the known configs too
    assert e2b.count("ple_table") == pytest.approx(2.35e9, rel=0.005)
    moe = fit.estimate(fit.known_model("gemma-4-26B-A4B"), "bf16")
    assert moe.weights == pytest.approx(50.47e9, rel=0.002)
    assert moe.weights_active_experts == pytest.approx(50.47e9 - 45.7e9 * (1 - 8 / 128), rel=0.01)
    gpu = fit.estimate(e2b, "bf16")
    assert gpu.ple_table == pytest.approx(2.35e9 * 2, rel=0.005)
    assert gpu.vram < gpu.weights  # the PLE table stays in host memory


@pytest.mark.parametrize("name", ["gemma-3-4b", "gemma-3-12b", "gemma-3-27b"])
def test_gemma3_parameters_and_kv_cache_match_transformers(name):
    """The shipped Gemma 3 text configs as transformers builds them (on the meta device): the same parameters, and
    K+V per token from its layer_types (sliding layers held to the window)."""
    config = tf.Gemma3TextConfig(**json.loads((fit.KNOWN_DIR / f"{name}.json").read_text()))
    with torch.device("meta"):
        ref = tf.Gemma3ForCausalLM(config)
    m = fit.known_model(f"google/{name}-it")
    assert m.params == sum(p.numel() for p in ref.parameters())
    per_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    full = config.layer_types.count("full_attention")
    assert fit.kv_bytes_per_token(m.config) == {
        "full": full * per_layer,
        "sliding": (len(config.layer_types) - full) * per_layer,
    }
    assert fit.kv_cache_bytes(m.config, 32768) == per_layer * (full * 32768 + (len(config.layer_types) - full) * 1024)


@pytest.mark.parametrize(
    "fmt, published",  # bartowski's and the official GGUF files of Llama-3.1-8B-Instruct (bytes)
    [("Q8_0", 8.54e9), ("Q4_K_M", 4.92e9), ("Q4_0", 4.66e9)],
)
def test_gguf_sizes_match_published_files(fmt, published):
    m = fit.known_model("Llama-3.1-8B-Instruct")
    assert fit.gguf_file_bytes(m, fmt) == pytest.approx(published, rel=0.02)
    # in memory, repacked for our kernels: the same for Q8_0, wider where Q6_K / Q4_K tensors are
    resident = fit.estimate(m, fmt).weights
    assert resident >= fit.gguf_file_bytes(m, fmt) * 0.999 and (fmt != "Q8_0" or resident <= published * 1.02)


def test_every_known_model_builds_and_dense_kv_is_plain_gqa():
    for name in fit.KNOWN_MODELS:
        assert fit.known_model(name).params > 1e9
    llama = fit.known_model("Llama-3.1-8B-Instruct")
    assert llama.params == pytest.approx(8.03e9, rel=0.002)
    assert fit.kv_bytes_per_token(llama.config) == {"full": 32 * 2 * 8 * 128 * 2, "sliding": 0}


def test_cli_json_and_errors(capsys):
    argv = ["fit", "gemma-4-E2B", "Llama-3.2-3B-Instruct", "--json", "--ram", "8", "--vram", "0"]
    assert main([*argv, "--bandwidth", "20", "--context", "8192", "--concurrency", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(e["model"], e["format"]): e for e in doc["estimates"]}
    assert set(fit.DEFAULT_FORMATS) == {f for _, f in rows}
    e2b = rows["gemma-4-E2B", "bf16"]
    assert (e2b["context"], e2b["concurrency"], e2b["fits_ram"], e2b["fits_vram"]) == (8192, 2, False, None)
    q4 = rows["gemma-4-E2B", "Q4_K_M"]
    assert (
        q4["fits_ram"]
        and q4["device"] == "cpu"
        and q4["tokens_per_s"] == pytest.approx(20e9 / q4["bytes_per_token"], rel=0.01)
    )
    assert doc["machine"]["ram"] == 8e9
    assert main(["fit", "no-such-model", "--bandwidth", "20"]) == 2
    assert "gemma-4-E2B" in capsys.readouterr().err


# -- the estimate against real loads ---------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
        return out

    import torch, hearthlm
    base = status()["VmRSS"]
    from hearthlm import LLM
    llm = LLM(sys.argv[1], dtype=sys.argv[2], quant=None if sys.argv[3] == "none" else sys.argv[3])
    with torch.inference_mode():
        for p in [*llm.model.parameters(), *llm.model.buffers()]:  # read every page, as decoding does
            p.reshape(-1)[::256].sum()
        llm.logits([3, 4, 5, 6])
    print(json.dumps({"base": base, **status()}))
    """
)


def _measure(folder: Path, dtype: str, quant: str = "none") -> dict[str, int]:
    cmd = [sys.executable, "-c", PROBE, str(folder), dtype, quant]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory) -> Path:
    """A ~80M-parameter Llama checkpoint (fp32, 310 MB): big enough that the weights dominate."""
    config = tf.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama_fp32")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_bf16(llama_fp32, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_bf16")
    tf.LlamaForCausalLM.from_pretrained(llama_fp32, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def _load_cases():
    return [
        pytest.param(lambda request: DEMO_DIR / "hearth-demo", "bfloat16", "bf16", id="demo-bf16"),
        pytest.param(lambda request: request.getfixturevalue("llama_bf16"), "bfloat16", "bf16", id="llama-bf16"),
        pytest.param(
            lambda request: request.getfixturevalue("llama_fp32"), "bfloat16", "bf16", id="llama-fp32-as-bf16"
        ),
        pytest.param(lambda request: request.getfixturevalue("llama_bf16"), "float32", "fp32", id="llama-bf16-as-fp32"),
        pytest.param(lambda request: request.getfixturevalue("llama_bf16"), "bfloat16", "int8", id="llama-bf16-int8"),
        pytest.param(lambda request: request.getfixturevalue("llama_bf16"), "bfloat16", "int4", id="llama-bf16-int4"),
    ]


@pytest.mark.parametrize("folder, dtype, fmt", _load_cases())
def test_estimate_holds_against_measured_rss(request, folder, dtype, fmt):
    folder = folder(request)
    m = fit.load(folder)
    e = fit.estimate(m, fmt, context=4)
    got = _measure(folder, dtype, fmt if fmt in ("int8", "int4") else "none")
    peak = got["VmHWM"] - got["base"]
    print(f"{folder.name} {dtype}: peak RSS {peak / 1e6:.0f} MB, estimated {(e.load_peak - fit.RUNTIME_RSS) / 1e6:.0f}")
    if fmt in fit.NATIVE:  # quantizing: the peak swings between runs (160-260 MB here), the steady RSS does not
        assert e.load_peak - fit.RUNTIME_RSS == pytest.approx(peak, rel=0.10)
    if m.file_dtype_bytes != fit.NATIVE.get(fmt) and not m.count("ple_table"):
        # Every tensor converted: the file's mapping is gone after the load, so RSS is what must stay resident.
        steady = got["VmRSS"] - got["base"]
        print(f"  steady RSS {steady / 1e6:.0f} MB, estimated {(e.ram - fit.RUNTIME_RSS) / 1e6:.0f}")
        assert e.ram - fit.RUNTIME_RSS == pytest.approx(steady, rel=0.10)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--context", "0"], "--context and --concurrency must be at least 1"),
        (["--concurrency", "-1"], "--context and --concurrency must be at least 1"),
        (["--ram", "-3"], "--ram must be a positive number"),
        (["--vram", "-1"], "--vram must be 0 (no GPU) or more"),
        (["--bandwidth", "0"], "--bandwidth must be a positive number"),
    ],
)
def test_bad_fit_flags_are_clear_errors(flags, message, capsys):
    from hearthlm import cli

    assert cli.main(["fit", "gemma-4-E2B", "--bandwidth", "30", *flags]) == 2
    assert message in capsys.readouterr().err


def test_formats_marked_as_hearthlm_loads_them():
    gemma, qwen = fit.load("gemma-4-E2B"), fit.load("Qwen2.5-7B-Instruct")
    for model in (gemma, qwen):
        assert all(fit.estimate(model, f).supported for f in ("bf16", "int8", "int4", "Q8_0", "Q4_K_M", "Q4_0"))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_load_peak_stays_near_the_bytes_held(llama_bf16, tmp_path, qtype):
    """A GGUF load repacks one tensor at a time and gives each tensor's file pages back: the peak RSS stays
    within 10% of the bytes the model holds (for these types, the file's), plus what any load adds (the kernels,
    first-forward libraries: fit.LOAD_OVERHEAD). A load that kept the file's pages would read about twice that."""
    import gguf
    from gguf_files import write

    model = tf.LlamaForCausalLM.from_pretrained(llama_bf16, dtype=torch.float32)
    path = write(model, tmp_path / f"m-{qtype}.gguf", getattr(gguf.GGMLQuantizationType, qtype))
    del model
    got = _measure(path, "bfloat16")
    from hearthlm.weights.gguf import GGUFFile

    held = sum(t.nbytes for t in GGUFFile(path).tensors.values())  # Q8_0/Q4_0 repack without changing size
    peak, steady = got["VmHWM"] - got["base"], got["VmRSS"] - got["base"]
    print(f"{qtype}: file tensors {held / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, steady {steady / 1e6:.0f} MB")
    assert peak < 1.10 * held + fit.LOAD_OVERHEAD and steady < 1.10 * held + fit.LOAD_OVERHEAD


def test_tp_prices_what_a_sharded_rank_holds(llama_bf16):
    """`fit --tp N` splits the model with the tensor-parallel code itself; its figures are what rank 0 of a real
    split holds: parameter bytes, K/V heads, and a load peak between its share's and the whole model's."""
    from hearthlm import LLM
    from hearthlm.distributed.mesh import Mesh
    from hearthlm.distributed.tensor_parallel import shard_model

    whole = fit.estimate(fit.load(llama_bf16), "bf16", context=64)
    for world in (2, 4):
        rank = fit.fit([str(llama_bf16)], context=64, formats=("bf16",), tp=world)[0]
        model = shard_model(LLM(llama_bf16, dtype="bfloat16").model, Mesh(rank=0, world=world))
        held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        assert rank.weights == held < whole.weights
        assert rank.kv_cache * world == whole.kv_cache  # 4 K/V heads split evenly
        # while loading, a rank holds its share and one whole layer (the split happens layer by layer)
        share = fit.estimate(fit.load(llama_bf16, world), "bf16", context=64).load_peak
        assert share < rank.load_peak < whole.load_peak and rank.tp == world
        assert any("per rank of" in n for n in rank.notes)


def test_tp_refuses_a_split_that_cannot_be_made(llama_bf16, capsys):
    with pytest.raises(ValueError, match="cannot be split over 3 ranks.*rank counts that work: 1, 2, 4"):
        fit.fit([str(llama_bf16)], formats=("bf16",), tp=3)
    assert main(["fit", "gemma-4-26B-A4B", "--tp", "3", "--bandwidth", "30"]) == 2
    assert "experts' width 704 does not divide among 3 ranks" in capsys.readouterr().err
    assert main(["fit", "gemma-4-E2B", "--tp", "0", "--bandwidth", "30"]) == 2
    assert "--tp must be at least 1" in capsys.readouterr().err
    names = {e.model for e in fit.fit(None, formats=("bf16",), tp=8)}  # Qwen2.5-7B: 28 heads; the rest divide by 8
    assert "gemma-4-26B-A4B" in names and "Qwen2.5-7B-Instruct" not in names  # models that cannot split are left out


def test_tp_splits_the_experts_of_an_moe_model():
    """Under --tp each of 26B-A4B's 128 experts keeps half its width on a rank: a rank holds half the model, plus
    what every rank keeps whole (norms, the router)."""
    whole = fit.fit(["gemma-4-26B-A4B"], formats=("bf16",))[0]
    rank = fit.fit(["gemma-4-26B-A4B"], formats=("bf16",), tp=2)[0]
    assert whole.weights / 2 < rank.weights < whole.weights / 2 * 1.001


def _held(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def test_pp_prices_the_largest_stage_and_the_whole_read(llama_bf16):
    """`fit --pp 2`: the weights and KV cache of the stage that holds the most, as real ranks load them; a token
    still reads the whole model (the stages run one after another)."""
    from hearthlm import LLM
    from hearthlm.distributed.mesh import Mesh

    whole = fit.estimate(fit.load(llama_bf16), "bf16", context=64)
    rank = fit.fit([str(llama_bf16)], context=64, formats=("bf16",), tp=2, split="pp")[0]
    stages = [LLM(llama_bf16, dtype="bfloat16", mesh=Mesh(r, 2, split="pp")) for r in range(2)]
    assert rank.weights == max(_held(s.model) for s in stages) < whole.weights
    layers = [len(range(*s.model.pp_stage)) for s in stages]
    assert rank.kv_cache == whole.kv_cache * max(layers) // sum(layers)  # its own layers' K/V only
    assert rank.bytes_per_token == whole.bytes_per_token and rank.split == "pp" and rank.load_peak < whole.load_peak
    assert main(["fit", str(llama_bf16), "--pp", "2", "--bandwidth", "30"]) == 0


def test_ep_prices_a_share_of_the_experts(checkpoint):
    """`fit --ep 2` on Qwen3-MoE: rank 0 holds half the experts whole, as a real rank of --ep loads them."""
    from hearthlm import LLM
    from hearthlm.distributed.mesh import Mesh

    folder = checkpoint("qwen3_moe")[1]
    rank = fit.fit([str(folder)], context=64, formats=("fp32",), tp=2, split="ep")[0]
    real = LLM(folder, dtype="float32", mesh=Mesh(0, 2, split="ep"))
    assert rank.weights == _held(real.model) and rank.split == "ep"
