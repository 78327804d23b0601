"""Train hearth-demo-vision, the tiny Gemma 4 vision-language demo that ships with hearthlm, and evaluate it.

It learns to answer five questions about synthetic pictures (examples/vision_demo_data.py: coloured shapes, digits,
short words): "What is in this picture?", "What colour is the shape?", "What shape is this?", "What digit is
this?", "What word is written?". The model is transformers' Gemma4ForConditionalGeneration (the reference
implementation hearthlm is tested against): E2B's text features in miniature and a small vision tower, trained
from scratch at the 70-token image budget on pictures drawn afresh for every batch. The text demo's tokenizer is
reused, with Gemma 4's image and audio markers added after its 4096 tokens.

    python examples/train_vision_demo.py --work /tmp/vd/stage1 train --steps 1600
    python examples/train_vision_demo.py --work /tmp/vd/stage2 --seed 1 train --init /tmp/vd/stage1/checkpoint --steps 2600
    python examples/train_vision_demo.py --work /tmp/vd/stage2 export   # src/hearthlm/demo/hearth-demo-vision (bf16)
    python examples/train_vision_demo.py eval       # held-out accuracy through hearthlm's LLM.chat -> eval.json
    python examples/train_vision_demo.py pictures   # the example PNGs in examples/

The two stages took 17 and 30 minutes (one training thread plus one worker drawing pictures) on a shared 2-core
AMD EPYC; the shipped model's figures are in src/hearthlm/demo/README.md.
Everything is seeded (training pictures from --seed, evaluation pictures from a different seed).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vision_demo_data import ANSWERS, ASKED, sample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "hearthlm" / "demo"
TEXT_DEMO = DEMO / "hearth-demo"  # its tokenizer and chat template are reused
DEST = DEMO / "hearth-demo-vision"
WORK = Path.home() / ".cache" / "hearthlm" / "vision-demo-train"
BUDGET = 70  # soft tokens per image
MARKERS = ["<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>", "<audio|>", "<|video|>"]  # ids 4096..4102
BOI, IMAGE, EOI, BOA, AUDIO, EOA, VIDEO = range(4096, 4103)
TURN_END = 6  # <turn|>
EVAL_SEED = 1_000_003  # evaluation pictures: never drawn in training (training uses --seed and its batches)

TEXT_CONFIG = dict(
    vocab_size=4103, vocab_size_per_layer_input=4103, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], sliding_window=128,
    hidden_size_per_layer_input=32, num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=False,
    final_logit_softcapping=30.0, max_position_embeddings=1024, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)  # fmt: skip
VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=32, position_embedding_size=1024, standardize=False,
)  # fmt: skip
MEDIA_IDS = dict(
    boi_token_id=BOI, image_token_id=IMAGE, eoi_token_id=EOI, boa_token_id=BOA, audio_token_id=AUDIO,
    eoa_token_index=EOA, video_token_id=VIDEO,
)  # fmt: skip


def _tokenizer():
    """The text demo's tokenizer with Gemma 4's media markers added as special tokens (ids 4096-4102)."""
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TEXT_DEMO / "tokenizer.json"))
    if tok.get_vocab_size() != 4096:
        raise SystemExit(f"expected the text demo's 4096-token vocabulary, found {tok.get_vocab_size()}")
    tok.add_special_tokens(MARKERS)
    names = ("boi", "image", "eoi", "boa", "audio", "eoa")
    template = json.loads((TEXT_DEMO / "tokenizer_config.json").read_text())["chat_template"]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={f"{n}_token": m for n, m in zip(names, MARKERS)}, model_max_length=1024,
    )  # fmt: skip
    fast.chat_template = template
    assert [fast.convert_tokens_to_ids(m) for m in MARKERS] == list(range(4096, 4103))
    return fast


def _config():
    import transformers

    return transformers.Gemma4Config(
        text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, audio_config=None, **MEDIA_IDS, tie_word_embeddings=True
    )


def _prompt_ids(tok, question: str, soft_tokens: int) -> list[int]:
    """The chat prompt for one picture and one question, its image placeholder expanded as the processor does."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    at = ids.index(IMAGE)
    return ids[:at] + [BOI] + [IMAGE] * soft_tokens + [EOI] + ids[at + 1 :]


def _batch(tok, processor, rng: random.Random, size: int) -> dict:
    """`size` fresh pictures and questions: pixel inputs, token ids, and labels on the answer and <turn|> only."""
    items = [sample(rng) for _ in range(size)]
    pixels = processor([it.image for it in items], max_soft_tokens=BUDGET, return_tensors="pt")
    rows, labels = [], []
    for it, n in zip(items, pixels["num_soft_tokens_per_image"]):
        prompt = _prompt_ids(tok, it.question, int(n))
        answer = tok.encode(it.answer, add_special_tokens=False) + [TURN_END]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.zeros(size, width, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    target = torch.full((size, width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        ids[i, : len(row)], mask[i, : len(row)], target[i, : len(lab)] = torch.tensor(row), 1, torch.tensor(lab)
    # The processor pads every image to the budget's 630 patches; keep only as many as the largest image has
    # (576 for these square pictures): the padding is masked out, so this changes nothing but the time.
    positions = pixels["image_position_ids"]
    keep = int((positions[..., 0] >= 0).sum(1).max())
    return dict(
        input_ids=ids, attention_mask=mask, labels=target, pixel_values=pixels["pixel_values"][:, :keep],
        image_position_ids=positions[:, :keep], mm_token_type_ids=(ids == IMAGE).long(),
    )  # fmt: skip


class _Batches(torch.utils.data.IterableDataset):
    """Endless training batches, drawn in a worker process so that drawing overlaps the training step."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def __iter__(self):
        import transformers

        torch.set_num_threads(1)
        rng, tok, processor = random.Random(self.seed), _tokenizer(), transformers.Gemma4ImageProcessorPil()
        while True:
            yield _batch(tok, processor, rng, self.size)


def train(args) -> None:
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = _tokenizer()
    batches = iter(torch.utils.data.DataLoader(_Batches(args.seed, args.batch), batch_size=None, num_workers=1))
    earlier = (
        json.loads((args.init / "train.json").read_text())
        if args.init and (args.init / "train.json").exists()
        else None
    )
    if args.init:  # go on from a checkpoint (a second stage, with another --seed so its pictures are new)
        model = transformers.Gemma4ForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.config._attn_implementation = "sdpa"
    else:
        config = _config()
        config._attn_implementation = "sdpa"
        model = transformers.Gemma4ForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm))))

    out = args.work / "checkpoint"
    start, seen, running = time.time(), 0, None
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = next(batches)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += args.batch
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step == 0:
            minutes = (time.time() - start) / 60
            print(f"step {step + 1}/{args.steps} loss {running:.4f} lr {lr_at(step):.2e} {minutes:.1f} min", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            model.save_pretrained(out)
    minutes = (time.time() - start) / 60
    model.save_pretrained(out)
    tok.save_pretrained(out)
    record = {
        "steps": args.steps, "pictures": seen, "minutes": round(minutes, 1), "final_loss": round(running, 4),
        "params": params, "image_tokens": BUDGET,
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
    }  # fmt: skip
    if earlier:
        record["earlier_stage"] = earlier
    (out / "train.json").write_text(json.dumps(record, indent=1))
    print(f"done: {seen} pictures in {minutes:.1f} min, loss {running:.4f}", flush=True)


def export(args) -> None:
    """The shipped folder: bfloat16 safetensors, tokenizer with the media markers, chat template, configs."""
    import transformers

    src, dest = args.work / "checkpoint", args.dest
    dest.mkdir(parents=True, exist_ok=True)
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    model.config.update(MEDIA_IDS)  # (the first checkpoints left video_token_id at Gemma 4's 258884)
    model.to(torch.bfloat16).save_pretrained(dest)
    (dest / "model.safetensors").chmod(0o644)  # written 0600; package data must be readable by all
    tok = _tokenizer()
    tok.save_pretrained(dest)
    (dest / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 2, "eos_token_id": [1, 6, 14], "pad_token_id": 0, "do_sample": False,
    }, indent=1))  # fmt: skip
    # The budget it was trained at, where transformers' processor reads it (AutoProcessor.from_pretrained).
    image_processor = transformers.Gemma4ImageProcessorPil(max_soft_tokens=BUDGET).to_dict()
    (dest / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "image_seq_length": BUDGET, "image_processor": image_processor,
    }, indent=1))  # fmt: skip
    for extra in ("train.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dest / extra)
    print(f"exported {dest} ({sum(f.stat().st_size for f in dest.iterdir()) / 1e6:.1f} MB)")


def _wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    p, d = right / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(args) -> None:
    """Held-out exact-match accuracy through hearthlm's own path: LLM(folder).chat, greedy, the 70-token budget."""
    from hearthlm import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(str(args.folder))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    rng = random.Random(EVAL_SEED)
    report, start = {}, time.time()
    for kind, questions in ASKED.items():
        for q in questions:
            right = 0
            for _ in range(args.per_case):
                item = sample(rng, kind, q)
                got = llm.chat(item.messages(), params, image_tokens=BUDGET).text.strip()
                right += got == item.answer
            report[f"{kind}/{q}"] = {
                "accuracy": round(right / args.per_case, 3), "n": args.per_case,
                "wilson95": [round(x, 3) for x in _wilson(right, args.per_case)], "chance": round(1 / ANSWERS[kind, q], 3),
            }  # fmt: skip
            print(kind, q, report[f"{kind}/{q}"], flush=True)
    total = sum(r["accuracy"] * r["n"] for r in report.values()) / sum(r["n"] for r in report.values())
    record = {
        "how": "exact match of LLM.chat's greedy reply on freshly drawn pictures (seed "
        f"{EVAL_SEED}, never drawn in training), image_tokens={BUDGET}, shipped bfloat16 weights",
        "overall": round(total, 3), "cases": report, "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    (Path(args.folder) / "eval.json").write_text(json.dumps(record, indent=1))
    print(f"overall {total:.3f}")


PICTURES = {  # the example pictures shipped in examples/: (file name, kind, seed)
    "vision-shape.png": ("shape", 2),
    "vision-digit.png": ("digit", 5),
    "vision-word.png": ("word", 3),
}


def pictures(args) -> None:
    for name, (kind, seed) in PICTURES.items():
        item = sample(random.Random(seed), kind, "picture")
        item.image.save(ROOT / "examples" / name, optimize=True)
        print(name, item.answer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)  # on a shared 2-core machine 1 beat 2 (a worker draws)
    sub = p.add_subparsers(required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--save-every", type=int, default=250)
    t.add_argument("--init", type=Path, default=None, help="start from this checkpoint instead of random weights")
    t.set_defaults(func=train)
    x = sub.add_parser("export")
    x.add_argument("--dest", type=Path, default=DEST)
    x.set_defaults(func=export)
    e = sub.add_parser("eval")
    e.add_argument("--folder", type=Path, default=DEST)
    e.add_argument("--per-case", type=int, default=100)
    e.set_defaults(func=evaluate)
    sub.add_parser("pictures").set_defaults(func=pictures)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
