"""Synthetic pictures and questions for the hearth-demo-vision model: coloured shapes, digits and short words
drawn with Pillow (its built-in font, no downloads), each with a question and its short exact answer.

    from vision_demo_data import sample
    item = sample(random.Random(0))  # item.image (PIL, 128 x 128), item.question, item.answer, item.kind

Every draw comes from the `random.Random` passed in, so a seed gives the same pictures on every machine with the
same Pillow. Training and evaluation use different seeds, and positions, sizes, tints and backgrounds vary
continuously, so an evaluation picture is (almost surely) none of the training pictures.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SIZE = 128  # pixels per side; the processor resizes to 384 x 384 (8 x 8 = 64 soft tokens at the 70 budget)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
JITTER = 12  # digits and words sit within this many pixels of the centre; shapes go anywhere
DIGITS = tuple("0123456789")
WORDS = (
    "cat", "dog", "sun", "sea", "hat", "box", "cup", "pen",
    "fish", "bird", "star", "moon", "tree", "book", "cake", "frog",
)  # fmt: skip
QUESTIONS = {
    "picture": "What is in this picture?",
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "digit": "What digit is this?",
    "word": "What word is written?",
}
# Which questions each kind of picture gets, and how many distinct answers each (kind, question) has.
ASKED = {"shape": ("picture", "colour", "shape"), "digit": ("picture", "digit"), "word": ("picture", "word")}
KIND_WEIGHTS = {"shape": 1, "digit": 2, "word": 2}  # how often each kind is drawn: digits and words are harder
ANSWERS = {
    ("shape", "picture"): len(SHAPES) * len(COLOURS),
    ("shape", "colour"): len(COLOURS),
    ("shape", "shape"): len(SHAPES),
    ("digit", "picture"): len(DIGITS),
    ("digit", "digit"): len(DIGITS),
    ("word", "picture"): len(WORDS),
    ("word", "word"): len(WORDS),
}


@dataclass
class Item:
    image: Image.Image
    kind: str  # "shape" | "digit" | "word"
    question_type: str  # a key of QUESTIONS
    question: str
    answer: str

    def messages(self) -> list[dict]:
        """The user turn as chat content parts (the image first, then the question)."""
        parts = [{"type": "image", "image": self.image}, {"type": "text", "text": self.question}]
        return [{"role": "user", "content": parts}]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _canvas(rng: random.Random) -> Image.Image:
    grey = rng.randint(215, 255)
    return Image.new("RGB", (SIZE, SIZE), _jitter((grey, grey, grey), rng, 10))


def _ink(rng: random.Random) -> tuple[int, int, int]:
    """A dark colour for digits and words."""
    return _jitter(rng.choice([(20, 20, 20), (40, 40, 110), (90, 30, 30), (30, 80, 40)]), rng, 15)


def draw_shape(shape: str, colour: str, rng: random.Random) -> Image.Image:
    image = _canvas(rng)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(20, 44)  # half the extent
    cx, cy = rng.uniform(r + 4, SIZE - r - 4), rng.uniform(r + 4, SIZE - r - 4)
    fill = _jitter(COLOURS[colour], rng, 20)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        a, d = rng.uniform(-0.3, 0.3), 0.7 * r * math.sqrt(2)  # a slight rotation (radians); centre to corner
        corners = [(cx + d * math.cos(a + (k + 0.5) * math.pi / 2), cy + d * math.sin(a + (k + 0.5) * math.pi / 2)) for k in range(4)]  # fmt: skip
        draw.polygon(corners, fill=fill)
    else:
        a = -math.pi / 2 + rng.uniform(-0.3, 0.3)  # pointing up, give or take
        draw.polygon([(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)], fill=fill)  # fmt: skip
    return image


def draw_text(text: str, size: int, rng: random.Random) -> Image.Image:
    """`text` near the middle (up to JITTER pixels off in each direction, kept inside the picture)."""
    image = _canvas(rng)
    draw = ImageDraw.Draw(image)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (SIZE - right - left) / 2 + rng.uniform(-JITTER, JITTER)
    y = (SIZE - bottom - top) / 2 + rng.uniform(-JITTER, JITTER)
    x = min(max(x, 2 - left), SIZE - 2 - right)
    y = min(max(y, 2 - top), SIZE - 2 - bottom)
    draw.text((x, y), text, font=font, fill=_ink(rng))
    return image


def sample(rng: random.Random, kind: str | None = None, question_type: str | None = None) -> Item:
    """One picture with one question about it (kind drawn by KIND_WEIGHTS and question uniformly, unless given)."""
    kind = kind or rng.choices(tuple(KIND_WEIGHTS), weights=tuple(KIND_WEIGHTS.values()))[0]
    question_type = question_type or rng.choice(ASKED[kind])
    if question_type not in ASKED[kind]:
        raise ValueError(f"a {kind} picture is not asked '{question_type}'")
    if kind == "shape":
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        image = draw_shape(shape, colour, rng)
        answer = {"picture": f"a {colour} {shape}", "colour": colour, "shape": shape}[question_type]
    elif kind == "digit":
        digit = rng.choice(DIGITS)
        image = draw_text(digit, rng.randint(64, 100), rng)
        answer = f"the digit {digit}" if question_type == "picture" else digit
    else:
        word = rng.choice(WORDS)
        image = draw_text(word, rng.randint(34, 44), rng)
        answer = f"the word {word}" if question_type == "picture" else word
    return Item(image, kind, question_type, QUESTIONS[question_type], answer)
