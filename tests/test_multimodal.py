"""Gemma 4 with images and audio, against transformers on tiny random checkpoints of three variants:
- e2b: E2B-like text model (per-layer embeddings, KV-shared layers, double-wide MLP), vision and audio towers,
  clipped linear layers in both towers, causal attention everywhere;
- moe26b: 26B-A4B-like (experts beside the dense MLP, k = v on full layers), a standardising vision tower, and
  image tokens attending to each other in both directions on sliding layers;
- dense31b: 31B-like (dense, k = v), clipped and standardising vision tower, bidirectional image spans.

Tolerances: tower outputs and logits (end to end, and with the reference tower outputs spliced) max |diff| <= 1e-4
in fp32; greedy tokens identical;
image patches bit-identical to transformers' PIL image processor; log-mel features within 1e-5 (its FFT runs in
float32 like ours, in another order).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import transformers as tf
from checkpoints import perturb
from PIL import Image

from hearthlm import LLM, SamplingParams
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens
from hearthlm.multimodal import MediaDecodeError, MediaSizeError, ModalityError
from hearthlm.multimodal.audio import audio_features, load_audio
from hearthlm.multimodal.image import BUDGETS, image_patches, open_image

TOL = 1e-4
VOCAB = 288  # the byte-level test tokenizer has 279 tokens
SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>", "<|audio>",
    "<|audio|>", "<audio|>", "<|video|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
]  # fmt: skip
IDS = dict(boi_token_id=6, image_token_id=7, eoi_token_id=8, boa_token_id=9, audio_token_id=10, eoa_token_index=11)


def _text(**over) -> dict:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=1024, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
    )  # fmt: skip
    return base | over


def _vision(**over) -> dict:
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, head_dim=16)
    return base | dict(num_key_value_heads=2) | over


VARIANTS = {
    "e2b": dict(
        text_config=_text(
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
            attention_k_eq_v=False,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
        ),
        vision_config=_vision(use_clipped_linears=True),
        audio_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            subsampling_conv_channels=[128, 8],
            output_proj_dims=48,
        ),
    ),  # fmt: skip
    "moe26b": dict(
        text_config=_text(
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=24,
            use_bidirectional_attention="vision",
        ),
        vision_config=_vision(standardize=True),
    ),  # fmt: skip
    "dense31b": dict(
        text_config=_text(use_bidirectional_attention="vision"),
        vision_config=_vision(use_clipped_linears=True, standardize=True, num_key_value_heads=1),
    ),
}


class _Processor(tf.Gemma4Processor):
    """transformers' Gemma4Processor without a video processor (that one needs torchvision, not installed)."""

    def check_argument_for_proper_class(self, name, arg):
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    names = ("image", "boi", "eoi", "audio", "boa", "eoa")
    marks = ("<|image|>", "<|image>", "<image|>", "<|audio|>", "<|audio>", "<audio|>")
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={f"{n}_token": m for n, m in zip(names, marks)},
    )  # fmt: skip
    template = open(__file__.rsplit("/", 1)[0] + "/data/chat_templates/gemma4-e2b-it.jinja").read()
    fast.chat_template = template
    assert [fast.convert_tokens_to_ids(m) for m in marks] == [7, 6, 8, 10, 9, 11]
    return fast


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """variant(name) -> (transformers model, processor, hearthlm LLM in float32), built once per module."""
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            config = tf.Gemma4Config(**VARIANTS[name], **IDS)
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            ref = tf.Gemma4ForConditionalGeneration(config).eval()
            perturb(ref, seed=sum(map(ord, name)))
            for n, b in ref.named_buffers():  # clipping bounds that clip some values, not all
                if n.endswith(("input_min", "output_min", "input_max", "output_max")):
                    b.fill_(-1.5 if n.endswith("min") else 1.5)
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder)
            # Read back: perturb also re-drew buffers the checkpoint does not store (the audio logit cap, timescales).
            ref = tf.Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
            ref.config._attn_implementation = "eager"
            # transformers' default attention for the vision tower, as ours runs it: eager's separate matmul and
            # softmax put the two towers 6x further apart (5.7e-6 against 9.5e-7), all of it float32 rounding
            ref.config.vision_config._attn_implementation = "sdpa"
            tok = _tokenizer()
            tok.save_pretrained(folder)
            proc = _Processor(
                feature_extractor=tf.Gemma4AudioFeatureExtractor(), image_processor=tf.Gemma4ImageProcessorPil(),
                tokenizer=tok, video_processor=None, chat_template=tok.chat_template,
            )  # fmt: skip
            made[name] = (ref, proc, LLM(folder, dtype="float32"))
        return made[name]

    return get


def _image(seed: int, h: int, w: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, len(mode))) * 255).astype(np.uint8), mode)


def _clip(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _messages(name: str) -> tuple[list[dict], list[Image.Image], list[np.ndarray]]:
    """Two images in two turns, and (e2b) two audio clips; text around them."""
    images = [_image(1, 50, 70), _image(2, 120, 40)]
    clips = [_clip(3, 8000), _clip(4, 3000)] if name == "e2b" else []
    first = [{"type": "text", "text": "Look:"}, {"type": "image", "image": images[0]}]
    first += [{"type": "audio", "audio": (clips[0], 16_000)}] if clips else []
    second = [{"type": "image", "image": images[1]}, {"type": "text", "text": "and this?"}]
    second += [{"type": "audio", "audio": (clips[1], 16_000)}] if clips else []
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": second},
    ]
    return messages, images, clips


def _reference_inputs(proc, messages, images, clips):
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"audio": clips} if clips else {}
    return proc(text=text, images=images, return_tensors="pt", images_kwargs={"max_soft_tokens": 70}, **kwargs)


# -- towers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_towers_match_transformers(name, variant):
    ref, proc, llm = variant(name)
    images = [_image(5, 50, 70), _image(6, 200, 90), _image(7, 48, 48)]
    got = llm.media_encoder.towers.encode_images([image_patches(open_image(im), 70) for im in images])
    r = proc.image_processor(images=images, max_soft_tokens=70, return_tensors="pt")
    with torch.no_grad():
        expected = ref.model.get_image_features(r["pixel_values"], r["image_position_ids"]).pooler_output
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= TOL
    if name != "e2b":
        assert "audio" not in llm.modalities
        return
    clips = [_clip(8, 8000), _clip(9, 20_000), _clip(10, 161)]
    got = llm.media_encoder.towers.encode_audio([audio_features(c) for c in clips])
    f = proc.feature_extractor(clips, return_tensors="pt")
    with torch.no_grad():
        out = ref.model.get_audio_features(f["input_features"], f["input_features_mask"])
    expected = [o[m] for o, m in zip(out.pooler_output, out.attention_mask)]
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= TOL


def test_towers_load_lazily(variant, tmp_path):
    ref, _, _ = variant("e2b")
    ref.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="float32")
    assert llm.modalities == {"text", "image", "audio"}
    assert not any("vision" in n or "audio" in n for n, _ in llm.model.named_parameters())
    llm.generate([[2, 40, 41]], SamplingParams(max_tokens=2, temperature=0))
    assert llm._media_encoder is None  # text-only use never built the towers
    llm.logits(messages=[{"role": "user", "content": [{"type": "image", "image": _image(1, 48, 48)}]}])
    assert llm.media_encoder.towers.loaded() == {"vision"}


# -- the splice, end to end --------------------------------------------------------------------------------------
def _reference_features(ref, inputs) -> list[torch.Tensor]:
    """The reference towers' outputs (after the projections), images then audio clips, as the prompt orders them."""
    with torch.no_grad():
        images = list(ref.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output)
        if "input_features" not in inputs:
            return images
        out = ref.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    return images + [o[m] for o, m in zip(out.pooler_output, out.attention_mask)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_for_messages_match_transformers(name, variant):
    """End to end with our towers, and the splice and the text model alone (the reference towers' outputs in our
    prompt): logits within TOL both. These tiny random models amplify a perturbation of their inputs about
    100-fold, so the towers compute in the reference's order of operations (models/gemma4_audio.py,
    gemma4_vision.py, multimodal/audio.py)."""
    ref, proc, llm = variant(name)
    messages, images, clips = _messages(name)
    inputs = _reference_inputs(proc, messages, images, clips)
    prompt = llm.media_prompt(messages, image_tokens=70)
    assert prompt.ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = ref(**inputs).logits[0]
    got = llm.logits(messages=messages, image_tokens=70)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOL
    spans = sorted(prompt.spans, key=lambda s: (s.kind != "image", s.start))  # the reference's order
    prompt.embeddings = {s.key: f for s, f in zip(spans, _reference_features(ref, inputs))}
    assert (llm._media_logits(prompt) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["moe26b", "dense31b"])
def test_bidirectional_image_spans_matter(name, variant):
    """The reference's logits with and without the image-span mask differ well beyond the tolerance, so the
    parity above checks the bidirectional mask (and ours is not causal by accident)."""
    ref, proc, _ = variant(name)
    messages, images, clips = _messages(name)
    inputs = _reference_inputs(proc, messages, images, clips)
    causal = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        diff = (ref(**inputs).logits - ref(**causal).logits).abs().max().item()
    assert diff > 100 * TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_chat_matches_transformers_generate(name, variant):
    ref, proc, llm = variant(name)
    messages, images, clips = _messages(name)
    inputs = _reference_inputs(proc, messages, images, clips)
    new = 12
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=VOCAB + 1, pad_token_id=0)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    got = llm.chat(messages, params, image_tokens=70)
    assert got.token_ids == expected
    assert got.usage.prompt_tokens == inputs["input_ids"].shape[1]


def _chunked(llm: LLM, prompt, chunk: int, steps: int):
    """Prefill in chunks of about `chunk` tokens (never splitting an image or clip), then greedy-decode; returns
    the tokens, every step's logits and the whole sequence as a prompt to recompute."""
    from hearthlm.multimodal.prompt import MediaPrompt

    cache = ContiguousKVCache(llm.config.layers, 1, len(prompt.ids) + steps, llm.dtype, llm.device)
    rows, start = [], 0
    with torch.inference_mode():
        while start < len(prompt.ids):
            end = prompt.chunk_end(start, min(start + chunk, len(prompt.ids)))
            ids = torch.tensor([prompt.ids[start:end]])
            splice = llm._splice(prompt, start, end - start)
            rows.append(
                llm.model.logits(forward_tokens(llm.model, cache, ids, torch.tensor([start]), splice=splice))[0]
            )
            start = end
        tokens = list(prompt.ids)
        for _ in range(steps):
            tokens.append(int(rows[-1][-1].argmax()))
            h = forward_tokens(llm.model, cache, torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]))
            rows.append(llm.model.logits(h)[0])
    full = MediaPrompt(tokens, prompt.items, prompt.spans, prompt.bidirectional, prompt.embeddings)
    return tokens, torch.cat(rows), full


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("chunk", [5, 40])
def test_cached_decode_after_media_equals_full_recompute(name, chunk, variant):
    _, _, llm = variant(name)
    messages, _, _ = _messages(name)
    prompt = llm.media_prompt(messages, image_tokens=70)
    _, cached, full = _chunked(llm, prompt, chunk, steps=10)
    expected = llm._media_logits(full)
    assert cached.shape == expected.shape
    assert (cached - expected).abs().max().item() <= TOL


# -- the engine --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["e2b", "dense31b"])
def test_engine_chunks_never_split_media_and_match(name, variant):
    """Small prefill chunks (the images are ~60 tokens) give the same tokens as one big chunk."""
    _, _, llm = variant(name)
    messages, _, _ = _messages(name)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    whole = llm.chat(messages, params, image_tokens=70).token_ids
    engine = llm.engine(prefill_chunk=16, block_size=4)
    seen = []
    run = engine.scheduler.schedule

    def spy():
        work = run()
        seen.extend((w.seq.media, w.seq.num_computed, w.n) for w in work if w.seq.media is not None)
        return work

    engine.scheduler.schedule = spy
    try:
        assert llm.chat(messages, params, image_tokens=70).token_ids == whole
    finally:
        llm.engine(prefill_chunk=512)
    assert len(seen) > 3
    for media, start, n in seen:
        for s in media.spans:
            assert not (s.start < start < s.end or s.start < start + n < s.end)


def test_prefix_cache_keys_media_by_content(variant):
    _, _, llm = variant("dense31b")
    engine = llm.engine(block_size=4)
    encoder = llm.media_encoder
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def ask(image):
        messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image", "image": image}]}]
        before = encoder.encoded
        out = llm.generate([llm.media_prompt(messages, image_tokens=70)], params)[0]
        return out.token_ids, engine.stats().prefix_hit_tokens, encoder.encoded - before

    a, b = _image(11, 60, 60), _image(12, 60, 60)  # same size: the same placeholder ids
    first, hits0, encoded = ask(a)
    assert encoded == 1
    again, hits1, encoded = ask(a)
    assert again == first and encoded == 0 and hits1 - hits0 > 60  # the image's blocks came from the cache
    other, hits2, encoded = ask(b)
    assert encoded == 1 and hits2 - hits1 < 16  # only the text before the image can match
    fresh = LLM(llm.path, dtype="float32")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image", "image": b}]}]
    assert fresh.generate([fresh.media_prompt(msgs, image_tokens=70)], params)[0].token_ids == other


# -- preprocessing -----------------------------------------------------------------------------------------------
def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_image_patches_equal_transformers(fmt, budget):
    processor = tf.Gemma4ImageProcessorPil()
    source = _image(20, 137, 211, "RGBA" if fmt == "PNG" else "RGB")  # PNG: transparency composited on white
    data = _encoded(source, fmt)
    ours = image_patches(open_image(data), budget)
    ref = processor(images=[Image.open(io.BytesIO(data))], max_soft_tokens=budget, return_tensors="np")
    n = ours.patches.shape[0]
    assert ours.tokens == ref["num_soft_tokens_per_image"][0] == n // 9 <= budget
    assert (ref["image_position_ids"][0, n:] == -1).all()
    assert np.array_equal(ref["image_position_ids"][0, :n], ours.positions)
    assert np.array_equal(ref["pixel_values"][0, :n], ours.patches)


def test_gif_first_frame_and_extreme_aspect_ratios():
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    patches = image_patches(open_image(buf.getvalue()), 70).patches
    assert np.allclose(patches.reshape(-1, 3).mean(0), [1, 0, 0], atol=0.01)
    processor = tf.Gemma4ImageProcessorPil()
    for h, w in [(20, 900), (1000, 30), (48, 48)]:
        image = _image(21, h, w)
        ours = image_patches(open_image(image), 140)
        ref = processor(images=[image], max_soft_tokens=140, return_tensors="np")
        assert np.array_equal(ref["pixel_values"][0, : ours.patches.shape[0]], ours.patches)


def _wav(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("n", [161, 8000, 33_333, 480_000])
def test_audio_features_equal_transformers(n):
    samples = _clip(30, n)
    ours = audio_features(samples)
    ref = tf.Gemma4AudioFeatureExtractor()([samples], return_tensors="np")
    mask = ref["input_features_mask"][0]
    frames = ours.features.shape[0]
    assert mask[:frames].all() and not mask[frames:].any()
    assert np.abs(ref["input_features"][0, :frames] - ours.features).max() <= 1e-5
    assert ours.tokens == -(-frames // 4) <= 750


def test_audio_decoding_and_resampling():
    import soxr

    t = np.arange(44_100) / 44_100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1).astype(np.float32) * 0.5
    expected = soxr.resample(stereo.mean(axis=1), 44_100, 16_000)
    for fmt in ("WAV", "FLAC"):
        got = load_audio(_wav(stereo, 44_100, fmt))
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-3  # FLAC: 16-bit samples
    mp3 = load_audio(_wav(stereo, 44_100, "MP3"))  # lossy: compare energy and length
    assert abs(mp3.size - 16_000) < 2_000 and abs(np.sqrt((mp3**2).mean()) - np.sqrt((expected**2).mean())) < 0.05
    assert np.abs(load_audio((stereo, 44_100)) - expected).max() < 1e-6  # (samples, rate): the same path


# -- bad input ---------------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header states width x height (its pixel data is absent)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + end


def test_bad_images_are_refused_clearly():
    with pytest.raises(MediaDecodeError, match="PNG, JPEG, WebP or GIF"):
        open_image(b"not an image at all")
    with pytest.raises(MediaSizeError, match="empty"):
        open_image(Image.new("RGB", (0, 0)))
    with pytest.raises(MediaSizeError, match="megapixels, over the limit"):
        open_image(_png_header(10_000, 10_000))  # 100 MP: refused from the header, nothing decoded
    big = _encoded(_image(22, 1500, 2000), "JPEG")
    small = open_image(big, max_pixels=1_000_000)  # a JPEG over the limit is decoded at a reduced scale
    assert small.size[0] * small.size[1] <= 1_000_000
    with pytest.raises(ValueError, match="one of 70, 140, 280, 560, 1120"):
        image_patches(_image(23, 48, 48), budget=100)


def test_bad_audio_and_wrong_modalities_are_refused_clearly(variant, loaded):
    _, _, llm = variant("moe26b")
    with pytest.raises(MediaSizeError, match="over the model's limit of 30 s"):
        audio_features(np.zeros(31 * 16_000, dtype=np.float32))
    with pytest.raises(MediaDecodeError, match="WAV, FLAC, MP3"):
        load_audio(b"RIFF....garbage")
    clip = [{"role": "user", "content": [{"type": "audio", "audio": (_clip(1, 1600), 16_000)}]}]
    with pytest.raises(ModalityError, match="does not take audio input"):
        llm.logits(messages=clip)
    bad_url = {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}
    with pytest.raises(MediaDecodeError, match="image/\\* data URL"):
        llm.logits(messages=[{"role": "user", "content": [bad_url]}])
    _, text_only = loaded("gemma4_dense")
    assert text_only.modalities == {"text"}
    image = [{"role": "user", "content": [{"type": "image", "image": _image(1, 48, 48)}]}]
    with pytest.raises(ModalityError, match="does not take image input"):
        text_only.logits(messages=image)


def test_data_url_image_equals_image_part(variant):
    import base64

    _, _, llm = variant("dense31b")
    image = _image(24, 64, 96)
    url = "data:image/png;base64," + base64.b64encode(_encoded(image, "PNG")).decode()
    a = llm.logits(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    b = llm.logits(messages=[{"role": "user", "content": [{"type": "image", "image": image}]}])
    assert torch.equal(a, b)
