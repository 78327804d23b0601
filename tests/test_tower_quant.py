"""Quantized vision / audio towers (`quant_towers`, `--quant-towers`): which weights take the text model's format,
that they compute what the float towers holding the dequantized weights compute, that the default leaves the towers
in their precision, `hearth quantize --quant-towers` round trips, and the bad combinations are refused.
What quantized towers lose in quality is measured by benchmarks/tower_quant.py (docs/multimodal.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors import safe_open
from test_multimodal_files import save_tiny_av

from hearthlm import LLM
from hearthlm.models.gemma4_media import ClippedLinear, Projection
from hearthlm.multimodal.audio import audio_features, load_audio
from hearthlm.multimodal.image import image_patches, open_image
from hearthlm.multimodal.towers import tower_quant
from hearthlm.quant.quantize import QuantSpec, quantizable
from hearthlm.quant.tensor import QuantTensor


@pytest.fixture(scope="module")
def av(tmp_path_factory) -> Path:
    """A tiny E2B-like checkpoint with both towers stored in bfloat16."""
    folder = tmp_path_factory.mktemp("av") / "tiny-av"
    save_tiny_av(folder)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(out / "a.png")
    soundfile.write(out / "c.wav", (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return image_patches(open_image(str(out / "a.png")), 70), audio_features(load_audio(str(out / "c.wav")))


def _outputs(llm: LLM, media) -> list[torch.Tensor]:
    image, clip = media
    towers = llm.media_encoder.towers
    return towers.encode_images([image]) + towers.encode_audio([clip])


def _modules(llm: LLM) -> dict[str, torch.nn.Module]:
    towers = llm.media_encoder.towers
    return {f"{kind}.{i}": m for kind in ("vision", "audio") for i, m in enumerate(towers._get(kind))}


def _linear_weights(llm: LLM) -> dict[str, torch.Tensor | QuantTensor]:
    return {
        f"{top}.{name}": sub.weight
        for top, module in _modules(llm).items()
        for name, sub in module.named_modules()
        if isinstance(sub, (ClippedLinear, Projection))
    }


def _dequantized(llm: LLM) -> LLM:
    """The same towers with every QuantTensor replaced by its float values (tensor.py's reference)."""
    for module in _modules(llm).values():
        for name, sub in list(module.named_modules()):
            if isinstance(sub, QuantTensor):
                owner, _, attr = name.rpartition(".")
                parent = module.get_submodule(owner) if owner else module
                delattr(parent, attr)
                setattr(parent, attr, torch.nn.Parameter(sub.dequantize(), requires_grad=False))
    return llm


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_towers_quantize_the_linear_layers_only(av, fmt):
    """Every clipped linear layer's and projection's weight whose width the format takes is quantized like the text
    model's; the rest of the towers (patch embedding, positions, norms, clip bounds, convolutions) is as stored."""
    plain, llm = LLM(av, dtype="float32", quant=fmt), LLM(av, dtype="float32", quant=fmt, quant_towers=True)
    spec = QuantSpec(8, None) if fmt == "int8" else QuantSpec(4, 32)
    assert plain.tower_quant is None and llm.tower_quant == spec
    float_weights, weights = _linear_weights(plain), _linear_weights(llm)
    assert float_weights.keys() == weights.keys()
    quantized = {k for k, w in weights.items() if isinstance(w, QuantTensor)}
    assert quantized == {k for k, w in float_weights.items() if quantizable(w, spec)}
    assert len(quantized) >= 10 and len(quantized) < len(weights)  # this tiny model has widths int4/int8 cannot take
    assert all(weights[k].layout == (spec.bits, spec.group or weights[k].shape[-1], fmt == "int4") for k in quantized)
    for top, module in _modules(llm).items():
        rest = dict(_modules(plain)[top].named_parameters())
        assert all(torch.equal(p, rest[n]) and p.dtype == rest[n].dtype for n, p in module.named_parameters())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_towers_compute_their_dequantized_weights(av, media, fmt, monkeypatch):
    """Off the CPU kernels (the path a GPU takes) the quantized towers give the outputs of the float towers holding
    the dequantized weights; on the CPU's integer kernels, within their rounding of activations to int8."""
    ref = _outputs(_dequantized(LLM(av, dtype="float32", quant=fmt, quant_towers=True)), media)
    kernels = _outputs(LLM(av, dtype="float32", quant=fmt, quant_towers=True), media)
    monkeypatch.setattr("hearthlm.kernels.cpu.available", lambda: False)
    exact = _outputs(LLM(av, dtype="float32", quant=fmt, quant_towers=True), media)
    plain = _outputs(LLM(av, dtype="float32", quant=fmt), media)
    for r, e, k, p in zip(ref, exact, kernels, plain):
        scale = r.abs().max()
        assert ((e - r).abs().max() / scale).item() <= 1e-5
        assert ((k - r).abs().max() / scale).item() <= 0.05
        assert ((p - r).abs().max() / scale).item() > 1e-4  # quantizing moved them: the check above means something


def test_default_keeps_the_towers_in_their_precision(av, media):
    plain = LLM(av, dtype="float32", quant="int8")
    assert plain.tower_quant is None
    assert not any(isinstance(w, QuantTensor) for w in _linear_weights(plain).values())
    assert {w.dtype for w in _linear_weights(plain).values()} == {torch.bfloat16}  # as stored


def hearth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hearthlm.cli", *args], capture_output=True, text=True, timeout=600)


def test_quantize_command_writes_quantized_towers(av, media, tmp_path):
    out = tmp_path / "int4-towers"
    result = hearth("quantize", str(av), "--to", "int4", "--quant-towers", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["towers"] == "int4-g32"
    with safe_open(out / "towers.safetensors", "pt") as f:
        names = set(f.keys())
    assert any(n.endswith(".linear.weight.qdata") for n in names)
    assert "model.embed_vision.embedding_projection.weight.qdata" in names
    assert "model.vision_tower.patch_embedder.input_proj.weight" in names  # not a linear layer: as stored
    loaded = LLM(out, dtype="float32")  # quantized as stored, no flag needed
    fresh = LLM(av, dtype="float32", quant="int4", quant_towers=True)
    assert loaded.tower_quant == fresh.tower_quant == QuantSpec(4, 32)
    mine, theirs = _linear_weights(loaded), _linear_weights(fresh)
    assert {k for k, w in mine.items() if isinstance(w, QuantTensor)} == {
        k for k, w in theirs.items() if isinstance(w, QuantTensor)
    }
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded, media), _outputs(fresh, media)))
    again = LLM(out, dtype="float32", quant_towers=True)  # the stored format: nothing more to do
    assert again.tower_quant == QuantSpec(4, 32)


def test_bad_combinations_are_refused(av, tmp_path):
    with pytest.raises(ValueError, match=r"text model is not quantized: add quant='int8' or 'int4'"):
        LLM(av, quant_towers=True)
    with pytest.raises(ValueError, match="has no vision or audio tower: quant_towers has nothing to quantize"):
        LLM("hearth-demo", quant="int8", quant_towers=True)
    with pytest.raises(ValueError, match="a GGUF model, whose towers are llama.cpp's mmproj file"):
        tower_quant(True, tmp_path / "model.gguf", None, QuantSpec(8, None))
    result = hearth("run", "hearth-demo-vision", "hi", "--quant-towers", "--max-tokens", "1")
    assert result.returncode != 0 and "--quant int8 --quant-towers" in result.stderr
    result = hearth("quantize", "hearth-demo", "--to", "int8", "--quant-towers", "-o", str(tmp_path / "x"))
    assert result.returncode != 0 and "has no vision or audio tower" in result.stderr
    assert not (tmp_path / "x").exists()


def test_serve_passes_the_option_on(monkeypatch):
    from hearthlm import server
    from hearthlm.cli import main

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.update(kw))
    assert main(["serve", "--quant", "int8", "--quant-towers"]) == 0 and seen["quant_towers"] is True
    with pytest.raises(ValueError, match="has no vision or audio tower"):  # server.load hands it to LLM
        server.load("hearth-demo", quant="int8", quant_towers=True)
