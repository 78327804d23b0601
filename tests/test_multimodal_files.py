"""Gemma 4's towers in the files and commands around them (issue 19, items 4-5): `hearth run --image/--audio` and
`/image` `/audio` in `hearth chat`; `hearth quantize` and `LLM(quant=...)` leaving the towers in their precision;
`hearth fit` counting tower memory and the K/V of image tokens; llama.cpp's mmproj GGUF files beside a text GGUF.

The checkpoint is test_multimodal.py's E2B-like one (vision and audio towers, clipped linear layers), made by
transformers. The mmproj file is written here as llama.cpp's converter writes it (Gemma4VisionAudioModel in
convert_hf_to_gguf.py): names through the gguf package's own tensor-name map, the same reshapes, softplus on the
audio per_dim_scale, scalars as 1-element tensors, the same metadata keys.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import soundfile
import torch
import transformers as tf
from gguf_files import write_gguf
from PIL import Image
from safetensors import safe_open
from test_multimodal import IDS, SPECIALS, VARIANTS, _tokenizer

from hearthlm import LLM, SamplingParams, fit
from hearthlm.multimodal import ModalityError
from hearthlm.weights.gguf import GGUFError
from hearthlm.weights.mmproj import find_mmproj

GREEDY = ("--temperature", "0", "--max-tokens", "6", "--dtype", "float32")


def save_tiny_av(folder: Path) -> tf.Gemma4ForConditionalGeneration:
    """Saves a tiny E2B-like checkpoint with both towers in `folder`, its towers stored in bfloat16 (so that 'their
    precision' is not float32 by accident); returns the transformers model."""
    config = tf.Gemma4Config(**VARIANTS["e2b"], **IDS)
    torch.manual_seed(0)
    ref = tf.Gemma4ForConditionalGeneration(config).eval()
    for name, p in ref.named_parameters():
        if "language_model" not in name:
            p.data = p.data.bfloat16()
    ref.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return ref


@pytest.fixture(scope="module")
def av(tmp_path_factory) -> tuple[Path, tf.Gemma4ForConditionalGeneration]:
    folder = tmp_path_factory.mktemp("av") / "tiny-av"
    return folder, save_tiny_av(folder)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(out / "a.png")
    Image.fromarray((rng.random((50, 40, 3)) * 255).astype(np.uint8)).save(out / "b.jpg")
    soundfile.write(out / "c.wav", (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return {"png": out / "a.png", "jpg": out / "b.jpg", "wav": out / "c.wav"}


def hearth(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hearthlm.cli", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0)


# -- hearth run / hearth chat ------------------------------------------------------------------------------------
def test_run_with_images_and_audio_answers_as_the_api(av, media):
    folder, _ = av
    llm = LLM(folder, dtype="float32")
    parts = [{"type": "image", "image": str(media["png"])}, {"type": "image", "image": str(media["jpg"])}]
    parts += [{"type": "audio", "audio": str(media["wav"])}, {"type": "text", "text": "What is it?"}]
    expected = llm.chat([{"role": "user", "content": parts}], _params(), image_tokens=70).text
    args = ["--image", str(media["png"]), "--image", str(media["jpg"]), "--audio", str(media["wav"])]
    result = hearth("run", str(folder), "What is it?", *args, "--image-tokens", "70", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    other = llm.chat([{"role": "user", "content": parts[1:]}], _params(), image_tokens=70).text
    assert other != expected  # the images reach the model: without the first one the answer differs


def test_run_media_errors_are_clear(av, media, tmp_path):
    folder, _ = av
    result = hearth("run", str(folder), "hi", "--image", str(tmp_path / "nope.png"))
    assert result.returncode == 2 and "image file" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    text_only = tmp_path / "text-only"
    shutil.copytree(folder, text_only)
    cfg = json.loads((text_only / "config.json").read_text())
    del cfg["vision_config"], cfg["audio_config"]
    (text_only / "config.json").write_text(json.dumps(cfg))
    result = hearth("run", str(text_only), "hi", "--audio", str(media["wav"]), *GREEDY)
    assert result.returncode == 2 and "does not take audio input (it takes text)" in result.stderr
    result = hearth("run", str(folder), "hi", "--raw", "--image", str(media["png"]), *GREEDY)
    assert result.returncode == 2 and "--image / --audio needs the chat template" in result.stderr


def test_chat_attaches_files_to_the_next_message(av, media):
    folder, _ = av
    llm = LLM(folder, dtype="float32")
    first = [
        {"role": "user", "content": [{"type": "image", "image": str(media["png"])}, {"type": "text", "text": "A"}]}
    ]
    reply1 = llm.chat(first, _params(), image_tokens=70).text
    second = first + [{"role": "assistant", "content": reply1}]
    second += [
        {"role": "user", "content": [{"type": "audio", "audio": str(media["wav"])}, {"type": "text", "text": "B"}]}
    ]
    reply2 = llm.chat(second, _params(), image_tokens=70).text
    script = f"/image {media['png']}\nA\n/image /no/such.png\n/audio '{media['wav']}'\nB\n/exit\n"
    result = hearth("chat", str(folder), "--image-tokens", "70", *GREEDY, stdin=script)
    assert result.returncode == 0, result.stderr
    turns = result.stdout.split(">>> ")  # /image and /audio print nothing on stdout
    assert turns[1:] == ["", reply1 + "\n", "", "", reply2 + "\n", ""]
    assert "attached a.png" in result.stderr and "/no/such.png does not exist" in result.stderr


def test_chat_refuses_a_file_the_model_cannot_take(av, media, monkeypatch, capsys):
    from hearthlm import cli

    demo = LLM()  # the text-only demo model
    lines = iter([f"/image {media['png']}", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(cli, "_load", lambda args: demo)
    assert cli.main(["chat"]) == 0
    assert "hearth-demo does not take image input" in capsys.readouterr().err


# -- quantization leaves the towers alone ------------------------------------------------------------------------
def _tower_outputs(llm: LLM, media) -> list[torch.Tensor]:
    from hearthlm.multimodal.audio import audio_features, load_audio
    from hearthlm.multimodal.image import image_patches, open_image

    towers = llm.media_encoder.towers
    images = towers.encode_images([image_patches(open_image(str(media["png"])), 70)])
    return images + towers.encode_audio([audio_features(load_audio(str(media["wav"])))])


def _tower_weights(llm: LLM) -> dict[str, torch.Tensor]:
    tower, proj = llm.media_encoder.towers._get("vision")
    return {f"tower.{n}": p for n, p in tower.named_parameters()} | {f"proj.{n}": p for n, p in proj.named_parameters()}


def test_quantized_models_keep_their_towers_in_their_precision(av, media, tmp_path):
    folder, _ = av
    plain = LLM(folder, dtype="float32")
    base = _tower_outputs(plain, media)
    weights = _tower_weights(plain)
    # as stored: the linear layers' bf16 weights kept, the rest float32 (the float32 towers compute with both)
    assert {w.dtype for w in weights.values()} == {torch.float32, torch.bfloat16}
    for quant in ("int8", "int4"):
        llm = LLM(folder, dtype="float32", quant=quant)
        assert all(torch.equal(a, b) for a, b in zip(_tower_outputs(llm, media), base))
        mine = _tower_weights(llm)
        assert mine.keys() == weights.keys()
        assert all(mine[k].dtype == w.dtype and torch.equal(mine[k], w) for k, w in weights.items())
    out = tmp_path / "int8"
    result = hearth("quantize", str(folder), "--to", "int8", "-o", str(out))
    assert result.returncode == 0, result.stderr
    with safe_open(folder / "model.safetensors", "pt") as src, safe_open(out / "towers.safetensors", "pt") as dst:
        towers = {k for k in src.keys() if "_tower." in k or ".embed_vision." in k or ".embed_audio." in k}
        assert set(dst.keys()) == towers
        assert all(torch.equal(src.get_tensor(k), dst.get_tensor(k)) for k in towers)  # same values, same dtype
    quantized = LLM(out, dtype="float32")
    assert quantized.quant == "int8" and quantized.modalities == {"text", "image", "audio"}
    assert all(torch.equal(a, b) for a, b in zip(_tower_outputs(quantized, media), base))


# -- hearth fit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gemma-4-E2B", "gemma-4-31B"])
def test_fit_counts_towers_as_transformers_builds_them(name):
    hf = json.loads((fit.KNOWN_DIR / f"{name}.json").read_text())
    text = dict(hidden_size=hf["hidden_size"], num_hidden_layers=1, vocab_size=16, hidden_size_per_layer_input=0)
    config = tf.Gemma4Config(text_config=text, vision_config=hf["vision_config"], audio_config=hf.get("audio_config"))
    with torch.device("meta"):
        ref = tf.Gemma4ForConditionalGeneration(config).model
    m = fit.known_model(name)
    stored = lambda *ms: sum(t.numel() for m in ms for t in m.state_dict().values())  # noqa: E731  (clip bounds too)
    vision = stored(ref.vision_tower, ref.embed_vision)
    assert m.towers["image"].params == vision
    if "audio_config" in hf:
        audio = stored(ref.audio_tower, ref.embed_audio)
        assert m.towers["audio"].params == audio
    else:
        assert "audio" not in m.towers


def _held(llm: LLM) -> int:
    """Bytes of the loaded towers and projections: parameters, and the quantized weights' buffers."""
    modules = [m for kind in ("vision", "audio") for m in llm.media_encoder.towers._get(kind)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fit_prices_quantized_towers_as_loaded(av, fmt, capsys):
    """--quant-towers: the towers' linear weights in the text model's format, priced as `LLM(quant_towers=True)`
    holds them (a few weights too narrow to quantize stay as stored); without it, as stored."""
    from hearthlm import cli

    folder, _ = av
    m = fit.load(str(folder))
    e = fit.estimate(m, fmt, context=64, images=1, audio_clips=1, quant_towers=True)
    assert e.towers == _held(LLM(folder, dtype="float32", quant=fmt, quant_towers=True))
    assert e.towers < fit.estimate(m, fmt, context=64, images=1, audio_clips=1).towers
    assert (
        fit.estimate(m, "bf16", context=64, images=1, quant_towers=True).towers
        == fit.estimate(m, "bf16", context=64, images=1).towers
    )  # the towers take a quantized text model's format only
    assert cli.main(["fit", str(folder), "--ram", "64", "--vram", "0", "--bandwidth", "40", "--images", "1",
                 "--quant-towers", "--json", "--context", "64"]) == 0  # fmt: skip
    rows = {r["format"]: r for r in json.loads(capsys.readouterr().out)["estimates"]}
    assert rows[fmt]["towers"] == fit.estimate(m, fmt, context=64, images=1, quant_towers=True).towers


def test_fit_adds_tower_memory_and_image_token_kv(av):
    folder, _ = av
    m = fit.load(str(folder))
    plain = fit.estimate(m, "bf16", context=64)
    e = fit.estimate(m, "bf16", context=64, images=2, image_tokens=70, audio_clips=1)
    assert e.media_tokens == 2 * 72 + 752  # within the tiny model's 1024 positions
    assert e.media_kv == fit.kv_cache_bytes(m.config, 64 + e.media_tokens) - fit.kv_cache_bytes(m.config, 64) > 0
    assert e.towers == _held(LLM(folder, dtype="float32"))  # bf16 linear weights kept as stored, the rest float32
    assert e.ram - plain.ram > e.towers + e.media_kv
    int4 = fit.estimate(m, "int4", context=64, images=2, image_tokens=70, audio_clips=1)
    assert int4.towers == e.towers  # quantized models keep their towers in their precision by default
    with pytest.raises(ValueError, match="no audio tower"):
        fit.estimate(fit.known_model("gemma-4-31B"), audio_clips=1)
    rows = fit.fit(None, None, 4096, 1, ("bf16",), images=1, audio_clips=1)
    assert {r.model for r in rows} == {"gemma-4-E2B", "gemma-4-E4B"}  # the models that hear


# -- llama.cpp's mmproj files ------------------------------------------------------------------------------------
def _write_mmproj(ref: tf.Gemma4ForConditionalGeneration, path: Path, vision: bool = True, audio: bool = True) -> Path:
    """An mmproj file as convert_hf_to_gguf.py's Gemma4VisionAudioModel writes one (F32 tensors)."""
    cfg = ref.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 64)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if vision:
        v = cfg.vision_config
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(cfg.text_config.hidden_size)
        w.add_vision_image_size(224)
        w.add_vision_patch_size(v.patch_size)
        w.add_vision_embedding_length(v.hidden_size)
        w.add_vision_feed_forward_length(v.intermediate_size)
        w.add_vision_block_count(v.num_hidden_layers)
        w.add_vision_head_count(v.num_attention_heads)
        w.add_vision_image_mean([0.0, 0.0, 0.0])
        w.add_vision_image_std([1.0, 1.0, 1.0])
        w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
        w.add_vision_attention_layernorm_eps(1e-6)
    if audio:
        a = cfg.audio_config
        w.add_clip_has_audio_encoder(True)
        w.add_audio_projection_dim(cfg.text_config.hidden_size)
        w.add_audio_embedding_length(a.hidden_size)
        w.add_audio_feed_forward_length(a.hidden_size * 4)
        w.add_audio_block_count(a.num_hidden_layers)
        w.add_audio_head_count(a.num_attention_heads)
        w.add_clip_audio_projector_type(gguf.VisionProjectorType.GEMMA4A)
        w.add_audio_num_mel_bins(128)
        w.add_audio_attention_layernorm_eps(1e-6)
    for name, t in ref.state_dict().items():
        is_audio = "audio_tower" in name or "embed_audio" in name
        if "language_model" in name or name == "lm_head.weight" or (is_audio and not audio) or not (is_audio or vision):
            continue
        data = t.detach().float()
        if data.dim() == 0:
            data = data.unsqueeze(0)
        if is_audio:
            name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
            if name.endswith(("per_dim_key_scale", "per_dim_scale")):
                name, data = name + ".weight", torch.nn.functional.softplus(data)
            if "lconv1d.depthwise_conv1d" in name and name.endswith(".weight"):
                data = data.reshape(data.shape[0], data.shape[2])
        else:
            name = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(
                ".linear.weight", ".weight"
            )
            if name.endswith(("layer_scalar", "position_embedding_table")):
                name += ".weight"
            if name.endswith("patch_embedder.input_proj.weight"):
                n, k = data.shape
                p = int((k // 3) ** 0.5)
                data = data.reshape(n, p, p, 3).permute(0, 3, 1, 2).contiguous()
        suffixes = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
        gname = names.get_name(name, try_suffixes=suffixes)
        assert gname is not None, name
        w.add_tensor(gname, data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_vocab_metadata(folder: Path, vocab_size: int, chat_template: bool = True):
    """A GGUF writer's tokenizer metadata for the test tokenizer saved in `folder` (byte-level, Gemma 4's special
    tokens), padded to `vocab_size` with unused tokens; with the folder's chat template unless `chat_template` is off."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += ["!!"]  # one merge: the file needs a merge list (the prompts here never hold "!!")
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab_size)]

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(["! !"])
        w.add_bos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        if chat_template:
            w.add_chat_template((folder / "chat_template.jinja").read_text())

    return metadata


def _text_gguf(folder: Path, ref, path: Path) -> Path:
    """The text model as a GGUF, with the test tokenizer's byte-level vocabulary and chat template."""
    metadata = byte_vocab_metadata(folder, ref.config.text_config.vocab_size)
    state = [
        (n.replace("model.language_model.", "model."), t.detach().float().numpy())
        for n, t in ref.state_dict().items()
        if n.startswith("model.language_model.")
    ]
    cfg = ref.config.text_config.to_dict() | {"eos_token_id": 1, "tie_word_embeddings": True}
    return write_gguf(path, "Gemma4ForCausalLM", cfg, state, gguf.GGMLQuantizationType.F32, metadata)


@pytest.fixture(scope="module")
def ggufs(av, tmp_path_factory):
    folder, ref = av
    out = tmp_path_factory.mktemp("gguf")
    text = _text_gguf(folder, ref, out / "tiny-av-f32.gguf")
    _write_mmproj(ref, out / "mmproj-tiny-av-f16.gguf")  # F32 inside; the name is what llama.cpp's repos use
    return text, _write_mmproj(ref, out / "mmproj-tiny-av-f32.gguf")


def test_mmproj_beside_a_text_gguf_gives_it_eyes_and_ears(av, ggufs, media):
    folder, _ = av
    text, mmproj = ggufs
    assert find_mmproj(text) == mmproj  # several: the widest type wins
    model = LLM(text, dtype="float32")
    assert model.modalities == {"text", "image", "audio"}
    reference = LLM(folder, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(media["png"])},
                                             {"type": "audio", "audio": str(media["wav"])},
                                             {"type": "text", "text": "What is it?"}]}]  # fmt: skip
    ours = model.media_prompt(messages, image_tokens=70)
    assert ours.ids == reference.media_prompt(messages, image_tokens=70).ids
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(_tower_outputs(model, media), _tower_outputs(reference, media))
    )
    got = model.logits(messages=messages, image_tokens=70)
    assert (got - reference.logits(messages=messages, image_tokens=70)).abs().max() <= 1e-4
    assert (
        model.chat(messages, _params(), image_tokens=70).token_ids
        == reference.chat(messages, _params(), image_tokens=70).token_ids
    )


def test_mmproj_by_path_and_wrong_files(av, ggufs, media, tmp_path):
    _, ref = av
    text, mmproj = ggufs
    alone = tmp_path / "alone.gguf"
    shutil.copyfile(text, alone)
    assert LLM(alone, dtype="float32").modalities == {"text"}  # nothing beside it
    vision_only = _write_mmproj(ref, tmp_path / "elsewhere.gguf", audio=False)
    llm = LLM(alone, dtype="float32", mmproj=vision_only)
    assert llm.modalities == {"text", "image"}
    with pytest.raises(ModalityError, match="does not take audio input"):
        llm.media_prompt([{"role": "user", "content": [{"type": "audio", "audio": str(media["wav"])}]}])
    result = hearth("run", str(alone), "hi", "--mmproj", str(vision_only), "--image", str(media["png"]), *GREEDY)
    assert result.returncode == 0, result.stderr
    with pytest.raises(GGUFError, match="not a multimodal projector"):
        LLM(alone, dtype="float32", mmproj=text)
    wrong = tmp_path / "wrong.gguf"
    w = gguf.GGUFWriter(str(wrong), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_tensor("mm.input_projection.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'gemma4v' for images"):
        LLM(alone, dtype="float32", mmproj=wrong)
    shutil.copyfile(wrong, tmp_path / "mmproj-other.gguf")  # beside the model but made for another: text only
    with pytest.warns(UserWarning, match="not its towers"):
        assert LLM(alone, dtype="float32").modalities == {"text"}


def test_store_lists_what_a_model_takes(av, ggufs, tmp_path):
    from hearthlm import store

    folder, _ = av
    text, _ = ggufs
    assert store.towers(folder) == ({"image", "audio"}, {"image", "audio"})
    assert store.towers(text) == ({"image", "audio"}, {"image", "audio"})
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    shutil.copyfile(folder / "config.json", stripped / "config.json")
    with safe_open(folder / "model.safetensors", "pt") as f:
        from safetensors.torch import save_file

        save_file({k: f.get_tensor(k) for k in f.keys() if "language_model" in k}, str(stripped / "model.safetensors"))
    entry = store.ModelEntry("stripped", stripped, "local")
    assert entry.inputs() == "text (image, audio: towers not pulled)"
    assert store.ModelEntry("av", folder, "local").inputs() == "text, image, audio"
