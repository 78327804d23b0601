"""Images and audio through every API (issue 19's entry points): OpenAI image_url / input_audio parts, Ollama's
images (audio too, as Ollama carries it), the Anthropic image block and the Responses input_image, on a tiny random
Gemma 4 checkpoint with both towers; the served prompt and greedy reply equal LLM.media_prompt and LLM.generate's;
capabilities and modalities advertised; bad media refused with each API's 4xx."""

from __future__ import annotations

import base64
import io

import anthropic
import httpx
import numpy as np
import ollama
import openai
import pytest
import soundfile
import torch
import transformers as tf
from PIL import Image
from serving import LiveServer
from test_multimodal import IDS, VARIANTS, _tokenizer

from hearthlm import SamplingParams
from hearthlm.server import load
from hearthlm.server.app import create_app

NAME = "tiny-gemma4-av"


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    config = tf.Gemma4Config(**VARIANTS["e2b"], **IDS)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("av") / NAME
    tf.Gemma4ForConditionalGeneration(config).eval().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    served = load(str(folder), dtype="float32")
    server = LiveServer(create_app(served))
    yield server, served
    server.stop()


def _png(seed: int = 0, size=(40, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def _wav(seconds: float = 0.5) -> bytes:
    rng = np.random.default_rng(1)
    out = io.BytesIO()
    soundfile.write(out, (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000, format="WAV")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _reference(served, parts: list[dict], max_tokens: int = 4) -> tuple[list[int], list[int]]:
    """The prompt ids and greedy reply ids that LLM.media_prompt and LLM.generate give for one user turn."""
    messages = [{"role": "user", "content": parts}]
    prompt = served.llm.media_prompt(messages)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return prompt.ids, served.llm.generate([prompt], params)[0].token_ids


def test_capabilities_and_modalities(media_server):
    server, _ = media_server
    show = ollama.Client(server.url).show(NAME)
    assert "vision" in show.capabilities and "audio" in show.capabilities
    cards = openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list().data
    assert set(cards[0].model_extra["input_modalities"]) == {"text", "image", "audio"}


def test_ollama_generate_with_an_image_equals_the_python_api(media_server):
    server, served = media_server
    png = _png()
    body = {"model": NAME, "prompt": "What is this?", "images": [_b64(png)], "stream": False,
            "options": {"temperature": 0, "num_predict": 4}}  # fmt: skip
    r = httpx.post(server.url + "/api/generate", json=body, timeout=120).json()
    prompt, reply = _reference(served, [{"type": "text", "text": "What is this?"}, {"type": "image", "image": png}])
    assert r["prompt_eval_count"] == len(prompt) and r["context"][: len(prompt)] == prompt
    eos = set(served.llm.stop_token_ids)
    want = reply[: next((i for i, t in enumerate(reply) if t in eos), len(reply))]
    assert r["context"][len(prompt) :] == want


def test_openai_image_and_audio_parts(media_server):
    server, served = media_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    png, wav = _png(2), _wav()
    content = [
        {"type": "text", "text": "Describe both."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(png)}},
        {"type": "input_audio", "input_audio": {"data": _b64(wav), "format": "wav"}},
    ]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=3,
                                       temperature=0)  # fmt: skip
    prompt, _ = _reference(served, [content[0], {"type": "image", "image": png}, {"type": "audio", "audio": wav}])
    assert r.usage.prompt_tokens == len(prompt)
    second = _png(3)
    turns = [  # a second image, in a later turn
        {"role": "user", "content": content[:2]}, {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(second)}}]},
    ]  # fmt: skip
    two = client.chat.completions.create(model=NAME, max_tokens=2, messages=turns)
    both = served.llm.media_prompt([
        {"role": "user", "content": [content[0], {"type": "image", "image": png}]}, turns[1],
        {"role": "user", "content": [{"type": "image", "image": second}]},
    ])  # fmt: skip
    assert two.usage.prompt_tokens == len(both.ids) and len(both.items) == 2


def test_ollama_chat_carries_audio_in_images(media_server):
    server, served = media_server
    c = ollama.Client(server.url)
    wav, png = _wav(), _png(4)
    r = c.chat(model=NAME, messages=[{"role": "user", "content": "Listen.", "images": [_b64(wav), _b64(png)]}],
               options={"num_predict": 2, "temperature": 0})  # fmt: skip
    prompt, _ = _reference(served, [{"type": "text", "text": "Listen."}, {"type": "audio", "audio": wav},
                                    {"type": "image", "image": png}])  # fmt: skip
    assert r.prompt_eval_count == len(prompt)


def test_anthropic_and_responses_images(media_server):
    server, served = media_server
    png = _png(5)
    ac = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _b64(png)}}
    m = ac.messages.create(model=NAME, max_tokens=2, messages=[{"role": "user", "content": [
        block, {"type": "text", "text": "What is it?"}]}])  # fmt: skip
    prompt, _ = _reference(served, [{"type": "image", "image": png}, {"type": "text", "text": "What is it?"}])
    assert m.usage.input_tokens == len(prompt)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model=NAME, max_output_tokens=2, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + _b64(png)},
        {"type": "input_text", "text": "What is it?"}]}])  # fmt: skip
    assert r.usage.input_tokens == len(prompt)


def test_bad_media_is_a_4xx_in_each_api(media_server, server):
    s, _ = media_server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    cases = {
        "https://example.com/cat.png": "not fetched",
        "data:image/png;base64,bm90IGFuIGltYWdl": "image",  # valid base64, not an image
        "data:text/plain;base64,aGVsbG8=": "image/*",
    }
    for url, words in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
        assert words in e.value.body["message"]
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(s.url).chat(model=NAME, messages=[{"role": "user", "content": "x", "images": ["@@@"]}])
    assert e.value.status_code == 400 and "base64" in str(e.value)
    text_only = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)  # the demo reads text only
    with pytest.raises(openai.BadRequestError) as e:
        text_only.chat.completions.create(model="hearth-demo", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_png())}}]}])  # fmt: skip
    assert "does not take image input" in e.value.body["message"]
    assert client.chat.completions.create(model=NAME, max_tokens=1, messages=[{"role": "user", "content": "ok"}])
