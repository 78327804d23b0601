"""Image encode time and prefill speed with images on Gemma 4 E2B shapes (random weights).

    python benchmarks/multimodal.py [--layers 35] [--budgets 280,1120] [--runs 3] [--threads 2]

The checkpoint is E2B's text model (known_models/gemma-4-E2B.json; `--layers` cuts it (at least 10: its first layers, keeping the 4:1 sliding /
full pattern and its share of KV-shared layers) with E2B's vision tower (768 wide, 16 layers), random weights in
bfloat16, written once under /tmp/hearthlm-bench-checkpoints. One image per prompt, its size chosen to fill the
token budget; a short text question around it.

Figures (medians of `--runs` after a warm-up), for hearthlm and then llama.cpp on the same pixels and prompt text:
- encode: the vision tower and its projection on one image (hearthlm: float32 on CPU, as the towers run there;
  llama.cpp: mtmd_encode_chunk with the F32 mmproj);
- prefill: prompt tokens / time of the text model over the whole prompt, the image's embeddings already encoded
  (hearthlm: the engine with prefix caching off; llama.cpp: the steps of mtmd_helper_eval_chunks timed apart,
  mtmd_helper_eval_chunk_single for the text chunks and mtmd_helper_decode_image_chunk for the encoded image; the
  warm-up runs mtmd_helper_eval_chunks itself);
- peak RSS growth while encoding (hearthlm: the tower's activations; llama.cpp reserves its compute buffer when
  mtmd_init_from_file warms up, so its growth during an encode is near zero: not the same quantity).
A `ratio` line gives hearthlm / llama.cpp: above 1 for encode ms is slower, above 1 for prefill is faster.

llama.cpp's side (`--no-llama-cpp` leaves it out): llama-cpp-python 0.3.36, whose libmtmd reads `gemma4v`
projectors. Beside the checkpoint the script writes, once, the text model as a GGUF (`--gguf-type`, bf16 by default
as hearthlm runs it; tests/gguf_files.py's Gemma 4 layout, the test tokenizer's vocabulary padded to E2B's 262144)
and the vision tower as an F32 mmproj (tests/test_multimodal_files.py's writer, llama.cpp's converter's layout).
mtmd gets image_min_tokens = image_max_tokens = the budget; it then makes as many image tokens as hearthlm (256 at
280, 1089 at 1120: both resize to multiples of 48 px under the budget), which the script checks and reports if not.
The text model runs with n_batch 2048 (a whole prompt in one batch), no flash attention, `--threads` threads.

Measured with `--layers 10 --runs 2`, 2 threads, on a quiet 2-core VM (load 0.7-2.0; docs/multimodal.md, Speed):
    budget  engine     img tok  prompt  encode   prefill
    280     hearthlm   256      285     3.3 s    1071 t/s
    280     llama.cpp  256      285     4.9 s    162 t/s
    1120    hearthlm   1089     1118    30.5 s   957 t/s
    1120    llama.cpp  1089     1118    51.9 s   164 t/s
"""

from __future__ import annotations

import argparse
import json
import os
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
_QUIET = None  # set with llama_cpp: a log callback that drops mtmd's per-image messages, kept alive here
SIDES = {70: 432, 140: 576, 280: 864, 560: 1152, 1120: 1632}  # a square image of this side fills the budget


def build(layers: int, tower: str = "vision") -> Path:
    """E2B's text model (cut to `layers`) with its vision or audio tower (`tower`), random weights, saved as a
    checkpoint folder."""
    import transformers as tf
    from test_multimodal import IDS, _tokenizer

    folder = OUT / f"gemma4-e2b-{tower}-L{layers}"
    if (folder / "config.json").exists():
        return folder
    hf = json.loads((ROOT / "src/hearthlm/known_models/gemma-4-E2B.json").read_text())
    other = "audio" if tower == "vision" else "vision"
    towers = {f"{tower}_config": hf.pop(f"{tower}_config")} | ({"vision_config": None} if tower == "audio" else {})
    hf.pop(f"{other}_config", None)
    shared = hf["num_kv_shared_layers"] * layers // hf["num_hidden_layers"]
    text = hf | {
        "num_hidden_layers": layers,
        "layer_types": hf["layer_types"][:layers],
        "num_kv_shared_layers": shared,
    }
    config = tf.Gemma4Config(text_config=text, **towers, **IDS)
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


def write_ggufs(folder: Path, text_type: str = "bf16") -> tuple[Path, Path]:
    """The checkpoint as llama.cpp takes it, written once beside it: the text model as a BF16 or F16 GGUF (as
    tests/gguf_files.py writes Gemma 4, the test tokenizer's vocabulary padded to E2B's) and the vision tower as an
    F32 mmproj (tests/test_multimodal_files.py's writer, llama.cpp's converter's layout; F32 as hearthlm runs it)."""
    text, mmproj = folder / f"{folder.name}-{text_type}.gguf", folder / f"mmproj-{folder.name}-f32.gguf"
    if not text.exists():
        _text_gguf(folder, text, text_type)
    if not mmproj.exists():
        _mmproj_gguf(folder, mmproj)
    return text, mmproj


def _text_gguf(folder: Path, path: Path, text_type: str) -> None:
    import gguf
    from gguf_files import write_gguf
    from safetensors import safe_open
    from test_multimodal_files import byte_vocab_metadata

    cfg = json.loads((folder / "config.json").read_text())
    text = cfg["text_config"] | {"eos_token_id": 1, "tie_word_embeddings": True}
    metadata = byte_vocab_metadata(folder, text["vocab_size"], chat_template=False)

    def state():
        with safe_open(folder / "model.safetensors", "pt") as f:
            for k in f.keys():
                if k.startswith("model.language_model."):
                    yield k.replace("model.language_model.", "model."), f.get_tensor(k).float().numpy()

    tmp = path.with_suffix(".part")
    write_gguf(tmp, "Gemma4ForCausalLM", text, state(), gguf.GGMLQuantizationType[text_type.upper()], metadata)
    tmp.rename(path)


def _mmproj_gguf(folder: Path, path: Path) -> None:
    from types import SimpleNamespace

    import transformers as tf
    from safetensors import safe_open
    from test_multimodal_files import _write_mmproj

    with safe_open(folder / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.vision_tower.", "model.embed_vision."))}
    ref = SimpleNamespace(config=tf.Gemma4Config.from_pretrained(folder), state_dict=lambda: state)
    tmp = path.with_suffix(".part")
    _write_mmproj(ref, tmp, vision=True, audio=False)
    tmp.rename(path)


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
        "text_weights": "bf16",
        "ids": prompt.ids,
        "image_start": prompt.spans[0].start,
        "image_tokens": prompt.spans[0].length,
        "prompt_tokens": tokens,
        "encode_ms": 1000 * statistics.median(encode),
        "prefill_tok_s": tokens / statistics.median(prefill),
        "encode_peak_rss_mb": peak / 1e6,
    }


def _mtmd_prompt(folder: Path, ids: list[int], start: int, length: int, marker: bytes) -> bytes:
    """hearthlm's prompt as text with llama.cpp's media marker where `<|image>` + soft tokens + `<image|>` stand
    (mtmd writes those itself for gemma4v)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.id_to_token(ids[start - 1]) == "<|image>" and tok.id_to_token(ids[start + length]) == "<image|>"
    before = tok.decode(ids[: start - 1], skip_special_tokens=False)
    after = tok.decode(ids[start + length + 1 :], skip_special_tokens=False)
    return before.encode() + marker + after.encode()


def _mtmd_chunks(mtmd, ctx, text: bytes, bitmap):
    import ctypes

    chunks = mtmd.mtmd_input_chunks_init()
    inp = mtmd.mtmd_input_text(text, len(text), False, True)  # no BOS added: the prompt has it; specials parsed
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1)
    if rc != 0:
        raise RuntimeError(f"mtmd_tokenize failed ({rc})")
    return chunks, [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]


def _mtmd_run(mtmd, ctx, lctx, parts: list, n_batch: int) -> tuple[float, float, int]:
    """The steps of mtmd_helper_eval_chunks, timed apart: -> (encode s, prefill s without encode, peak RSS growth)."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
    n_past, encode, prefill, peak = ctypes.c_int32(0), 0.0, 0.0, 0
    for i, chunk in enumerate(parts):
        last = i == len(parts) - 1
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            start = time.perf_counter()
            rc = mtmd.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, 0, n_batch, last, ctypes.byref(n_past))
            prefill += time.perf_counter() - start
        else:
            _reset_peak()
            before = _status("VmRSS")
            start = time.perf_counter()
            rc = mtmd.mtmd_encode_chunk(ctx, chunk)
            encode += time.perf_counter() - start
            peak = max(peak, _status("VmHWM") - before)
            embd = mtmd.mtmd_get_output_embd(ctx)
            start = time.perf_counter()
            rc = rc or mtmd.mtmd_helper_decode_image_chunk(
                ctx,
                lctx,
                chunk,
                embd,
                n_past,
                0,
                n_batch,
                ctypes.byref(n_past),
                mtmd.mtmd_helper_post_decode_callback(),
                None,
            )
            prefill += time.perf_counter() - start
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed on chunk {i} ({rc})")
    return encode, prefill, peak


def llamacpp_figures(folder: Path, hearth: dict, budget: int, runs: int, threads: int, text_type: str) -> dict:
    """The same figures with llama.cpp (llama-cpp-python) and its mtmd library through ctypes: the text GGUF,
    the F32 mmproj, the same RGB pixels and prompt text, image_min_tokens = image_max_tokens = the budget."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    global _QUIET
    _QUIET = _QUIET or llama_cpp.llama_log_callback(lambda level, text, data: None)
    text_path, mmproj = write_ggufs(folder, text_type)
    mtmd.mtmd_helper_log_set(_QUIET, None)
    n_batch = 2048
    llm = llama_cpp.Llama(str(text_path), n_ctx=4096, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                          verbose=False)  # fmt: skip
    lctx = llm._ctx.ctx
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, threads
    params.image_min_tokens = params.image_max_tokens = budget
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    if not ctx:
        raise RuntimeError(f"mtmd_init_from_file failed on {mmproj}")
    pixels = np.ascontiguousarray(image(budget))
    data = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], data)
    text = _mtmd_prompt(
        folder, hearth["ids"], hearth["image_start"], hearth["image_tokens"], mtmd.mtmd_default_marker()
    )
    chunks, parts = _mtmd_chunks(mtmd, ctx, text, bitmap)
    images = [p for p in parts if mtmd.mtmd_input_chunk_get_type(p) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    new_n_past = ctypes.c_int32(0)  # warm-up through the helper itself
    if mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, n_batch, True, ctypes.byref(new_n_past)) != 0:
        raise RuntimeError("mtmd_helper_eval_chunks failed")
    timed = [_mtmd_run(mtmd, ctx, lctx, parts, n_batch) for _ in range(runs)]
    tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
    row = {
        "engine": "llama.cpp",
        "text_weights": text_type,
        "image_tokens": sum(mtmd.mtmd_input_chunk_get_n_tokens(p) for p in images),
        "prompt_tokens": tokens,
        "encode_ms": 1000 * statistics.median(t[0] for t in timed),
        "prefill_tok_s": tokens / statistics.median(t[1] for t in timed),
        "encode_peak_rss_mb": max(t[2] for t in timed) / 1e6,
    }
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    llm.close()
    return row


def print_table(rows: list[dict]) -> None:
    """Both engines per budget, and hearthlm / llama.cpp for encode time (lower is better) and prefill speed."""
    print(f"{'engine':10} {'img tok':>7} {'prompt':>7} {'encode ms':>10} {'prefill tok/s':>14} {'encode peak MB':>15}")
    for r in rows:
        peak = f"{r['encode_peak_rss_mb']:.0f}" if r.get("encode_peak_rss_mb") is not None else "—"
        print(f"{r['engine']:10} {r['image_tokens']:7d} {r['prompt_tokens']:7d} {r['encode_ms']:10.0f} "
              f"{r['prefill_tok_s']:14.1f} {peak:>15}")  # fmt: skip
        if r["engine"] == "llama.cpp":
            h = next(x for x in rows if x["engine"] == "hearthlm" and x["budget"] == r["budget"])
            print(f"{'ratio':10} {'':7} {'':7} {h['encode_ms'] / r['encode_ms']:9.2f}x "
                  f"{h['prefill_tok_s'] / r['prefill_tok_s']:13.2f}x   (hearthlm / llama.cpp)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--budgets", default="280,1120")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--gguf-type", choices=("bf16", "f16"), default="bf16", help="llama.cpp's text weights")
    ap.add_argument("--no-llama-cpp", action="store_true", help="hearthlm's figures only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = build(args.layers)
    print(f"{folder.name}: E2B text model ({args.layers} layers) + vision tower, bf16, {args.threads} threads")
    load = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        hearth = hearthlm_figures(folder, budget, args.runs) | {"budget": budget}
        rows.append(hearth)
        if not args.no_llama_cpp:
            rows.append(
                llamacpp_figures(folder, hearth, budget, args.runs, args.threads, args.gguf_type) | {"budget": budget}
            )
            if rows[-1]["image_tokens"] != hearth["image_tokens"]:
                print(f"budget {budget}: llama.cpp made {rows[-1]['image_tokens']} image tokens, "
                      f"hearthlm {hearth['image_tokens']}")  # fmt: skip
        hearth.pop("ids")
    load = [load, [round(x, 2) for x in os.getloadavg()]]
    print_table(rows)
    print(f"load average (1, 5, 15 min) at start / end: {load[0]} / {load[1]}")
    out = ROOT / "benchmarks/results" / f"multimodal-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"command": " ".join(["python", "benchmarks/multimodal.py", *sys.argv[1:]]), "load_average": load,
            "cpus": os.cpu_count(), "threads": args.threads, "layers": args.layers,
            "gguf_type": args.gguf_type}  # fmt: skip
    out.write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
