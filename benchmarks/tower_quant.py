"""What a quantized vision or audio tower loses (`--quant-towers`): answers, tower outputs, logits, encode time, memory.

    python benchmarks/tower_quant.py [--per-case 100] [--layers 10] [--runs 3] [--threads 2] [--only demo|e2b|audio]
                                     [--audio FILE ...]

Towers compared: float (as stored: the linear layers' bf16 weights, computed in float32 on CPU), int8 and int4
(the default int4-g32), quantized as `--quant-towers` does it. The text model is the same in every column of a
comparison, so what moves is the tower's doing.

1. hearth-demo-vision, the trained demo (src/hearthlm/demo): held-out exact-match accuracy of LLM.chat's greedy
   reply on freshly drawn pictures, as its model card measures it (examples/train_vision_demo.py `evaluate`: seed
   1000003, every question kind, image_tokens=70), the same pictures for every tower; "changed" counts replies that
   differ from the float tower's on the same picture (a paired measure, less noisy than two accuracies). Rows with
   the text model float (the tower's loss alone) and quantized as `--quant` does (what `--quant-towers` adds).
2. E2B-shaped vision tower (768 wide, 16 layers) with a text model cut to `--layers`, random bf16 weights
   (benchmarks/multimodal.py's checkpoint): the soft tokens after the projection against the float tower's (max
   and mean |diff|, relative error, cosine similarity per token), and KL(float || quantized) of the next-token
   distributions over the image and the text after it, on image prompts. Random weights are a weak proxy, and here
   a useless one for quality: the random tower is chaotic, as the control shows (every pixel moved by 1e-4 moves
   its output about as much as quantizing does), and trained weights have outlier channels that random ones lack.
   Its memory and time figures stand.
3. Encode time (one image, median of `--runs` after a warm-up) and the tower's memory (tower + projection tensors).
4. `--only audio` (not run by default): E2B's audio tower (1024 wide, 12 conformer layers) with a text model cut to
   `--audio-layers`, random bf16 weights (N(0, 0.02) as benchmarks/multimodal.py draws them), on decoded audio: WAV
   files written here and decoded as any input is (load_audio: libsndfile, resampled to 16 kHz), a 4-second
   speech-like clip (a voiced source at a gliding pitch through moving vowel formants, with pauses) and a 2-second
   chirp in noise, or `--audio FILE ...` (any recording). The same figures as part 2 on the audio soft tokens and the
   next-token distributions from the clip on, and the same kind of control (every log-mel feature + 1e-4). There is no
   trained audio demo: the figures bound what the weight rounding does to a random tower, not what a trained one
   loses.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.models.gemma4_media import ClippedLinear, Projection
from hearthlm.multimodal.image import image_patches, open_image
from hearthlm.multimodal.towers import Towers
from hearthlm.quant.quantize import parse_quant

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from vision_demo_data import ASKED, sample  # noqa: E402

FORMATS = ("float", "int8", "int4")
DEMO = "hearth-demo-vision"
EVAL_SEED = 1_000_003  # the model card's held-out pictures (examples/train_vision_demo.py)


def use_towers(llm: LLM, fmt: str) -> Towers:
    """Give `llm` towers in `fmt`, keeping its text model; its encoder keeps no outputs, so nothing stale is reused."""
    towers = Towers(llm.media_spec, llm.dtype, llm.device, None if fmt == "float" else parse_quant(fmt))
    encoder = llm.media_encoder
    encoder.cache_bytes, encoder.towers = 0, towers
    return towers


def tower_bytes(towers: Towers) -> tuple[int, int]:
    """Bytes of the loaded towers' tensors (a quantized weight: its integers, scales and mins): all of them, and those
    of the linear layers' weights (what --quant-towers quantizes)."""
    mods = [m for pair in towers._loaded.values() for m in pair]
    linear = [s for m in mods for s in m.modules() if isinstance(s, (ClippedLinear, Projection))]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    weights = [t for m in linear for k, t in m.state_dict().items() if k.split(".")[0] == "weight"]
    return size(t for m in mods for t in m.state_dict().values()), size(weights)


def encode_ms(towers: Towers, patches, runs: int) -> float:
    towers.encode_images([patches])  # warm-up; loads the tower
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        towers.encode_images([patches])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# -- 1. the trained demo --------------------------------------------------------------------------------------------
def demo_items(per_case: int) -> list:
    rng = random.Random(EVAL_SEED)
    return [sample(rng, kind, q) for kind, qs in ASKED.items() for q in qs for _ in range(per_case)]


def demo_replies(text_quant: str | None, fmt: str, items: list) -> tuple[list[str], dict]:
    llm = LLM(DEMO, quant=text_quant)
    towers = use_towers(llm, fmt)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = [llm.media_prompt(item.messages(), image_tokens=70) for item in items]
    replies = [c.text.strip() for c in llm.generate(prompts, params)]  # LLM.chat's path, all pictures at once
    patches = image_patches(open_image(items[0].image), 70)
    info = {"encode_ms": encode_ms(towers, patches, 20), "tower_bytes": tower_bytes(towers)}
    return replies, info


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = right / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


# (text model, towers): the tower's loss alone, then `--quant X` against `--quant X --quant-towers`
DEMO_CONFIGS = [(None, "float"), (None, "int8"), (None, "int4"), ("int8", "float"), ("int8", "int8"),
                ("int4", "float"), ("int4", "int4")]  # fmt: skip


def run_demo(per_case: int) -> None:
    items = demo_items(per_case)
    answers = [item.answer for item in items]
    cases = [f"{kind}/{q}" for kind, qs in ASKED.items() for q in qs]
    print(f"\n{DEMO}: held-out exact match, {per_case} pictures per question kind ({len(items)} in all)")
    print(f"{'text':6} {'towers':6} {'accuracy':>8} {'95% CI':>14} {'changed':>7} {'tower KB':>14} {'encode ms':>9}  "
          + " ".join(f"{c:>13}" for c in cases))  # fmt: skip
    base: dict[str | None, list[str]] = {}
    for text, fmt in DEMO_CONFIGS:
        start = time.perf_counter()
        replies, info = demo_replies(text, fmt, items)
        base.setdefault(text, replies)  # the float towers' replies come first for each text model
        right = [r == a for r, a in zip(replies, answers)]
        changed = sum(r != b for r, b in zip(replies, base[text]))
        lo, hi = wilson(sum(right), len(right))
        per = [statistics.mean(right[i * per_case : (i + 1) * per_case]) for i in range(len(cases))]
        print(f"{text or 'float':6} {fmt:6} {statistics.mean(right):8.3f} [{lo:.3f}, {hi:.3f}] {changed:7d} "
              f"{info['tower_bytes'][0] / 1024:6.0f} ({info['tower_bytes'][1] / 1024:3.0f} lin) {info['encode_ms']:9.2f}  " + " ".join(f"{p:13.2f}" for p in per)
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


# -- 2. E2B shapes, random weights ----------------------------------------------------------------------------------
def e2b_prompts() -> list[list[dict]]:
    """Image prompts: a noise picture that fills the 280 budget, and a drawn demo picture (a coloured shape)."""
    from multimodal import image
    from PIL import Image

    pictures = [Image.fromarray(image(280)), sample(random.Random(7), "shape", "picture").image]
    question = {"type": "text", "text": "Describe this picture in one sentence."}
    return [[{"role": "user", "content": [{"type": "image", "image": pic}, question]}] for pic in pictures]


def soft_token_error(ref: torch.Tensor, got: torch.Tensor) -> dict:
    diff = (got - ref).abs()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    return {"max": diff.max().item(), "mean": diff.mean().item(), "rel": ((got - ref).norm() / ref.norm()).item(),
            "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}  # fmt: skip


def kl_after_image(ref: torch.Tensor, got: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position from `start` on: KL(ref || got) of the softmaxed logits, and whether the argmax agrees."""
    p, q = ref[start:].log_softmax(-1), got[start:].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1), ref[start:].argmax(-1) == got[start:].argmax(-1)


def e2b_figures(folder: Path, fmt: str, prompts: list[list[dict]], runs: int) -> dict:
    """One tower format on a fresh load: soft tokens and logits of every prompt (each image encoded once: the logits
    reuse the encoder's cached output), then encode time and memory."""
    llm = LLM(folder, dtype="bfloat16")
    llm.media_encoder.towers = towers = Towers(
        llm.media_spec, llm.dtype, llm.device, parse_quant(fmt) if fmt != "float" else None
    )
    media = [llm.media_prompt(m) for m in prompts]
    llm.media_encoder.encode(media)
    tokens = [mp.embeddings[mp.spans[0].key].float() for mp in media]
    logits = [llm.logits(messages=m) for m in prompts]
    ms = encode_ms(towers, media[0].items[0], runs)
    return {"tokens": tokens, "logits": logits, "starts": [mp.spans[0].start for mp in media], "ms": ms,
            "bytes": tower_bytes(towers), "lengths": [len(mp.ids) for mp in media]}  # fmt: skip


def pixel_sensitivity(folder: Path, prompts: list[list[dict]]) -> dict:
    """The control: the float tower's soft tokens when every pixel of the first image moves by 1e-4 (1/40 of one 8-bit
    level). Random weights make the tower chaotic; if this moves the output as much as quantizing does, the random
    checkpoint cannot tell how much quality quantization costs."""
    llm = LLM(folder, dtype="bfloat16")
    patches = llm.media_prompt(prompts[0]).items[0]
    towers = llm.media_encoder.towers
    ref = towers.encode_images([patches])[0].float()
    moved = dataclasses.replace(patches, patches=patches.patches + 1e-4)
    return soft_token_error(ref, towers.encode_images([moved])[0].float())


HEADER = (f"{'towers':6} {'max|d|':>8} {'mean|d|':>8} {'rel err':>8} {'cos mean':>9} {'cos min':>9} "
          f"{'KL mean':>9} {'KL max':>9} {'top1 agree':>10} {'tower MB':>17} {'encode ms':>9}")  # fmt: skip


def print_row(fmt: str, ref: dict, got: dict, start: float) -> None:
    """One format's row: its tower outputs and next-token distributions against the float towers' (`ref`)."""
    err = soft_token_error(torch.cat(ref["tokens"]), torch.cat(got["tokens"]))
    pairs = zip(ref["logits"], got["logits"], ref["starts"])
    kl, agree = (torch.cat(x) for x in zip(*(kl_after_image(r, g, s) for r, g, s in pairs)))
    size, linear = got["bytes"]
    print(f"{fmt:6} {err['max']:8.2e} {err['mean']:8.2e} {err['rel']:8.2e} {err['cos_mean']:9.6f} "
          f"{err['cos_min']:9.6f} {kl.mean().item():9.2e} {kl.max().item():9.2e} {agree.float().mean().item():10.3f} "
          f"{size / 1e6:6.1f} ({linear / 1e6:5.1f} lin) {got['ms']:9.0f}  ({time.perf_counter() - start:.0f} s, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip


def run_e2b(layers: int, runs: int) -> None:
    from multimodal import build

    folder, prompts = build(layers), e2b_prompts()
    ref = None
    for fmt in FORMATS:
        start = time.perf_counter()
        got = e2b_figures(folder, fmt, prompts, runs)
        if ref is None:
            ref = got
            print(
                f"\n{folder.name}: E2B vision tower + {layers}-layer text model, random bf16 weights; "
                f"{len(prompts)} image prompts ({', '.join(map(str, got['lengths']))} tokens), 280-token budget"
            )
            print(HEADER)
        print_row(fmt, ref, got, start)
    err = pixel_sensitivity(folder, prompts)
    print(f"control: float tower, every pixel + 1e-4: max|d| {err['max']:.2e}, mean|d| {err['mean']:.2e}, "
          f"rel err {err['rel']:.2e}, cos mean {err['cos_mean']:.6f}, cos min {err['cos_min']:.6f}")  # fmt: skip


# -- 4. E2B's audio tower, random weights --------------------------------------------------------------------------
def audio_files(out: Path) -> list[Path]:
    """Two clips written as 16-bit WAV at 22.05 kHz (so that decoding resamples): speech-like, and a chirp in noise."""
    import soundfile

    rate, rng = 22_050, np.random.default_rng(0)
    t = np.arange(4 * rate) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)  # Hz, gliding
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))  # a voiced, buzz-like source
    speech = np.zeros_like(t)
    for f1, f2 in ((700, 1200), (300, 2300), (500, 900)):  # moving vowels: two formant resonances each
        for f, bw in ((f1 + 80 * np.sin(2 * np.pi * 1.3 * t), 90), (f2, 120)):
            speech += source * np.cos(2 * np.pi * f * t) * np.exp(-bw / 1000)
    speech *= (np.sin(2 * np.pi * 2.5 * t) > -0.3) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))  # syllables, pauses
    speech = 0.3 * speech / np.abs(speech).max() + 0.003 * rng.standard_normal(t.size)
    t2 = np.arange(2 * rate) / rate
    chirp = 0.2 * np.sin(2 * np.pi * (200 * t2 + 900 * t2**2)) + 0.02 * rng.standard_normal(t2.size)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "speech-like.wav", out / "chirp.wav"]
    for path, x in zip(paths, (speech, chirp)):
        soundfile.write(path, x.astype(np.float32), rate, subtype="PCM_16")
    return paths


def audio_figures(folder: Path, fmt: str, prompts: list[list[dict]], runs: int) -> dict:
    """Part 2's figures for one audio tower format on a fresh load."""
    llm = LLM(folder, dtype="bfloat16")
    llm.media_encoder.towers = towers = Towers(
        llm.media_spec, llm.dtype, llm.device, parse_quant(fmt) if fmt != "float" else None
    )
    media = [llm.media_prompt(m) for m in prompts]
    llm.media_encoder.encode(media)
    tokens = [mp.embeddings[mp.spans[0].key].float() for mp in media]
    logits = [llm.logits(messages=m) for m in prompts]
    clip = media[0].items[0]
    towers.encode_audio([clip])  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        towers.encode_audio([clip])
        times.append(time.perf_counter() - start)
    return {"tokens": tokens, "logits": logits, "starts": [mp.spans[0].start for mp in media],
            "ms": 1000 * statistics.median(times), "bytes": tower_bytes(towers),
            "lengths": [len(mp.ids) for mp in media], "clip_tokens": [mp.items[0].tokens for mp in media]}  # fmt: skip


def run_audio(layers: int, runs: int, files: list[str]) -> None:
    from multimodal import build

    folder = build(layers, "audio")
    paths = [Path(f) for f in files] or audio_files(folder / "clips")
    question = {"type": "text", "text": "Transcribe this."}
    prompts = [[{"role": "user", "content": [{"type": "audio", "audio": str(p)}, question]}] for p in paths]
    ref = None
    for fmt in FORMATS:
        start = time.perf_counter()
        got = audio_figures(folder, fmt, prompts, runs)
        if ref is None:
            ref = got
            clips = ", ".join(f"{p.name} {n} audio tokens" for p, n in zip(paths, got["clip_tokens"]))
            print(f"\n{folder.name}: E2B audio tower + {layers}-layer text model, random bf16 weights; {clips}")
            print(HEADER)
        print_row(fmt, ref, got, start)
    llm = LLM(folder, dtype="bfloat16")
    clip = llm.media_prompt(prompts[0]).items[0]
    towers = llm.media_encoder.towers
    base = towers.encode_audio([clip])[0].float()
    err = soft_token_error(base, towers.encode_audio([dataclasses.replace(clip, features=clip.features + 1e-4)])[0])
    print(f"control: float tower, every log-mel feature + 1e-4: max|d| {err['max']:.2e}, mean|d| {err['mean']:.2e}, "
          f"rel err {err['rel']:.2e}, cos mean {err['cos_mean']:.6f}, cos min {err['cos_min']:.6f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-case", type=int, default=100, help="demo pictures per question kind (the card used 100)")
    ap.add_argument("--layers", type=int, default=10, help="layers of the E2B text model (benchmarks/multimodal.py)")
    ap.add_argument("--runs", type=int, default=3, help="timed E2B encodes per tower (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", choices=("demo", "e2b", "audio"), default=None)
    ap.add_argument(
        "--audio-layers", type=int, default=10, help="layers of the text model beside the audio tower (10+)"
    )
    ap.add_argument("--audio", nargs="*", default=[], metavar="FILE", help="clips for --only audio (default: made)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start")
    if args.only == "audio":
        run_audio(args.audio_layers, args.runs, args.audio)
    if args.only in (None, "demo"):
        run_demo(args.per_case)
    if args.only in (None, "e2b"):
        run_e2b(args.layers, args.runs)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
