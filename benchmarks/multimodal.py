"""Image encode time and prefill speed with images on Gemma 4 E2B shapes (random weights).

    python benchmarks/multimodal.py [--layers 35] [--budgets 280,1120] [--runs 3] [--threads 2]

The checkpoint is E2B's text model (known_models/gemma-4-E2B.json; `--layers` cuts it (at least 10: its first layers, keeping the 4:1 sliding /
full pattern and its share of KV-shared layers) with E2B's vision tower (768 wide, 16 layers), random weights in
bfloat16, written once under /tmp/hearthlm-bench-checkpoints. One image per prompt, its size chosen to fill the
token budget; a short text question around it.

Figures (medians of `--runs` after a warm-up):
- encode: the vision tower and its projection on one image (hearthlm: float32 on CPU, as the towers run there);
- prefill: prompt tokens / time of the text model over the whole prompt, the image's embeddings already encoded
  (hearthlm: the engine with prefix caching off; llama.cpp: mtmd_helper_eval_chunks minus its encode time);
- peak RSS growth while encoding (the tower's activations).

llama.cpp's side is not measured yet: llama-cpp-python 0.3.36 ships libmtmd built from a llama.cpp that reads
`gemma4v` / `gemma4a` projectors (llama_cpp.mtmd_cpp), and tests/test_multimodal_files.py writes mmproj files as
its converter does; what is missing is this script writing the E2B-size text GGUF and driving mtmd_encode_chunk /
mtmd_helper_eval_chunks through ctypes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hearthlm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test tokenizer (byte-level, Gemma 4's special tokens)
OUT = Path("/tmp/hearthlm-bench-checkpoints")
SIDES = {70: 432, 140: 576, 280: 864, 560: 1152, 1120: 1632}  # a square image of this side fills the budget


def build(layers: int) -> Path:
    """E2B's text model (cut to `layers`) with its vision tower, random weights, saved as a checkpoint folder."""
    import transformers as tf
    from test_multimodal import IDS, _tokenizer

    folder = OUT / f"gemma4-e2b-vision-L{layers}"
    if (folder / "config.json").exists():
        return folder
    hf = json.loads((ROOT / "src/hearthlm/known_models/gemma-4-E2B.json").read_text())
    vision = hf.pop("vision_config")
    hf.pop("audio_config", None)
    shared = hf["num_kv_shared_layers"] * layers // hf["num_hidden_layers"]
    text = hf | {
        "num_hidden_layers": layers,
        "layer_types": hf["layer_types"][:layers],
        "num_kv_shared_layers": shared,
    }
    config = tf.Gemma4Config(text_config=text, vision_config=vision, **IDS)
    with torch.device("meta"):
        model = tf.Gemma4ForConditionalGeneration(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # never float32 whole: 18 GB at E2B's size
    model.tie_weights()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms, scalars
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            b.fill_(-1e30 if name.endswith("_min") else 1e30 if name.endswith("_max") else 1.0)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def image(budget: int) -> np.ndarray:
    side = SIDES[budget]
    return (np.random.default_rng(budget).random((side, side, 3)) * 255).astype(np.uint8)


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS


def hearthlm_figures(folder: Path, budget: int, runs: int) -> dict:
    from PIL import Image

    from hearthlm.multimodal.image import image_patches, open_image

    llm = LLM(folder, dtype="bfloat16")
    pil = Image.fromarray(image(budget))
    messages = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": "What is it?"}]}]
    prompt = llm.media_prompt(messages, image_tokens=budget)
    towers = llm.media_encoder.towers
    patches = image_patches(open_image(pil), budget)
    towers.encode_images([patches])  # warm-up; loads the tower
    encode, peak = [], 0
    for _ in range(runs):
        _reset_peak()
        before = _status("VmRSS")
        start = time.perf_counter()
        towers.encode_images([patches])
        encode.append(time.perf_counter() - start)
        peak = max(peak, _status("VmHWM") - before)
    engine = llm.engine(prefix_caching=False)
    assert engine is llm.engine()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up; the image's embeddings are cached from here on
    prefill = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate([prompt], params)
        prefill.append(time.perf_counter() - start)
    tokens = len(prompt.ids)
    return {
        "engine": "hearthlm",
        "image_tokens": prompt.spans[0].length,
        "prompt_tokens": tokens,
        "encode_ms": 1000 * statistics.median(encode),
        "prefill_tok_s": tokens / statistics.median(prefill),
        "encode_peak_rss_mb": peak / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--budgets", default="280,1120")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = build(args.layers)
    print(f"{folder.name}: E2B text model ({args.layers} layers) + vision tower, bf16, {args.threads} threads")
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        rows.append(hearthlm_figures(folder, budget, args.runs))
    print(f"{'engine':10} {'img tok':>7} {'prompt':>7} {'encode ms':>10} {'prefill tok/s':>14} {'encode peak MB':>15}")
    for r in rows:
        peak = f"{r['encode_peak_rss_mb']:.0f}" if r.get("encode_peak_rss_mb") is not None else "—"
        print(f"{r['engine']:10} {r['image_tokens']:7d} {r['prompt_tokens']:7d} {r['encode_ms']:10.0f} "
              f"{r['prefill_tok_s']:14.1f} {peak:>15}")  # fmt: skip


if __name__ == "__main__":
    main()
