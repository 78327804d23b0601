"""Budgeted expert residency: decode tokens/s, hit rate and bytes fetched per token against the budget.

    python benchmarks/moe.py [--layers 4] [--steps 64] [--warm 16] [--budgets 0.1,0.25,0.5,1.0] [--threads 1]

Models:
(a) the trained demo MoE model (Gemma 4 MoE, 8 experts, top-2, 6 layers): real routing, on a few prompts;
(b) random layers with Gemma 4 26B-A4B's expert shapes (128 experts of 704, top-8, hidden 2816; bf16; the
    attention is shrunk, the dense MLP kept), written once into --cache. Its random router routes almost
    uniformly, which no trained router does, so (b) also runs with a SYNTHETIC SKEWED ROUTER (labeled
    "zipf"): each layer draws its top-8 from a fixed Zipf(1.0) popularity over its 128 experts, seeded by the
    router's input. The share of routed tokens that the hottest quarter of experts takes is printed for every
    routing, the demo's real one included, so the skew can be judged.

Variants, each decoding the same tokens at batch 1 (greedy on the demo; a seeded random token stream on (b))
after a prefill and `--warm` steps (counters cover the timed steps only; the pool persists across prompts, as
in a server): full residency (experts copied into memory); mmap (experts referenced straight from the mapped
file, no policy: the OS pages them); then, at each budget, the pool with plain LRU ("lru": every miss takes a
slot), with our policy ("ours": next-use eviction, and a miss not worth a slot runs straight from the mapped
file), with our policy and a fetch thread that reads a step's misses from its router's output on, while the
layer computes its dense MLP and earlier experts ("ours+thread"), and with prefetch on that thread too
("ours+prefetch": the next layer's router on this layer's input); full residency again last ("vs full" is
against the mean of its two runs). The policy learns online: 64 timed steps per prompt, because over 32 its
learning is much of the run (at --steps 32 the demo's 25% is a tie with LRU).

The page cache holds the whole checkpoint here, so a fetch is a copy from memory: bytes fetched per token is
the figure that carries over (prefetches included; 'demand' are the misses', 'wasted' the prefetches that
their layer did not use). Then the milliseconds a token would wait on an NVMe drive (3 GB/s) or a PCIe 4 x16
link (25 GB/s) for those bytes, and the process's memory after the run: anonymous (slots and copies: what the
budget bounds) and the file pages it has mapped (the page cache's, reclaimed by the OS when memory is short;
a miss without a slot leaves its pages mapped). A last table times one 26B-A4B expert's miss paths (a slot, a pread
into a slot, the mapped file). Writes tables, a JSON file and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hearthlm import LLM
from hearthlm.engine.kv_cache import ContiguousKVCache
from hearthlm.engine.runner import forward_tokens
from hearthlm.layers.linear import linear
from hearthlm.layers.moe import Experts
from hearthlm.moe import ahead
from hearthlm.moe.policy import LRU

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time a little fox lived at the edge of a forest.",
    "The ship sailed north for many days until the sailors saw ice.",
    "My grandmother kept a garden full of roses and tomatoes.",
]
NVME, PCIE = 3e9, 25e9
COUNTERS = ("hits", "misses", "transient", "bytes_fetched", "fetch_seconds", "prefetches", "prefetch_used")


# -- the 26B-A4B-shaped checkpoint -----------------------------------------------------------------


def a4b_config(layers: int) -> dict:
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    demo = json.loads((ROOT / "src/hearthlm/demo/hearth-demo-moe/config.json").read_text())
    return demo | {
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "moe_intermediate_size": 704,
        "num_experts": 128,
        "top_k_experts": 8,
        "num_hidden_layers": layers,
        "layer_types": types,
        "per_layer_config": {str(layers - 1): {"head_dim": 128}},
        "num_attention_heads": 4,
        "head_dim": 64,
        "num_key_value_heads": 1,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
    }


def write_a4b(folder: Path, layers: int, progress: Progress) -> Path:
    """Random bf16 weights under Gemma 4's names, streamed to model.safetensors one expert at a time."""
    if (folder / "done").exists():
        return folder
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    cfg = a4b_config(layers)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    config = tf.Gemma4TextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in tf.Gemma4ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    g = torch.Generator().manual_seed(0)
    task = progress.add_task(f"writing a {layers}-layer 26B-A4B-shaped checkpoint", total=offset)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for shape in shapes.values():
            for block in _random_blocks(shape, g):
                f.write(block.view(torch.int16).numpy().tobytes())
                progress.advance(task, block.numel() * 2)
    (folder / "done").write_text("")
    return folder


def _random_blocks(shape: tuple[int, ...], g: torch.Generator):
    """Matrices ~ N(0, 1/fan_in), vectors ~ 1 +- 0.3, in bf16; a stacked [E, out, in] tensor one expert at a time."""
    if len(shape) == 1:
        yield (1 + 0.3 * (2 * torch.rand(shape, generator=g) - 1)).bfloat16()
        return
    for _ in range(shape[0] if len(shape) == 3 else 1):
        inner = shape[1:] if len(shape) == 3 else shape
        yield (torch.randn(inner, generator=g) * inner[-1] ** -0.5).bfloat16()


# -- routing -----------------------------------------------------------------------------------------


class ZipfRouter(torch.nn.Module):
    """SYNTHETIC: top-k drawn from a fixed Zipf popularity over the experts (a permutation per layer), seeded by
    the input's bytes: a function of its input like a real router (a prefetcher's extra calls change nothing)."""

    def __init__(self, layer: int, num_experts: int, top_k: int, s: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        self.popularity = (1.0 / torch.arange(1, num_experts + 1).float() ** s)[
            torch.randperm(num_experts, generator=g)
        ]
        self.top_k, self.seed = top_k, seed * 1000 + layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(x.float().numpy().tobytes(), self.seed))
        index = torch.multinomial(self.popularity.expand(x.shape[0], -1), self.top_k, generator=g)
        return index, torch.full(index.shape, 1.0 / self.top_k)


def use_zipf(llm: LLM, s: float = 1.0, seed: int = 0) -> None:
    cfg = llm.config
    for i, layer in enumerate(llm.model.layers):
        if hasattr(layer, "router"):
            layer.router = ZipfRouter(i, cfg.num_experts, cfg.experts_per_token, s, seed)


def top_quarter_share(counts: dict[int, torch.Tensor]) -> float:
    """Share of routed tokens taken by each layer's hottest 25% of experts (mean over layers)."""
    shares = []
    for c in counts.values():
        c = c.float().sort(descending=True).values
        shares.append((c[: max(1, len(c) // 4)].sum() / c.sum()).item())
    return sum(shares) / len(shares)


# -- one variant -------------------------------------------------------------------------------------


def make_resident(llm: LLM) -> None:
    """Copy every expert stack into anonymous memory (a bf16 file on a bf16 load is otherwise a mmap view)."""
    for m in llm.model.modules():
        if isinstance(m, Experts):
            m.gate_up = torch.nn.Parameter(m.gate_up.detach().clone(), requires_grad=False)
            m.down = torch.nn.Parameter(m.down.detach().clone(), requires_grad=False)


@torch.inference_mode()
def decode(
    llm: LLM, prompts: list[list[int]], warm: int, steps: int, counts: dict | None = None, forced: bool = False
) -> dict:
    """Per prompt: prefill, `warm` greedy steps, then `steps` timed ones; the pool persists across prompts
    (as in a server) and its counters are summed over the timed steps only. `forced`: feed seeded random
    tokens instead of the greedy ones (a random model's greedy text repeats one token, which would make its
    routing repeat too)."""
    g = torch.Generator().manual_seed(1)
    from hearthlm.moe.profile import Recorder

    model = llm.model
    pool = getattr(model, "expert_pool", None)
    recorder = Recorder(model) if counts is not None else None
    seconds, tokens = 0.0, 0
    fetched = dict.fromkeys(COUNTERS, 0)
    for ids in prompts:
        cache = ContiguousKVCache(llm.config.layers, 1, len(ids) + warm + steps + 1, llm.dtype, llm.device)
        h = forward_tokens(model, cache, torch.tensor([ids]), torch.zeros(1, dtype=torch.long))
        pos, tok = len(ids), int(model.logits(h[:, -1]).argmax())
        for i in range(warm + steps):
            if i == warm:
                before = pool.snapshot() if pool is not None else None
                start = time.perf_counter()
            h = forward_tokens(model, cache, torch.tensor([[tok]]), torch.tensor([pos]))
            tok, pos = int(model.logits(h[:, -1]).argmax()), pos + 1
            if forced:
                tok = int(torch.randint(3, llm.config.vocab_size, (1,), generator=g))
        seconds += time.perf_counter() - start
        tokens += steps
        if pool is not None:
            after = pool.snapshot()
            for k in fetched:
                fetched[k] += getattr(after, k) - getattr(before, k)
    if recorder is not None:
        counts.update(recorder.counts)
        recorder.close()
    out = {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens} | memory()
    if pool is not None:
        f, mb = fetched, pool.expert_bytes / tokens / 1e6
        uses = f["hits"] + f["misses"]
        out |= {
            "hit_rate": f["hits"] / uses if uses else 0.0,
            "mb_per_token": f["bytes_fetched"] / tokens / 1e6,
            "demand_mb_per_token": f["misses"] * mb,
            "prefetch_mb_per_token": f["prefetches"] * mb,
            "wasted_prefetch_mb_per_token": (f["prefetches"] - f["prefetch_used"]) * mb,
            "prefetch_accuracy": f["prefetch_used"] / f["prefetches"] if f["prefetches"] else None,
            "transient_share": f["transient"] / f["misses"] if f["misses"] else 0.0,
            "fetch_share": f["fetch_seconds"] / seconds,
            "slots": pool.stats.slots,
        }
    return out


def memory() -> dict[str, float]:
    """The process's memory now, in GB: anonymous (its own: slots, copies) and file pages mapped (the page
    cache's: the OS reclaims them under pressure, so they bound nothing)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(status.get(key, "0 kB").split()[0])  # noqa: E731
    return {"anon_gb": kb("RssAnon") / 1e6 * 1.024, "file_gb": kb("RssFile") / 1e6 * 1.024}


def variants(budgets: list[float]) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [("full", None), ("mmap", None)]
    for b in budgets:
        out += [("lru", b), ("ours", b), ("ours+thread", b), ("ours+prefetch", b)]
    return out + [("full (again)", None)]  # the reference is their mean: other processes' load drifts


def run_model(label, folder, prompts, budgets, warm, steps, zipf, progress, forced=False) -> list[dict]:
    rows = []
    todo = variants(budgets)
    task = progress.add_task(f"{label}", total=len(todo))
    counts: dict = {}
    for name, budget in todo:
        llm = LLM(folder, expert_budget=budget) if budget is not None else LLM(folder)
        if zipf:
            use_zipf(llm)
        if name.startswith("full"):
            make_resident(llm)
        pool = getattr(llm.model, "expert_pool", None)
        if name == "lru":
            pool.set_policy(LRU())
        fetching = ahead.enable(llm.model, prefetch=name == "ours+prefetch") if "+" in name else None
        result = decode(llm, prompts, warm, steps, counts if name == "full" else None, forced=forced)
        if fetching is not None:
            fetching.close()
        rows.append({"model": label, "variant": name, "budget": budget} | result)
        progress.advance(task)
        progress.console.print(
            f"{label} {name} {budget}: {result['tok_s']:.1f} tok/s, {result.get('mb_per_token', 0):.1f} MB/tok"
        )
        del llm, pool
    share = top_quarter_share(counts)
    for r in rows:
        r["top_quarter_share"] = share
    full = sum(r["tok_s"] for r in rows if r["variant"].startswith("full")) / 2
    for r in rows:
        r["vs_full"] = r["tok_s"] / full
    return rows


def miss_paths(folder: Path, repeat: int = 24) -> dict[str, float]:
    """Milliseconds to run one 26B-A4B expert at batch 1 by each path a miss or a hit can take."""
    llm = LLM(folder, expert_budget=0.25)
    pool = llm.model.expert_pool
    tier, slot = pool.tiers[min(pool.tiers)], pool.slots[0]
    x = torch.randn(1, llm.config.hidden_size)

    def run(w) -> None:
        gate, up = linear(x, w[0]).chunk(2, dim=-1)
        linear(torch.nn.functional.gelu(gate) * up, w[1])

    def mapped_then_dropped(e: int) -> None:  # what a miss without a slot did before its pages stayed mapped
        w = tier.read(e)
        run(w)
        for t in w:
            tier.ckpt.release_view(t)

    paths = {
        "compute from a slot (a hit)": lambda e: run(slot),
        "pread into a slot": lambda e: tier.load(e, slot),
        "pread into a slot + compute": lambda e: (tier.load(e, slot), run(slot)),
        "compute from the mapped file (a miss without a slot)": lambda e: run(tier.read(e)),
        "compute from the mapped file, then unmap its pages": mapped_then_dropped,
    }
    out = {}
    for name, fn in paths.items():
        for i in range(repeat):  # the steady state: each expert once before (a mapped miss maps its pages once)
            fn(2 + i % (pool.num_experts - 2))
        start = time.perf_counter()
        for i in range(repeat):
            fn(2 + i % (pool.num_experts - 2))
        out[name] = (time.perf_counter() - start) / repeat * 1e3
    return out


# -- report ------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> Table:
    t = Table(box=None, header_style="bold")
    cols = ["model", "variant", "budget", "tok/s", "vs full", "hit rate", "MB/token", "demand", "prefetch",
            "wasted", "prefetch hit", "no slot", "fetch share", "ms/tok NVMe", "ms/tok PCIe", "anon GB",
            "mapped GB"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "variant") else "right")
    for r in rows:
        mb = r.get("mb_per_token")
        pool = [
            f"{r['hit_rate']:.1%}", f"{mb:.2f}", f"{r['demand_mb_per_token']:.2f}",
            f"{r['prefetch_mb_per_token']:.2f}", f"{r['wasted_prefetch_mb_per_token']:.2f}",
            f"{r['prefetch_accuracy']:.0%}" if r["prefetch_accuracy"] is not None else "-",
            f"{r['transient_share']:.0%}", f"{r['fetch_share']:.0%}",
            f"{mb * 1e6 / NVME * 1e3:.1f}", f"{mb * 1e6 / PCIE * 1e3:.2f}",
        ] if mb is not None else ["-"] * 10  # fmt: skip
        budget = f"{r['budget']:.0%}" if r["budget"] is not None else "-"
        memory = [f"{r['anon_gb']:.2f}", f"{r['file_gb']:.2f}"]
        t.add_row(r["model"], r["variant"], budget, f"{r['tok_s']:.1f}", f"{r['vs_full']:.0%}", *pool, *memory)
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for j, m in enumerate(models):
        mine = [r for r in rows if r["model"] == m]
        for name, style in (("ours", "o-"), ("lru", "s--"), ("ours+thread", "d-."), ("ours+prefetch", "^:")):
            pts = [r for r in mine if r["variant"] == name]
            xs = [r["budget"] * 100 for r in pts]
            axes[0][j].plot(xs, [r["tok_s"] for r in pts], style, label=name)
            axes[1][j].plot(xs, [r["mb_per_token"] for r in pts], style, label=name)
        full = mine[0]["tok_s"] / mine[0]["vs_full"]
        mmap = next(r for r in mine if r["variant"] == "mmap")["tok_s"]
        for value, color, label in ((full, "k", "full residency (mean of 2)"), (mmap, "gray", "mmap (OS paging)")):
            axes[0][j].axhline(value, color=color, linestyle="-.", label=label)
        share = mine[0]["top_quarter_share"]
        axes[0][j].set_title(f"{m}\n(hottest 25% of experts take {share:.0%} of tokens)", fontsize=9)
        axes[0][j].set_ylabel("decode tokens/s")
        axes[1][j].set_ylabel("MB fetched per token")
        axes[1][j].set_xlabel("expert budget (% of expert bytes)")
        axes[0][j].legend(fontsize=7)
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="layers of the 26B-A4B-shaped model (1.5 GB of experts each)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per prompt")
    p.add_argument("--warm", type=int, default=16, help="untimed decode steps per prompt before them")
    p.add_argument("--budgets", default="0.1,0.25,0.5,1.0")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "hearthlm" / "bench-moe")
    p.add_argument("--skip-a4b", action="store_true", help="only the demo model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 resists other processes' load best)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    console = Console(width=200)
    rows = []
    with Progress(console=Console(stderr=True)) as progress:
        demo = LLM("hearth-demo-moe")
        prompts = [demo.tokenizer.encode(t) for t in PROMPTS]
        rows += run_model(
            "demo MoE (real routing)", demo.path, prompts, budgets, args.warm, args.steps, False, progress
        )
        if not args.skip_a4b:
            folder = write_a4b(args.cache / f"a4b-{args.layers}L", args.layers, progress)
            ids = [[(7 * i + 3) % 4000 + 3 for i in range(16)]]
            for label, zipf in (
                ("26B-A4B shapes, random router", False),
                ("26B-A4B shapes, SYNTHETIC zipf router", True),
            ):
                rows += run_model(label, folder, ids, budgets, args.warm, args.steps, zipf, progress, forced=True)
    console.print(table(rows))
    paths = miss_paths(folder) if not args.skip_a4b else {}
    for name, ms in paths.items():
        console.print(f"one 26B-A4B expert (11.9 MB bf16): {name}: {ms:.2f} ms")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
        "miss_paths_ms": paths,
    }
    (out / f"moe-{stamp}.json").write_text(json.dumps(meta, indent=1))
    plot(rows, out / f"moe-{stamp}.png")
    console.print(f"wrote {out / f'moe-{stamp}.json'} and {out / f'moe-{stamp}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
