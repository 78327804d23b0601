"""Checkpoint loading: sharded files, dtypes, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hearthlm import LLM
from hearthlm.config import ConfigError
from hearthlm.weights.safetensors import CheckpointError


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of the tiny Qwen3-MoE checkpoint that a test may break."""
    _, src = checkpoint("qwen3_moe")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_identically(checkpoint, tmp_path):
    ref, single = checkpoint("gemma4_all")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ids = list(range(3, 40))
    assert torch.equal(LLM(tmp_path / "sharded", dtype="float32").logits(ids), LLM(single, dtype="float32").logits(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_accurate_as_transformers_in_the_same_dtype(checkpoint, dtype):
    ref, folder = checkpoint("gemma4_all")
    ref_half = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
    half = LLM(folder, dtype=dtype)
    assert half.model.layers[0].attn.qkv.weight.dtype == dtype
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        exact, theirs = ref(ids).logits[0], ref_half(ids).logits[0].float()
    ours = half.logits(ids[0].tolist())
    assert ours.dtype == torch.float32
    our_err, their_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert our_err <= 1.5 * their_err, (our_err, their_err)
    # PLE is a gather: its table keeps the checkpoint's dtype instead of a converted copy.
    assert half.model.ple.table.dtype == torch.float32


def test_gemma3_norms_are_one_plus_weight_in_float32_and_quantized_folders_keep_them(checkpoint, tmp_path):
    """Gemma 3's norms scale by 1 + w with the 1 added in float32 (as transformers does): a bf16 model keeps them
    in float32, and a folder `hearth quantize` wrote holds them so, loading without adding the 1 twice."""
    from hearthlm.cli import main

    ref, folder = checkpoint("gemma3")
    ref_bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ref_bf16.save_pretrained(tmp_path / "bf16")
    llm = LLM(tmp_path / "bf16", dtype=torch.bfloat16)
    for ours, w in ((llm.model.layers[0].input_norm.weight, ref_bf16.model.layers[0].input_layernorm.weight),
                    (llm.model.norm.weight, ref_bf16.model.norm.weight)):  # fmt: skip
        assert ours.dtype == torch.float32 and torch.equal(ours, 1 + w.float())
        assert not torch.equal(ours, (1 + w.float()).bfloat16().float())  # what a bf16 copy would hold
    out = tmp_path / "int8"
    assert main(["quantize", str(folder), "--to", "int8", "-o", str(out)]) == 0
    ids = list(range(3, 30))
    assert torch.equal(LLM(out).logits(ids), LLM(folder, quant="int8").logits(ids))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types must list 6"),
        ({"sliding_window": None}, "sliding_window is null but layer_types has sliding layers"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0}}}, "RoPE type 'yarn'"),
    ],
)
def test_gemma3_configs_we_cannot_run_are_refused(change, message, checkpoint, tmp_path):
    _, src = checkpoint("gemma3")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text()) | change
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        LLM(dst)
    assert str(dst / "config.json") in str(e.value)


def test_unknown_architecture_lists_the_supported_ones(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture.*FalconForCausalLM.*Gemma4ForCausalLM"):
        LLM(folder)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        LLM(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local checkpoint folder"):
        LLM(tmp_path / "nowhere")


def test_missing_tensor_is_named(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*missing"):
        LLM(folder)


def test_shape_mismatch_names_tensor_and_file(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100  # the dense layer's real width is 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' \(model\.safetensors\).*config"):
        LLM(folder)


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(folder)


def test_garbage_file(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LLM(folder)


def test_missing_shard(checkpoint, tmp_path):
    ref, _ = checkpoint("llama")
    ref.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    victim = sorted((tmp_path / "s").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: .*{victim.name}"):
        LLM(tmp_path / "s")


def test_bad_inputs_get_clear_errors(checkpoint):
    _, folder = checkpoint("llama")
    llm = LLM(folder, dtype="float32")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.logits([1, 2, 10_000])
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="longer than the model's context"):
        llm.logits([5] * (llm.config.max_position + 1))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="unknown dtype"):
        LLM(folder, dtype="float8")
    with pytest.raises(ValueError, match="equal length"):
        llm.logits([[5, 6], [7]])


@pytest.mark.parametrize("layers", [6, 12])
def test_gemma4_per_layer_config_as_transformers_saves_it(tmp_path, layers):
    """transformers 5 writes per_layer_config keys zero-padded once there are 10+ layers ("04")."""
    from transformers import Gemma4TextConfig

    from hearthlm.weights.loader import read_model_config

    types = ["sliding_attention"] * 3 + ["full_attention"]
    config = Gemma4TextConfig(
        num_hidden_layers=layers,
        layer_types=(types * 3)[:layers],
        head_dim=16,
        global_head_dim=32,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
    )
    config.architectures = ["Gemma4ForCausalLM"]
    config.save_pretrained(tmp_path)
    _, cfg = read_model_config(tmp_path)
    for i, spec in enumerate(cfg.layers):
        full = config.layer_types[i] == "full_attention"
        assert (spec.head_dim, spec.num_kv_heads, spec.k_eq_v) == ((32, 1, True) if full else (16, 2, False))


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "sees no CUDA GPU"), ("cuda:0", "sees no CUDA GPU"), ("tpu", "use cpu, cuda or cuda:N"),
     ("warp-drive", "unknown device 'warp-drive'")],
)  # fmt: skip
def test_a_device_this_machine_lacks_is_refused_before_loading(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        LLM(None, device=device)
    monkeypatch.setenv("HEARTHLM_DEVICE", device)  # the environment's choice is checked the same way
    with pytest.raises(ValueError, match=message):
        LLM(None)


def test_cli_device_error_names_the_fix(monkeypatch, capsys):
    from hearthlm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", "Hi", "--device", "cuda", "--max-tokens", "2"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_a_gpu_index_past_the_last_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: this machine has 1 CUDA GPU"):
        LLM(None, device="cuda:3")
