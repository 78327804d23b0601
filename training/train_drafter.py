"""Train a Gemma 4 MTP drafter for the built-in demo model (src/hearthlm/demo/hearth-demo -> hearth-demo-assistant).

    python training/train_demo.py corpus                  # the demo's data (Debian packages), if not there yet
    python training/train_drafter.py --threads 1 train    # distil from the demo model (13 min on one busy core)
    python training/train_drafter.py export               # -> src/hearthlm/demo/hearth-demo-assistant
    python training/train_drafter.py eval                 # held-out agreement of the shipped drafter, per source
    python training/train_drafter.py prompts              # benchmarks/data/demo_heldout.jsonl (held-out openings)

The drafter is transformers' Gemma4AssistantForCausalLM (the architecture of google/gemma-4-*-it-assistant): a few
Gemma 4 layers whose attention has queries only and reads the demo's own K/V (its last sliding and last full layer
that store K/V), fed the demo's scaled embedding of the last token next to the demo's final hidden state before it.

How it learns (multi-token prediction by distillation): the demo model runs over a window of training text once,
without gradients, and gives its hidden states, K/V and next-token distributions at every position. For every
position p the drafter then runs `--depth` chained steps exactly as it drafts at run time: its query sits at p and
reads the demo's K/V of positions < p; step 1 reads the token at p and the demo's hidden state at p - 1, step j
reads the token at p + j - 1 (teacher forcing with the text) and step j - 1's projected output. Step j learns the
demo's distribution at p + j - 1 (KL divergence), which is what the demo's verification compares its draft with.
A sample of `--queries` positions per window runs in parallel, with attention masks that give query p the keys the
engine gives it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from train_demo import DEMO_DIR, REPO, SOURCES, WORK, _encode

TARGET = DEMO_DIR / "hearth-demo"
DEST = DEMO_DIR / "hearth-demo-assistant"


def drafter_config(layers: int, hidden: int, heads: int, intermediate: int) -> dict:
    """A Gemma4AssistantConfig (as a dict) for the demo model: its layers read the demo's K/V (one KV head, 64-wide
    on sliding layers, 128-wide on full ones), the last layer is a full-attention one."""
    target = json.loads((TARGET / "config.json").read_text())
    types = (["sliding_attention"] * (layers - 1)) + ["full_attention"]
    text = dict(
        model_type="gemma4_text", vocab_size=target["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, layer_types=types, num_attention_heads=heads, num_key_value_heads=1, head_dim=64,
        global_head_dim=128, num_global_key_value_heads=1, sliding_window=target["sliding_window"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=layers,
        max_position_embeddings=target["max_position_embeddings"], rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2, rope_parameters=target["rope_parameters"],
        final_logit_softcapping=None, use_double_wide_mlp=False, enable_moe_block=False,
    )  # fmt: skip
    return dict(text_config=text, backbone_hidden_size=target["hidden_size"], use_ordered_embeddings=False)


@contextlib.contextmanager
def buildable():
    """transformers 5.23 cannot build its own drafter: Gemma4TextConfig.kv_sharing_modes raises when every layer
    shares K/V, which the drafter requires. Every drafter layer reuses the target's K/V, so while building or
    loading one, that is what the property says (tests/test_mtp_drafter.py patches it the same way)."""
    import transformers as tf

    modes = tf.Gemma4TextConfig.kv_sharing_modes

    def sharing(cfg):
        if cfg.num_kv_shared_layers == cfg.num_hidden_layers:
            return ["reuse"] * cfg.num_hidden_layers
        return modes.fget(cfg)

    tf.Gemma4TextConfig.kv_sharing_modes = property(sharing)
    try:
        yield
    finally:
        tf.Gemma4TextConfig.kv_sharing_modes = modes


def build_drafter(config: dict):
    """transformers' drafter from `config`, randomly initialised."""
    import transformers as tf

    text = tf.Gemma4TextConfig(**{k: v for k, v in config["text_config"].items() if k != "model_type"})
    cfg = tf.Gemma4AssistantConfig(text_config=text, **{k: v for k, v in config.items() if k != "text_config"})
    with buildable():
        return tf.Gemma4AssistantForCausalLM._from_config(cfg, attn_implementation="sdpa")


def load_drafter(folder: Path):
    import torch
    import transformers as tf

    with buildable():
        return tf.Gemma4AssistantForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def load_target(threads: int):
    import torch
    import transformers as tf

    torch.set_num_threads(threads)
    target = tf.Gemma4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="sdpa").eval()
    for i in producers(target.config).values():  # the layers the drafter reads keep their full-length K/V
        target.model.layers[i].self_attn.store_full_length_kv = True
    return target.requires_grad_(False)


def producers(config) -> dict[str, int]:
    """Layer type -> the target's last layer of that type that stores K/V."""
    n = config.num_hidden_layers - (config.num_kv_shared_layers or 0)
    return {t: max(i for i in range(n) if config.layer_types[i] == t) for t in set(config.layer_types[:n])}


def teacher(target, ids):
    """The target over ids [B, T]: its scaled embeddings [B, T, H], final hidden states [B, T, H], K/V per layer
    type ([B, 1, T, D] each) and log-probabilities [B, T, V]."""
    import torch

    with torch.no_grad():
        out = target(ids, use_cache=False, output_hidden_states=True, return_shared_kv_states=True)
        emb = target.model.embed_tokens(ids)
        kv = {t: (k, v) for t, (k, v) in out.shared_kv_states.items()}
        return emb, out.hidden_states[-1], kv, out.logits.float().log_softmax(-1)


def masks(queries, T: int, window: int) -> dict:
    """Query p (a position in 1..T-1) reads keys < p; on sliding layers the last window + 1 of them, as the engine's
    drafter does. True: attend. [1, 1, Q, T]"""
    import torch

    p = queries[:, None]
    k = torch.arange(T)[None]
    full = k < p
    return {"full_attention": full[None, None], "sliding_attention": (full & (k >= p - 1 - window))[None, None]}


def unroll(drafter, emb, hidden, kv, queries, window: int, depth: int):
    """The drafter's `depth` chained steps at the query positions `queries` [Q] (in 1..T-depth) -> log-probabilities,
    one [B, Q, V] per step; step j (from 0) reads the token at p + j."""
    import torch

    B, T, _ = emb.shape
    mask, pos = masks(queries, T, window), queries[None].expand(B, -1)
    state, out, keep = hidden[:, queries - 1], [], torch.arange(len(queries))
    for j in range(depth):
        x = drafter.pre_projection(torch.cat([emb[:, queries + j], state], dim=-1))
        h = drafter.model(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            shared_kv_states=kv,
            use_cache=False,
            logits_to_keep=keep,  # a tensor, not an int: transformers then keeps every position (its slicing
        ).last_hidden_state  # for KV-shared layers assumes per-layer inputs, which a drafter has none of)
        out.append(drafter.lm_head(h).float().log_softmax(-1))
        state = drafter.post_projection(h)
    return out


def distil_loss(steps, teacher_lp, queries, weights):
    """KL(target || drafter) of step j against the target's distribution at p + j (what the target's verification
    compares that draft token with), and the share of queries where the drafter's top token is the target's (a
    proxy of acceptance)."""
    import torch

    losses, agree = [], []
    for j, got in enumerate(steps):
        want = teacher_lp[:, queries + j]
        kl = torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1)
        losses.append(weights[j] * kl.mean())
        agree.append((got.argmax(-1) == want.argmax(-1)).float().mean().item())
    return torch.stack(losses).sum(), agree


def init_from_target(drafter, target) -> None:
    """Start the drafter's output table from the target's, projected on its top singular directions: the
    drafter's logits then need only learn to point its state along them."""
    import torch

    with torch.no_grad():
        E = target.model.embed_tokens.weight.float()  # [V, H target]
        U, S, _ = torch.linalg.svd(E, full_matrices=False)
        width = drafter.lm_head.weight.shape[1]
        small = U[:, :width] * S[:width]
        drafter.lm_head.weight.copy_(small / small.std() * drafter.config.text_config.initializer_range)


def train(args) -> None:
    import numpy as np
    import torch

    torch.manual_seed(args.seed)
    target = load_target(args.threads)
    work = args.work / "assistant"
    work.mkdir(parents=True, exist_ok=True)
    ids, _ = _encode(args.work, "train", args.seed, args.chat_share, TARGET / "tokenizer.json")
    stream = torch.tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    if args.greedy:  # the demo's own greedy text: what the drafter drafts for at temperature 0
        stream = greedy_stream(stream, args)
    if args.init is not None:
        drafter = load_drafter(args.init)
    else:
        drafter = build_drafter(drafter_config(args.layers, args.hidden, args.heads, args.intermediate))
        init_from_target(drafter, target)
    params = sum(p.numel() for p in drafter.parameters())
    print(f"drafter: {params / 1e6:.3f}M parameters; {stream.numel() / 1e6:.2f}M training tokens", flush=True)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    window = target.config.sliding_window
    weights = [0.8**j for j in range(args.depth)]
    gen = torch.Generator().manual_seed(args.seed)
    t0, seen = time.time(), 0
    drafter.train()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.seq_len, (args.batch,), generator=gen).tolist()
        batch = torch.stack([stream[s : s + args.seq_len] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        emb, hidden, kv, lp = teacher(target, batch)
        # a sample of the query positions: the target's forward gives all of them, but neighbours teach alike
        queries = torch.randperm(args.seq_len - args.depth, generator=gen)[: args.queries].sort().values + 1
        steps = unroll(drafter, emb, hidden, kv, queries, window, args.depth)
        loss, agree = distil_loss(steps, lp, queries, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        seen += batch.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {loss.item():.3f}  top-1 agreement per step "
                f"{' '.join(f'{a:.2f}' for a in agree)}  {seen / (time.time() - t0):.0f} tok/s  "
                f"{(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
    drafter.save_pretrained(work / "checkpoint")
    record = {"steps": args.steps, "tokens": seen, "minutes": round((time.time() - t0) / 60, 1), "params": params,
              "final_agreement": [round(a, 3) for a in agree],
              "args": {k: str(v) for k, v in vars(args).items() if k != "func"}}  # fmt: skip
    (work / "train.json").write_text(json.dumps(record, indent=1) + "\n")


def greedy_stream(stream, args):
    """`args.greedy` sequences of seq_len tokens: a 64-token opening of the training text at a random place, then
    the demo's greedy continuation (hearthlm's engine, bfloat16), cached in the work dir."""
    import torch

    from hearthlm import LLM, SamplingParams

    cache = args.work / "assistant" / f"greedy-{args.greedy}-{args.seq_len}-{args.seed}.pt"
    if cache.exists():
        return torch.load(cache)
    llm = LLM(TARGET, dtype="bfloat16")
    gen = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, stream.numel() - 64, (args.greedy,), generator=gen).tolist()
    prompts = [stream[s : s + 64].tolist() for s in starts]
    params = SamplingParams(max_tokens=args.seq_len - 64, temperature=0, ignore_eos=True)
    t0, rows = time.time(), []
    for i in range(0, len(prompts), 8):
        rows += [p + c.token_ids for p, c in zip(prompts[i : i + 8], llm.generate(prompts[i : i + 8], params))]
        print(f"greedy text: {len(rows)}/{len(prompts)} sequences, {(time.time() - t0) / 60:.1f} min", flush=True)
    out = torch.tensor(rows).flatten()
    torch.save(out, cache)
    return out


def lr_at(step: int, args) -> float:
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def export(args) -> None:
    """The shipped folder: the drafter in bfloat16 (as the demo ships), its config, its training record."""
    import torch

    src = args.work / "assistant"
    drafter = load_drafter(src / "checkpoint")
    DEST.mkdir(parents=True, exist_ok=True)
    drafter.to(torch.bfloat16).save_pretrained(DEST)
    shutil.copy(src / "train.json", DEST / "train.json")
    print(f"exported {DEST} ({sum(f.stat().st_size for f in DEST.iterdir()) / 1e6:.2f} MB)")


def evaluate(args) -> None:
    """Teacher-forced agreement on the held-out documents, per source: the share of positions where the drafter's
    j-th chained token is the demo's greedy token there (the demo's own text as context; a proxy of acceptance,
    which benchmarks/speculative.py measures in the engine)."""
    import numpy as np
    import torch

    target = load_target(args.threads)
    drafter = load_drafter(args.folder).eval()
    ids, sources = _encode(args.work, "val", args.seed, 0.0, TARGET / "tokenizer.json")
    T, report = 512, {}
    for name in SOURCES:
        stream = torch.tensor(
            np.concatenate([np.asarray(x, dtype=np.int64) for x, s in zip(ids, sources) if s == name])
        )
        hits, count = torch.zeros(args.depth), 0
        with torch.no_grad():
            for start in range(0, len(stream) - T + 1, T):
                emb, hidden, kv, lp = teacher(target, stream[start : start + T][None])
                queries = torch.arange(1, T - args.depth + 1)
                steps = unroll(drafter, emb, hidden, kv, queries, target.config.sliding_window, args.depth)
                _, agree = distil_loss(steps, lp, queries, [1.0] * args.depth)
                hits += torch.tensor(agree) * len(queries)
                count += len(queries)
        report[name] = {"agreement_per_step": [round(x, 3) for x in (hits / count).tolist()], "positions": count}
        print(name, report[name], flush=True)
    (args.folder / "eval.json").write_text(json.dumps(report, indent=1) + "\n")


def prompts(args) -> None:
    """benchmarks/data/demo_heldout.jsonl: the opening of held-out documents of each source (plain text, cut at a
    line end after --chars characters), the prompts benchmarks/speculative.py --task heldout continues."""
    from train_demo import _rows

    rows = {name: [] for name in SOURCES}
    for row in _rows(args.work, "val"):
        text = row["text"]
        if len(text) < 2 * args.chars or len(rows[row["source"]]) >= args.per_source:
            continue
        cut = text.find("\n", args.chars)
        rows[row["source"]].append({"source": row["source"], "prompt": text[: cut if cut > 0 else args.chars]})
    out = REPO / "benchmarks" / "data" / "demo_heldout.jsonl"
    with open(out, "w") as fh:
        for i in range(args.per_source):  # sources interleaved: a group of requests mixes them
            for name in SOURCES:
                if i < len(rows[name]):
                    fh.write(json.dumps(rows[name][i]) + "\n")
    print(f"wrote {out}: {', '.join(f'{n} {len(r)}' for n, r in rows.items())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    sub = p.add_subparsers(required=True)
    t = sub.add_parser("train")
    t.set_defaults(func=train)
    t.add_argument("--steps", type=int, default=260)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--depth", type=int, default=3, help="chained drafting steps trained per position")
    t.add_argument("--queries", type=int, default=128, help="query positions trained per window")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--intermediate", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--chat-share", type=float, default=0.25)
    t.add_argument("--greedy", type=int, default=0, help="train on this many of the demo's greedy continuations")
    t.add_argument("--init", type=Path, default=None, help="start from this drafter checkpoint")
    t.add_argument("--log-every", type=int, default=10)
    sub.add_parser("export").set_defaults(func=export)
    e = sub.add_parser("eval")
    e.set_defaults(func=evaluate)
    e.add_argument("--folder", type=Path, default=DEST)
    e.add_argument("--depth", type=int, default=4)
    q = sub.add_parser("prompts")
    q.set_defaults(func=prompts)
    q.add_argument("--per-source", type=int, default=8)
    q.add_argument("--chars", type=int, default=400)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
