"""Train hearthlm's built-in demo models from public-domain / permissively licensed Debian texts.

    python training/train_demo.py corpus              # fetch the .deb files, write corpus/*.jsonl
    python training/train_demo.py tokenizer           # byte-level BPE, 4096 tokens, Gemma 4 specials
    python training/train_demo.py train --variant dense --steps 3000
    python training/train_demo.py train --variant moe --steps 3000
    python training/train_demo.py export --variant dense   # -> src/hearthlm/demo/<name>/

Everything is seeded; the work directory defaults to ~/.cache/hearthlm/demo-train. The model is
transformers' Gemma4ForCausalLM (the reference implementation we check against), so the export
is an ordinary Hugging Face checkpoint folder. Needs the test extra (transformers) and apt-get.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORK = Path.home() / ".cache" / "hearthlm" / "demo-train"
REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "src" / "hearthlm" / "demo"
TEMPLATE = REPO / "training" / "gemma4_chat_template.jinja"

PACKAGES = ["bible-kjv", "bible-kjv-text", "fortunes", "python3.11-doc"]
SOURCES = ("kjv", "fortunes", "pydocs")
CAP_BYTES = 4_500_000  # per source, so no topic drowns the others
HELD_OUT = 0.02  # fraction of documents kept for perplexity

SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
]  # fmt: skip
VOCAB = 4096

# Questions that introduce a chat-formatted training document, per source.
PROMPTS = {
    "kjv": ["Read me {ref}.", "What does {ref} say?", "Recite {ref} from the King James Bible."],
    "fortunes": ["Tell me a fortune.", "Say something witty.", "Give me a quote.", "Tell me a joke."],
    "pydocs": ["Explain {ref} in Python.", "What is {ref}?", "Tell me about {ref}."],
}


# ----------------------------------------------------------------------------- corpus
def _fetch(dest: Path) -> Path:
    """Download and unpack the Debian packages (apt-get download needs no root)."""
    root = dest / "debs"
    if (root / "done").exists():
        return root / "x"
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=root, check=True)
    for deb in sorted(root.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "x")], check=True)
    (root / "done").write_text("ok")
    return root / "x"


def _kjv(x: Path) -> list[tuple[str, str]]:
    bible = x / "usr/bin/bible"
    out = subprocess.run(
        [str(bible), "-f", "-p", str(x / "usr/lib"), "-d", "bible.data", "gen1:1-rev22:21"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if m:
            chapters.setdefault(f"{m[1]} {m[2]}", []).append(m[4].strip())
    return [(ref, "\n".join(verses)) for ref, verses in chapters.items()]


def _fortunes(x: Path) -> list[tuple[str, str]]:
    docs = []
    for f in sorted((x / "usr/share/games/fortunes").iterdir()):
        if f.suffix or f.is_symlink() or f.name in ("art", "ascii-art"):
            continue
        for text in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = text.strip("\n")
            if 20 <= len(text) <= 1500:
                docs.append((f.name, text))
    return docs


_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?: <[^>]*>)?`")


def _clean_rst(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if re.fullmatch(r"([=\-~^*#\"'`+])\1{2,}\s*", line):  # section underlines
            continue
        if line.startswith(".. ") or re.match(r"\s+:[a-z-]+:", line):  # directives, options
            continue
        line = _ROLE.sub(r"\1", line).replace("``", "")
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pydocs(x: Path) -> list[tuple[str, str]]:
    docs = []
    for f in sorted((x / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
        if f.parts[-2] in ("whatsnew", "c-api", "distutils") or "changelog" in f.name:
            continue
        text = _clean_rst(f.read_text(encoding="utf-8", errors="replace"))
        chunk: list[str] = []
        for para in text.split("\n\n"):
            chunk.append(para)
            if sum(map(len, chunk)) > 1500:
                docs.append((f.name.removesuffix(".rst.txt"), "\n\n".join(chunk)))
                chunk = []
        if chunk:
            docs.append((f.name.removesuffix(".rst.txt"), "\n\n".join(chunk)))
    return docs


def corpus(args) -> None:
    x = _fetch(args.work)
    out = args.work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("kjv", _kjv), ("fortunes", _fortunes), ("pydocs", _pydocs)):
        docs = fn(x)
        random.Random(name).shuffle(docs)
        kept, size = [], 0
        for ref, text in docs:
            if size > CAP_BYTES:
                break
            kept.append((ref, text))
            size += len(text)
        splits = {"train": [], "val": []}
        for ref, text in kept:
            h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
            splits["val" if h < HELD_OUT else "train"].append({"source": name, "ref": ref, "text": text})
        for split, rows in splits.items():
            with open(out / f"{name}.{split}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
        print(f"{name}: {len(splits['train'])} train / {len(splits['val'])} val documents, {size / 1e6:.1f} MB")


def _rows(work: Path, split: str):
    for name in SOURCES:
        with open(work / "corpus" / f"{name}.{split}.jsonl") as fh:
            yield from (json.loads(line) for line in fh)


# ----------------------------------------------------------------------------- tokenizer
def tokenizer(args) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator((row["text"] for row in _rows(args.work, "train")), trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tok.save(str(args.work / "tokenizer.json"))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {args.work / 'tokenizer.json'}")


# ----------------------------------------------------------------------------- model
def model_config(variant: str) -> dict:
    """A miniature Gemma 4: dense = E2B's features (PLE, KV sharing, double-wide MLP);
    moe = 26B-A4B's (experts beside a small dense MLP, k=v on full layers)."""
    full_rope = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}
    common = dict(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
        head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        sliding_window=128, max_position_embeddings=2048, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}, "full_attention": full_rope},
    )  # fmt: skip
    if variant == "dense":
        return common | dict(
            intermediate_size=512, hidden_size_per_layer_input=64, vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=2, use_double_wide_mlp=True,
        )  # fmt: skip
    return common | dict(
        intermediate_size=256, hidden_size_per_layer_input=0, num_kv_shared_layers=0, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=256,
    )  # fmt: skip


def _format(row: dict, rng: random.Random, chat_share: float) -> str:
    """A training document: plain text, or (a share of them) one user/model exchange in Gemma 4's
    chat format, so that the demo answers in `hearth chat` and stops at the end of its turn."""
    if rng.random() >= chat_share:
        return row["text"] + "<eos>"
    ref = row["ref"].replace("_", " ")
    q = rng.choice(PROMPTS[row["source"]]).format(ref=ref)
    return f"<|turn>user\n{q}<turn|>\n<|turn>model\n{row['text']}<turn|>\n"


def _encode(work: Path, split: str, seed: int, chat_share: float, tokenizer: Path | None = None):
    """The split's documents as token ids (and their sources), with the tokenizer `train tokenizer` wrote unless
    another one is given."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer or work / "tokenizer.json"))
    rng = random.Random(seed)
    rows = list(_rows(work, split))
    rng.shuffle(rows)
    ids = [e.ids for e in tok.encode_batch([_format(r, rng, chat_share) for r in rows])]
    return ids, [r["source"] for r in rows]


def train(args) -> None:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.work / args.variant
    out.mkdir(parents=True, exist_ok=True)
    ids, _ = _encode(args.work, "train", args.seed, args.chat_share)
    stream = torch.tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    print(f"{args.variant}: {stream.numel() / 1e6:.2f}M training tokens", flush=True)

    config = transformers.Gemma4TextConfig(**model_config(args.variant))
    model = transformers.Gemma4ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.variant}: {n_params / 1e6:.2f}M parameters", flush=True)

    routers = [m for m in model.modules() if isinstance(m, transformers.models.gemma4.modeling_gemma4.Gemma4TextRouter)]
    balance: list[torch.Tensor] = []

    def record(module, inputs, output):  # Switch-Transformer load-balancing loss per MoE layer
        probs, _, top = output
        e = probs.shape[-1]
        frac = torch.zeros(e).scatter_add_(0, top.flatten(), torch.ones(top.numel())) / top.numel()
        balance.append(e * (frac * probs.mean(0)).sum())

    for r in routers:
        r.register_forward_hook(record)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    warmup = max(1, args.steps // 30)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    span = args.seq_len + 1
    t0, seen = time.time(), 0
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - span, (args.batch,), generator=gen)
        batch = torch.stack([stream[s : s + span] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        balance.clear()
        logits = model(input_ids=batch[:, :-1]).logits
        lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = torch.stack(balance).mean() if balance else torch.zeros(())
        loss = lm + args.balance_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += batch[:, :-1].numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            rate = seen / (time.time() - t0)
            print(
                f"step {step:5d}  loss {lm.item():.3f}  balance {aux.item():.3f}  lr {lr_at(step):.2e}  "
                f"{rate:.0f} tok/s  {seen / 1e6:.2f}M tokens  {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
        if args.save and ((step + 1) % 200 == 0 or step == args.steps - 1):
            model.save_pretrained(out / "checkpoint")
    (out / "train.json").write_text(
        json.dumps({"steps": args.steps, "tokens": seen, "minutes": (time.time() - t0) / 60, "params": n_params,
                    "args": {k: str(v) for k, v in vars(args).items() if k != "func"}}, indent=1)
    )  # fmt: skip


def evaluate(args) -> None:
    """Held-out perplexity per source (plain text, windows of seq_len) and bits per byte."""
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    folder = args.folder or args.work / args.variant / "checkpoint"
    model = transformers.Gemma4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, sources = _encode(args.work, "val", args.seed, chat_share=0.0)
    rows = list(_rows(args.work, "val"))
    router_cls = transformers.models.gemma4.modeling_gemma4.Gemma4TextRouter
    routers = [m for m in model.modules() if isinstance(m, router_cls)]
    usage = torch.zeros(len(routers), model.config.num_experts or 1)

    def counter(i):
        def hook(module, inputs, output):
            usage[i] += torch.bincount(output[2].flatten(), minlength=usage.shape[1]).float()

        return hook

    for i, r in enumerate(routers):
        r.register_forward_hook(counter(i))
    report = {}
    for name in SOURCES:
        stream = np.concatenate([np.asarray(x, dtype=np.int64) for x, s in zip(ids, sources) if s == name])
        nbytes = sum(len(r["text"].encode()) + 1 for r in rows if r["source"] == name)
        nll, count = 0.0, 0
        usage.zero_()
        with torch.no_grad():
            for start in range(0, len(stream) - 1, args.seq_len):
                chunk = torch.tensor(stream[start : start + args.seq_len + 1])[None]
                if chunk.shape[1] < 2:
                    continue
                logits = model(input_ids=chunk[:, :-1]).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
                count += chunk.shape[1] - 1
        report[name] = {
            "perplexity": round(math.exp(nll / count), 2),
            "bits_per_byte": round(nll / math.log(2) / nbytes, 3),
            "tokens": count,
        }
        if routers:  # share of this source's routings that each expert receives, per layer
            share = usage / usage.sum(-1, keepdim=True)
            report[name]["expert_share_per_layer"] = [[round(x, 3) for x in row] for row in share.tolist()]
        print(name, report[name], flush=True)
    (Path(folder) / "eval.json").write_text(json.dumps(report, indent=1))


def export(args) -> None:
    """Write the shipped folder: bfloat16 safetensors, tokenizer, chat template, generation config."""
    import torch
    import transformers

    src = args.work / args.variant / "checkpoint"
    dest = DEMO_DIR / NAMES[args.variant]
    dest.mkdir(parents=True, exist_ok=True)
    model = transformers.Gemma4ForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(dest)
    shutil.copy(args.work / "tokenizer.json", dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 2048, "chat_template": TEMPLATE.read_text(),
    }, indent=1))  # fmt: skip
    (dest / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 2, "eos_token_id": [1, 6, 14], "pad_token_id": 0, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
    }, indent=1))  # fmt: skip
    for extra in ("eval.json", "train.json"):
        for where in (src, src.parent):
            if (where / extra).exists():
                shutil.copy(where / extra, dest / extra)
    print(f"exported {dest} ({sum(f.stat().st_size for f in dest.iterdir()) / 1e6:.1f} MB)")


NAMES = {"dense": "hearth-demo", "moe": "hearth-demo-moe"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    sub = p.add_subparsers(required=True)
    sub.add_parser("corpus").set_defaults(func=corpus)
    sub.add_parser("tokenizer").set_defaults(func=tokenizer)
    t = sub.add_parser("train")
    t.set_defaults(func=train)
    e = sub.add_parser("eval")
    e.set_defaults(func=evaluate)
    e.add_argument("--folder", type=Path)
    x = sub.add_parser("export")
    x.set_defaults(func=export)
    for q in (t, e, x):
        q.add_argument("--variant", choices=NAMES, default="dense")
        q.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--chat-share", type=float, default=0.25)
    t.add_argument("--balance-coef", type=float, default=0.01)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
