"""Prefill and decode speed while other processes compete for the cores: hearthlm and llama.cpp
(llama-cpp-python, one thread per core) on the same GGUF file, with 0, 1 and 2 busy processes (each a Python loop
spinning on one core, started before and killed after each step).

    python benchmarks/contention.py [--model qwen2.5-0.5b] [--gguf Q4_0] [--layers N] [--rounds 3]
                                    [--busy 0,1,2] [--prompt-len 512] [--new-tokens 32]

The checkpoint (random weights, the model's real shapes) and its GGUF file come from benchmarks/decode.py
(ensure_checkpoint, gguf_file: llama-quantize's head type) and are reused from --cache-dir; so are its engine
classes and prompts. Each round visits every busy level (odd rounds in reverse) and at each level runs both
engines, the order alternating from one step to the next. Figures are medians over the rounds:

- prefill tok/s: --prompt-len / the time from the call to the first generated token, cold (no prefix cache);
- decode tok/s: batch 1, greedy, --new-tokens after a 16-token prompt, between the first and the last token;
- slowdown: the engine's own 0-busy median / its median at this level (2.0x: half the speed);
- other CPU: the share of the machine's CPU time that other processes (the busy ones included) used during the
  step, so a step that someone else's job disturbed shows it.

The target (issue 20): hearthlm slows down no more than llama.cpp does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

try:
    import decode
except ImportError:  # run as `python -m benchmarks.contention`
    from benchmarks import decode

ENGINES = ("hearthlm", "llama.cpp")
SPIN = "while True: pass"
SETTLE_S = 0.5  # the busy processes get going before a step starts


@dataclass
class Sample:
    engine: str
    busy: int
    round: int
    prefill: float  # tok/s
    decode: float  # tok/s
    other_cpu: float  # share of the machine's CPU that other processes used during the step


@contextmanager
def busy(n: int) -> Iterator[list[subprocess.Popen]]:
    """n processes spinning on the CPU for the duration of the block; killed (and reaped) on the way out."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        if procs:
            time.sleep(SETTLE_S)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_engines(folder: Path, qtype: str, warm_ids: list[int], progress: Progress) -> dict[str, decode.Engine]:
    """Both engines on the checkpoint's `qtype` GGUF file, each warmed up with a short decode. decode.py's llama.cpp
    engine runs without AMX weight buffers where they crash it (it says so), its CPU_REPACK kept."""
    engines = {}
    with decode.paused(progress):  # hearthlm's loader draws its own progress bar
        for name in ENGINES:
            engines[name] = decode.LOADERS[name](folder, f"gguf-{qtype}")
            engines[name].decode(warm_ids, 4)  # first calls pay one-time kernel and allocator setup
    return engines


def step(engine: decode.Engine, name: str, n_busy: int, r: int, ids: tuple[list[int], list[int]], new: int) -> Sample:
    decode_ids, prefill_ids = ids
    load: list[float] = []
    with decode.foreign_load(load):
        prefill = len(prefill_ids) / engine.prefill(prefill_ids)
        tok_s, _ = engine.decode(decode_ids, new)
    return Sample(name, n_busy, r, prefill, tok_s, load[0])


def run(engines: dict[str, decode.Engine], ids, args: argparse.Namespace, progress: Progress) -> list[Sample]:
    task = progress.add_task("measuring", total=args.rounds * len(args.busy) * len(engines))
    samples, flip = [], False
    for r in range(args.rounds):
        for n_busy in args.busy if r % 2 == 0 else args.busy[::-1]:
            with busy(n_busy):
                for name in ENGINES[::-1] if flip else ENGINES:
                    progress.update(task, description=f"round {r + 1}/{args.rounds}, {n_busy} busy, {name}")
                    progress.refresh()
                    samples.append(step(engines[name], name, n_busy, r, ids, args.new_tokens))
                    progress.advance(task)
                    progress.refresh()
            flip = not flip
    return samples


# -- report ---------------------------------------------------------------------------------------------------


def figures(samples: list[Sample], engine: str, n_busy: int) -> dict[str, float]:
    mine = [s for s in samples if s.engine == engine and s.busy == n_busy]
    out = {}
    for key in ("prefill", "decode", "other_cpu"):
        values = [getattr(s, key) for s in mine]
        out[key], out[f"{key}_min"], out[f"{key}_max"] = statistics.median(values), min(values), max(values)
    return out


def summary(samples: list[Sample], levels: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """{engine: {busy: medians, min/max, and the slowdown against the engine's own figure at the fewest busy}}."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for engine in ENGINES:
        rows = {n: figures(samples, engine, n) for n in levels}
        base = rows[min(levels)]
        for f in rows.values():
            f["prefill_slowdown"] = base["prefill"] / f["prefill"]
            f["decode_slowdown"] = base["decode"] / f["decode"]
        out[engine] = rows
    return out


def table(title: str, result: dict[str, dict[int, dict[str, float]]]) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    cols = ("engine", "busy", "prefill tok/s", "(min-max)", "slowdown", "decode tok/s", "(min-max)", "slowdown")
    for col in (*cols, "other CPU"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for engine, rows in result.items():
        for n, f in rows.items():
            t.add_row(
                engine,
                str(n),
                f"{f['prefill']:.1f}",
                f"{f['prefill_min']:.1f}-{f['prefill_max']:.1f}",
                f"{f['prefill_slowdown']:.2f}x",
                f"{f['decode']:.2f}",
                f"{f['decode_min']:.2f}-{f['decode_max']:.2f}",
                f"{f['decode_slowdown']:.2f}x",
                f"{100 * f['other_cpu']:.0f}%",
            )
    return t


def verdict(result: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """One line per busy level and figure: whose slowdown is larger, and hearthlm / llama.cpp speed."""
    lines = []
    ours, theirs = result["hearthlm"], result["llama.cpp"]
    base, *loaded = list(ours)
    for n in loaded:
        for key in ("prefill", "decode"):
            a, b = ours[n][f"{key}_slowdown"], theirs[n][f"{key}_slowdown"]
            ratio, idle = ours[n][key] / theirs[n][key], ours[base][key] / theirs[base][key]
            lines.append(
                f"  {n} busy, {key}: hearthlm slows {a:.2f}x, {'no more than' if a <= b else 'MORE than'} "
                f"llama.cpp's {b:.2f}x; hearthlm / llama.cpp {ratio:.2f}x (at {base} busy: {idle:.2f}x)"
            )
    return lines


def machine() -> dict:
    info = decode.machine_info()
    return info | {"loadavg": os.getloadavg(), "hearthlm_isa": _isa()}


def _isa() -> str:
    from hearthlm.kernels import cpu

    return cpu.isa()


def write_json(path: Path, args: argparse.Namespace, file: Path, samples, result, before: dict) -> None:
    doc = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "file": str(file),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": before,
        "loadavg_after": os.getloadavg(),
        "samples": [asdict(s) for s in samples],
        "summary": result,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


# -- CLI ------------------------------------------------------------------------------------------------------


def levels(text: str) -> list[int]:
    try:
        items = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--busy takes comma-separated counts, like 0,1,2; got {text!r}") from None
    if not items or items[0] < 0:
        raise argparse.ArgumentTypeError(f"--busy takes counts >= 0, at least one; got {text!r}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(decode.MODELS), default="qwen2.5-0.5b", help="checkpoint shapes")
    ap.add_argument("--gguf", choices=list(decode.GGUF_TYPES), default="Q4_0", help="the file's type")
    ap.add_argument("--layers", type=int, default=None, help="build the model with this many layers")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every busy level; figures are medians")
    ap.add_argument("--busy", type=levels, default=[0, 1, 2], help="competing busy processes per level")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of the prefill")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per decode run (>= 2)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/hearthlm-bench-checkpoints"))
    ap.add_argument("--json", type=Path, default=None, help="where to write the figures (default: benchmarks/results)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.prompt_len < 1 or args.new_tokens < 2 or (args.layers is not None and args.layers < 1):
        ap.error("need --rounds >= 1, --prompt-len >= 1, --new-tokens >= 2 and --layers >= 1")
    if not decode.llama_cpp_installed():
        ap.error("llama.cpp runs beside hearthlm here: pip install llama-cpp-python")
    return args


def main() -> None:
    args = parse_args()
    started = datetime.now()
    before = machine()
    stdout, stderr = Console(width=None if sys.stdout.isatty() else 160), Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # no auto refresh: a redraw thread would compete for the cores being measured
    with Progress(*columns, console=stderr, auto_refresh=False, disable=not stderr.is_terminal) as progress:
        progress.add_task(f"{args.model}: checkpoint and {args.gguf} file", total=None)
        progress.refresh()
        folder, _ = decode.ensure_checkpoint(args.model, args.layers, args.cache_dir)
        file = decode.gguf_file(folder, args.gguf)
        ids = decode.prompts(folder, args.prompt_len)
        engines = load_engines(folder, args.gguf, ids[0][:8], progress)
        samples = run(engines, ids, args, progress)
    result = summary(samples, args.busy)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    title = (
        f"{args.model} ({layers} layers), {file.name}: prefill {args.prompt_len} tokens, decode {args.new_tokens} "
        f"tokens at batch 1; medians of {args.rounds} rounds"
    )
    stdout.print(table(title, result))
    for line in verdict(result):
        stdout.print(line, markup=False, highlight=False)
    load = os.getloadavg()
    stdout.print(
        f"  {before['cpu']}, {before['cores']} cores, hearthlm kernel path {before['hearthlm_isa']}, torch "
        f"threads {before['torch_threads']}; load average {before['loadavg'][0]:.2f} before, {load[0]:.2f} "
        "after",
        markup=False,
        highlight=False,
    )
    path = args.json or decode.RESULTS / f"contention-{socket.gethostname()}-{started:%Y%m%d-%H%M%S}.json"
    write_json(path, args, file, samples, result, before)
    stdout.print(f"wrote {path}", highlight=False)


if __name__ == "__main__":
    main()
