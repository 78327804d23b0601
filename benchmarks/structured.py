"""Constrained decoding cost: what a JSON schema (or regex, choice list, grammar) costs hearthlm per decoded token
and per new grammar, with llguidance (what engine/guided.py runs) and, when it is importable, xgrammar on the same
tokenizers for comparison.

    python benchmarks/structured.py [--models demo,qwen2.5-0.5b] [--vocabs demo,qwen2,gemma4] [--rounds 5]
                                    [--new-tokens 128] [--compile-repeats 3] [--quiet-wait 20] [--cache-dir DIR]
                                    [--no-xgrammar]

1. decode: batch 1, greedy, bfloat16 on the CPU, the same prompt with and without a JSON schema that forces a long
   reply (an array of at least 16 objects with bounded strings), --new-tokens generated either way (ignore_eos
   when unconstrained; the schema cannot be complete before then). tok/s is the time between the first and the
   last generated token, so prefill and the grammar's compile are not in it. The two modes alternate within each
   round; figures are medians over the rounds. A further run times every Guide.restrict (the allowed-token
   bitmask from llguidance, unpacked into a -inf mask over the logits) and Guide.accept (the matcher advanced
   past the sampled token) inside the engine.
   Models: the built-in demo (Gemma 4 architecture, 4096-token vocabulary) and a random-weight checkpoint with
   Qwen2.5-0.5B's shapes (benchmarks/decode.py's recipe) that ships the real 151k-token Qwen2 tokenizer
   (llama.cpp's ggml-vocab-qwen2.gguf, from tests/data/llama_cpp).
2. tokenizer build: the one-time table a grammar engine builds per vocabulary (llguidance.LLTokenizer, as
   hearthlm's Guides does on a model's first constrained request; xgrammar.TokenizerInfo).
3. compile: a new grammar, cold (hearthlm's grammar cache emptied; xgrammar's compiler cache off), until its
   first mask: llguidance as hearthlm calls it (Guides.guide), xgrammar's GrammarCompiler + GrammarMatcher.
   Median over --compile-repeats, on the demo vocabulary, Qwen2's 151,936 ids and Gemma 4's 262,144 ids.
4. per-token mask: the long schema's reply (a fixed valid document, tokenized by each vocabulary) replayed
   through each engine's matcher: fill (the allowed-token bitmask), accept (advance past the token) and apply
   (the bitmask onto float32 logits: hearthlm's unpack + masked_fill, xgrammar's apply_token_bitmask_inplace).

Nothing is asserted: the figures are printed, and docs/structured-outputs.md discusses them.
"""

from __future__ import annotations

import argparse
import gc
import json
import lzma
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hearthlm import LLM, SamplingParams, load_tokenizer
from hearthlm.engine import guided
from hearthlm.engine.guided import Guides

try:
    from decode import DONE, ensure_checkpoint, foreign_load, wait_for_quiet
except ImportError:  # run as `python -m benchmarks.structured`
    from benchmarks.decode import DONE, ensure_checkpoint, foreign_load, wait_for_quiet

try:
    import xgrammar
except ImportError:
    xgrammar = None

ROOT = Path(__file__).resolve().parent.parent
VOCAB_FILES = {"qwen2": "ggml-vocab-qwen2.gguf.xz", "gemma4": "ggml-vocab-gemma-4.gguf.xz"}
VOCAB_SIZES = {"qwen2": 151_936, "gemma4": 262_144}  # the models' embedding rows (Qwen2.5 pads its 151,665 ids)
PROMPT = "Return the list of users as JSON:"

# -- what is measured ---------------------------------------------------------------------------------------------

_STR = {"type": "string", "minLength": 1}
LONG = {  # the decode schema: the reply cannot be complete in fewer than a few hundred tokens
    "type": "array",
    "minItems": 16,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "email": {"type": "string", "minLength": 3, "maxLength": 32},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "active": {"type": "boolean"},
        },
        "required": ["name", "email", "age", "role", "active"],
        "additionalProperties": False,
    },
}
FLAT = {
    "type": "object",
    "properties": {
        "name": _STR,
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "active", "score"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": _STR,
                "address": {
                    "type": "object",
                    "properties": {"street": _STR, "city": _STR, "zip": {"type": "string", "maxLength": 10}},
                    "required": ["street", "city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": _STR,
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "status", "customer", "items"],
    "additionalProperties": False,
}
ANYOF = {
    "type": "object",
    "properties": {
        "shape": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "radius": {"type": "number"}},
                    "required": ["kind", "radius"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "rect"},
                        "width": {"type": "number"},
                        "height": {"type": "number"},
                    },
                    "required": ["kind", "width", "height"],
                    "additionalProperties": False,
                },
                {"type": "string"},
                {"type": "null"},
            ]
        }
    },
    "required": ["shape"],
    "additionalProperties": False,
}
REGEX = r"[a-z0-9._%+-]{1,32}@[a-z0-9-]{1,32}(\.[a-z0-9-]{1,32}){0,3}\.[a-z]{2,6}"
CHOICE = ["positive", "negative", "neutral", "mixed", "not applicable"]
GBNF = r"""root   ::= expr
expr   ::= term (ws ("+" | "-") ws term)*
term   ::= factor (ws ("*" | "/") ws factor)*
factor ::= number | "(" ws expr ws ")"
number ::= "-"? [0-9]+ ("." [0-9]+)?
ws     ::= [ \t]*
"""

# name -> (SamplingParams field, value)
GRAMMARS: dict[str, tuple[str, Any]] = {
    "flat object, 5 fields": ("json_schema", FLAT),
    "nested + arrays + enums": ("json_schema", NESTED),
    "anyOf": ("json_schema", ANYOF),
    "long array (decode)": ("json_schema", LONG),
    "regex (e-mail)": ("regex", REGEX),
    "choice (5)": ("choice", CHOICE),
    "GBNF (arithmetic)": ("grammar", GBNF),
}


def long_document() -> str:
    """A valid reply to LONG, compact as hearthlm constrains JSON (no whitespace, properties in schema order)."""
    roles = ("admin", "editor", "viewer")
    names = ("Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth")
    users = [
        {
            "name": names[i % len(names)],
            "email": f"{names[i % len(names)].split()[0].lower()}{i}@example.org",
            "age": 20 + 3 * i,
            "role": roles[i % 3],
            "active": i % 2 == 0,
        }
        for i in range(16)
    ]
    return json.dumps(users, separators=(",", ":"))


# -- helpers ------------------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def params_for(kind: str, value: Any, n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **{kind: value})


def xgr_compile(compiler: Any, kind: str, value: Any) -> Any:
    if kind == "json_schema":
        return compiler.compile_json_schema(json.dumps(value), any_whitespace=False, separators=(",", ":"))
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "choice":
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
    return compiler.compile_grammar(value)


# -- vocabularies -------------------------------------------------------------------------------------------------


class Vocab:
    """One tokenizer with its vocabulary size (the model's logit rows) and end-of-sequence ids."""

    def __init__(self, name: str, tokenizer: Any, size: int, end_ids: set[int]):
        self.name, self.tokenizer, self.size, self.end_ids = name, tokenizer, size, end_ids


def load_vocab(name: str, tmp: Path, demo: LLM | None) -> Vocab:
    if name == "demo":
        llm = demo or LLM()
        return Vocab("demo (4,096)", llm.tokenizer, llm.config.vocab_size, set(llm.stop_token_ids))
    path = tmp / VOCAB_FILES[name].removesuffix(".xz")
    if not path.exists():
        path.write_bytes(lzma.decompress((ROOT / "tests/data/llama_cpp" / VOCAB_FILES[name]).read_bytes()))
    tok = load_tokenizer(path)
    size = VOCAB_SIZES[name]
    return Vocab(f"{name} ({size:,})", tok, size, tok.stop_token_ids())


def qwen_checkpoint(cache: Path, tmp: Path) -> Path:
    """benchmarks/decode.py's Qwen2.5-0.5B-shaped random checkpoint (built once, shared with that benchmark),
    linked into a folder of its own that also holds the real Qwen2 tokenizer (tokenizer.json from the GGUF)."""
    weights, _ = ensure_checkpoint("qwen2.5-0.5b", None, cache)
    folder = cache / (weights.name + "-qwen2-tokenizer")
    if not (folder / DONE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            if f.name != DONE and not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
        tok = load_vocab("qwen2", tmp, None).tokenizer
        (folder / "tokenizer.json").write_text(tok.backend_json())
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        (folder / DONE).write_text("")
    return folder


# -- 1. decode ----------------------------------------------------------------------------------------------------


@contextmanager
def step_timers() -> Any:
    """Time every Guide.restrict and Guide.accept the engine calls (class attributes patched, then restored)."""
    times: dict[str, list[float]] = {"restrict": [], "accept": []}
    originals = {name: getattr(guided.Guide, name) for name in times}

    def wrap(name: str) -> Callable:
        fn = originals[name]

        def timed_call(self: Any, arg: Any) -> Any:
            start = time.perf_counter()
            out = fn(self, arg)
            times[name].append(time.perf_counter() - start)
            return out

        return timed_call

    for name in times:
        setattr(guided.Guide, name, wrap(name))
    try:
        yield times
    finally:
        for name, fn in originals.items():
            setattr(guided.Guide, name, fn)


def decode_run(llm: LLM, params: SamplingParams) -> tuple[float, int, list[int]]:
    stamps: list[float] = []
    out = llm.generate([PROMPT], params, on_token=lambda i, t: stamps.append(time.perf_counter()))
    n = len(stamps) - 1
    return n / (stamps[-1] - stamps[0]), len(stamps), out[0].token_ids


def bench_decode(label: str, llm: LLM, args: argparse.Namespace, progress: Progress, task: Any) -> dict:
    llm.engine(prefix_caching=False)
    free = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    schema = params_for("json_schema", LONG, args.new_tokens)
    decode_run(llm, free)  # warm-up: kernels, and the schema's compile (cached by text from here on)
    decode_run(llm, schema)
    rates: dict[str, list[float]] = {"free": [], "schema": []}
    counts: dict[str, int] = {}
    load: list[float] = []
    for r in range(args.rounds):
        wait_for_quiet(args.quiet_wait)
        for mode in ("free", "schema") if r % 2 == 0 else ("schema", "free"):
            with foreign_load(load):
                rate, count, _ = decode_run(llm, free if mode == "free" else schema)
            rates[mode].append(rate)
            counts[mode] = count
            progress.advance(task)
    with step_timers() as times:
        _, _, ids = decode_run(llm, schema)
    progress.advance(task)
    free_tps, schema_tps = median(rates["free"]), median(rates["schema"])
    restrict, accept = median(times["restrict"]), median(times["accept"])
    return {
        "model": label,
        "vocab": llm.config.vocab_size,
        "free": free_tps,
        "schema": schema_tps,
        "free_all": rates["free"],
        "schema_all": rates["schema"],
        "counts": counts,
        "slowdown": 100 * (1 - schema_tps / free_tps),
        "slowdown_rounds": 100 * (1 - median([s / f for s, f in zip(rates["schema"], rates["free"])])),
        "others_cpu": 100 * median(load),
        "restrict_us": 1e6 * restrict,
        "accept_us": 1e6 * accept,
        "step_ms": 1e3 / free_tps,
        "mask_share": 100 * (restrict + accept) * free_tps,
        "sample": llm.tokenizer.decode(ids)[:120],
    }


# -- 2-4. tokenizer build, compile, per-token mask ----------------------------------------------------------------


class LLGuidanceSide:
    name = "llguidance"

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.guides, self.build_s = timed(lambda: Guides(vocab.tokenizer, vocab.size, vocab.end_ids))

    def compile(self, kind: str, value: Any) -> tuple[float, float]:
        """Cold compile (hearthlm's cache emptied) to a fresh Guide, and its first mask, in seconds."""
        self.guides._compiled.clear()
        guide, compile_s = timed(lambda: self.guides.guide(params_for(kind, value, 1)))
        logits = torch.zeros(self.vocab.size)
        _, first_s = timed(lambda: guide.restrict(logits))
        return compile_s, first_s

    def replay(self, ids: list[int]) -> dict[str, float]:
        """Per token: llguidance's fill and consume alone, then the whole of hearthlm's restrict (fill + unpack +
        masked_fill); apply = restrict - fill."""
        from llguidance.torch import fill_next_token_bitmask

        params = params_for("json_schema", LONG, 1)
        guide = self.guides.guide(params)
        fill, accept = [], []
        for t in ids:
            _, s = timed(lambda: fill_next_token_bitmask(guide.matcher, guide.mask, 0))
            fill.append(s)
            _, s = timed(lambda t=t: guide.accept(t))
            accept.append(s)
        guide = self.guides.guide(params)
        logits = torch.zeros(self.vocab.size)
        restrict = []
        for t in ids:
            out, s = timed(lambda: guide.restrict(logits))
            restrict.append(s)
            assert out is not None and out[t] == 0, "the replayed document left the grammar"
            guide.accept(t)
        return {
            "fill": median(fill),
            "accept": median(accept),
            "apply": median(restrict) - median(fill),
            "total": median(restrict) + median(accept),
        }


class XGrammarSide:
    name = "xgrammar"

    def __init__(self, vocab: Vocab):
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        self.vocab = vocab
        hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(vocab.tokenizer.backend_json()))
        stops = sorted(vocab.end_ids)
        self.info, self.build_s = timed(
            lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab.size, stop_token_ids=stops)
        )

    def _compiler(self) -> Any:
        return xgrammar.GrammarCompiler(self.info, max_threads=os.cpu_count() or 1, cache_enabled=False)

    def compile(self, kind: str, value: Any) -> tuple[float, float]:
        compiler = self._compiler()
        matcher, compile_s = timed(lambda: xgrammar.GrammarMatcher(xgr_compile(compiler, kind, value)))
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab.size)
        _, first_s = timed(lambda: matcher.fill_next_token_bitmask(bitmask))
        return compile_s, first_s

    def replay(self, ids: list[int]) -> dict[str, float]:
        matcher = xgrammar.GrammarMatcher(xgr_compile(self._compiler(), "json_schema", LONG))
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab.size)
        logits = torch.zeros(1, self.vocab.size)
        fill, accept, apply = [], [], []
        for t in ids:
            _, s = timed(lambda: matcher.fill_next_token_bitmask(bitmask))
            fill.append(s)
            _, s = timed(lambda: xgrammar.apply_token_bitmask_inplace(logits, bitmask))
            apply.append(s)
            ok, s = timed(lambda t=t: matcher.accept_token(t))
            accept.append(s)
            assert ok, "the replayed document left the grammar"
        return {
            "fill": median(fill),
            "accept": median(accept),
            "apply": median(apply),
            "total": median(fill) + median(apply) + median(accept),
        }


def bench_grammar_engines(vocabs: list[Vocab], args: argparse.Namespace, progress: Progress) -> list[dict]:
    sides: list[type] = [LLGuidanceSide] + ([XGrammarSide] if args.xgrammar else [])
    document = long_document()
    rows = []
    task = progress.add_task("tokenizers, compiles, masks", total=len(vocabs) * len(sides) * (len(GRAMMARS) + 2))
    for vocab in vocabs:
        ids = vocab.tokenizer.encode(document, add_special_tokens=False)
        for side_cls in sides:
            progress.update(task, description=f"{side_cls.name} on {vocab.name}")
            side = side_cls(vocab)
            progress.advance(task)
            compiles = {}
            for gname, (kind, value) in GRAMMARS.items():
                runs = [side.compile(kind, value) for _ in range(args.compile_repeats)]
                compiles[gname] = (median([c for c, _ in runs]), median([f for _, f in runs]))
                progress.advance(task)
            replay = side.replay(ids)
            progress.advance(task)
            rows.append(
                {
                    "engine": side.name,
                    "vocab": vocab.name,
                    "build_s": side.build_s,
                    "compiles": compiles,
                    "replay": replay,
                    "replay_tokens": len(ids),
                }
            )
            del side
            gc.collect()
    return rows


# -- output -------------------------------------------------------------------------------------------------------


def print_decode(console: Console, rows: list[dict], args: argparse.Namespace) -> None:
    t = Table(
        title=f"1. Decode at batch 1, greedy, bfloat16, {args.new_tokens} new tokens: without / with the long JSON "
        f"schema (median of {args.rounds} alternating rounds)",
        box=box.SIMPLE_HEAD,
    )
    for col in (
        "model",
        "vocab",
        "free tok/s",
        "schema tok/s",
        "slowdown",
        "per round",
        "others' CPU",
        "step ms",
        "restrict µs",
        "accept µs",
        "mask / step",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(
            r["model"],
            f"{r['vocab']:,}",
            fmt(r["free"]),
            fmt(r["schema"]),
            f"{r['slowdown']:.1f}%",
            f"{r['slowdown_rounds']:.1f}%",
            f"{r['others_cpu']:.0f}%",
            fmt(r["step_ms"], 2),
            fmt(r["restrict_us"], 0),
            fmt(r["accept_us"], 0),
            f"{r['mask_share']:.1f}%",
        )
    console.print(t)
    for r in rows:
        console.print(
            f"  {r['model']}: tokens timed free {r['counts']['free']} / schema {r['counts']['schema']}; "
            f"free tok/s per round {[round(x, 1) for x in r['free_all']]}, "
            f"schema {[round(x, 1) for x in r['schema_all']]}"
        )
        console.print(f"  {r['model']} constrained reply starts: {r['sample']!r}", markup=False)
    console.print(
        "  slowdown: 1 - median schema / median free; per round: 1 - the median of the per-round ratios (both modes "
        "run seconds apart, so drift cancels). others' CPU: other processes' median share of the machine during the "
        "timed runs. restrict / accept: medians over the instrumented run's steps; mask / step = (restrict + accept) "
        "x free tok/s.\n"
    )


def print_engines(console: Console, rows: list[dict], args: argparse.Namespace) -> None:
    t = Table(title="2. Tokenizer tables, built once per vocabulary (ms)", box=box.SIMPLE_HEAD)
    t.add_column("engine")
    for vocab in dict.fromkeys(r["vocab"] for r in rows):
        t.add_column(vocab, justify="right")
    for engine in dict.fromkeys(r["engine"] for r in rows):
        t.add_row(engine, *[fmt(1e3 * r["build_s"]) for r in rows if r["engine"] == engine])
    console.print(t)

    t = Table(
        title=f"3. Grammar compile, cold, to a matcher + its first mask (ms, median of {args.compile_repeats})",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("grammar")
    for r in rows:
        t.add_column(f"{r['engine']}\n{r['vocab']}\ncompile + 1st mask", justify="right")
    for g in GRAMMARS:
        cells = []
        for r in rows:
            c, f = r["compiles"][g]
            cells.append(f"{fmt(1e3 * c, 2)} + {fmt(1e3 * f, 2)}")
        t.add_row(g, *cells)
    console.print(t)

    t = Table(
        title="4. Per-token mask on the long schema's reply, replayed (µs per token, medians)", box=box.SIMPLE_HEAD
    )
    for col in ("engine", "vocab", "tokens", "fill", "accept", "apply", "total"):
        t.add_column(col, justify="left" if col in ("engine", "vocab") else "right")
    for r in rows:
        rp = r["replay"]
        t.add_row(
            r["engine"],
            r["vocab"],
            str(r["replay_tokens"]),
            *[fmt(1e6 * rp[k], 1) for k in ("fill", "accept", "apply", "total")],
        )
    console.print(t)
    console.print(
        "  fill: the allowed-token bitmask; accept: advance past the token; apply: the bitmask onto float32 logits "
        "(llguidance row: hearthlm's Guide.restrict minus fill = unpack to bool + masked_fill; xgrammar row: "
        "xgrammar.apply_token_bitmask_inplace).\n"
    )


def machine() -> str:
    cpu = platform.processor() or "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import llguidance

    versions = f"torch {torch.__version__}, llguidance {getattr(llguidance, '__version__', '?')}"
    if xgrammar is not None:
        from importlib.metadata import version

        versions += f", xgrammar {version('xgrammar')}"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; Python {platform.python_version()}, {versions}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="demo,qwen2.5-0.5b", help="decode section: demo, qwen2.5-0.5b (or none)")
    ap.add_argument("--vocabs", default="demo,qwen2,gemma4", help="compile / mask sections: demo, qwen2, gemma4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=20.0, help="max seconds to wait for an idle CPU per round")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/hearthlm-bench-checkpoints"))
    ap.add_argument("--no-xgrammar", dest="xgrammar", action="store_false", help="skip xgrammar even if importable")
    args = ap.parse_args()
    args.xgrammar = args.xgrammar and xgrammar is not None
    models = [m for m in args.models.split(",") if m and m != "none"]
    vocab_names = [v for v in args.vocabs.split(",") if v and v != "none"]

    stdout = Console(width=None if sys.stdout.isatty() else 200)
    stderr = Console(stderr=True)
    stdout.print(f"$ {shlex.join(['python', *sys.argv])}")
    stdout.print(machine())
    if xgrammar is None:
        stdout.print("xgrammar is not importable here: its columns are skipped (install it in a separate venv)")
    elif not args.xgrammar:
        stdout.print("xgrammar: skipped (--no-xgrammar)")
    stdout.print()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory() as tmp, Progress(*columns, console=stderr, disable=not stderr.is_terminal) as p:
        tmp = Path(tmp)
        demo = LLM(dtype=torch.bfloat16) if "demo" in models or "demo" in vocab_names else None
        decode_rows = []
        for name in models:
            task = p.add_task(f"decode {name}", total=2 * args.rounds + 1)
            if name == "demo":
                llm, label = demo, "demo (Gemma 4 arch, tiny)"
            else:
                p.update(task, description=f"decode {name}: checkpoint")
                llm, label = LLM(qwen_checkpoint(args.cache_dir, tmp), dtype=torch.bfloat16), "Qwen2.5-0.5B-shaped"
                p.update(task, description=f"decode {name}")
            decode_rows.append(bench_decode(label, llm, args, p, task))
            if llm is not demo:
                del llm
                gc.collect()
        if decode_rows:
            print_decode(stdout, decode_rows, args)
        vocabs = [load_vocab(v, tmp, demo) for v in vocab_names]
        if vocabs:
            load: list[float] = []
            with foreign_load(load):
                rows = bench_grammar_engines(vocabs, args, p)
            print_engines(stdout, rows, args)
            stdout.print(f"  other processes used {100 * load[0]:.0f}% of the machine's CPU during sections 2-4.")


if __name__ == "__main__":
    main()
