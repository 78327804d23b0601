"""hearth-demo-vision, the built-in tiny Gemma 4 vision-language model: it answers questions about pictures it has
never seen, through hearthlm's own path (LLM.chat, greedy), and its logits on an image prompt match transformers'
Gemma4ForConditionalGeneration with transformers' own processor on the same messages.

The pictures come from examples/vision_demo_data.py with a seed used neither in training nor in the model card's
evaluation (examples/train_vision_demo.py)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from hearthlm import LLM, SamplingParams
from hearthlm.store import BUILTIN_NAMES, resolve

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from vision_demo_data import sample  # noqa: E402

NAME = "hearth-demo-vision"
FOLDER = ROOT / "src" / "hearthlm" / "demo" / NAME
BUDGET = 70  # the image-token budget it was trained at
SEED = 424242
# The questions it answers best (held-out accuracy in eval.json: colour 1.0, digit 0.89 / 0.91, shape picture 0.7;
# words and "What shape is this?" are weaker, 0.3-0.67), three fresh pictures each.
CASES = [("shape", "colour"), ("digit", "digit"), ("digit", "picture"), ("shape", "picture")]
PER_CASE = 3
MIN_ACCURACY = 8 / 12  # expected ~0.88; chance is 1/6, 1/10, 1/10 and 1/18


@pytest.fixture(scope="module")
def llm():
    return LLM(NAME)


def test_is_a_builtin_with_the_image_tower(llm):
    assert NAME in BUILTIN_NAMES and resolve(NAME).resolve() == FOLDER.resolve()
    assert llm.modalities == {"text", "image"}
    assert sum(f.stat().st_size for f in FOLDER.iterdir()) <= 8 * 2**20


def test_the_budget_it_was_trained_at_is_the_default(llm):
    """processor_config.json records 70 soft tokens per image; a request that names none gets that, not 280."""
    item = sample(random.Random(SEED), *CASES[0])
    default, trained = llm.media_prompt(item.messages()), llm.media_prompt(item.messages(), image_tokens=BUDGET)
    assert BUDGET == 70 and default.ids == trained.ids
    assert len(llm.media_prompt(item.messages(), image_tokens=280).ids) > len(default.ids)


def test_answers_fresh_pictures(llm):
    rng = random.Random(SEED)
    params = SamplingParams(max_tokens=8, temperature=0)
    results = []
    for kind, question in CASES:
        for _ in range(PER_CASE):
            item = sample(rng, kind, question)
            reply = llm.chat(item.messages(), params, image_tokens=BUDGET)
            results.append((item.answer, reply.text.strip(), reply.finish_reason))
    right = sum(want == got for want, got, _ in results)
    assert right / len(results) >= MIN_ACCURACY, results
    assert all(reason == "stop" for *_, reason in results)  # it ends its turn


class _Processor(tf.Gemma4Processor):
    """transformers' Gemma4Processor without a video processor (that one needs torchvision, not installed)."""

    def check_argument_for_proper_class(self, name, arg):
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def test_logits_match_transformers():
    ref = tf.Gemma4ForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(FOLDER)
    proc = _Processor(
        feature_extractor=tf.Gemma4AudioFeatureExtractor(), image_processor=tf.Gemma4ImageProcessorPil(),
        tokenizer=tok, video_processor=None, chat_template=tok.chat_template,
    )  # fmt: skip
    item = sample(random.Random(SEED + 1), "digit", "picture")
    messages = item.messages()
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(  # the template wrote <bos> already, as transformers' own apply_chat_template(tokenize=True) does
        text=text, images=[item.image], return_tensors="pt", add_special_tokens=False,
        images_kwargs={"max_soft_tokens": BUDGET},
    )  # fmt: skip
    llm = LLM(FOLDER, dtype="float32")
    assert llm.media_prompt(messages, image_tokens=BUDGET).ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        want = ref(**inputs).logits[0]
    got = llm.logits(messages=messages, image_tokens=BUDGET)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-3
    assert got[-1].argmax() == want[-1].argmax()
