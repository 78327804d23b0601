"""`hearth bench`: time to first token, prefill and decode speed, peak memory and quality loss, side by side.

How it measures (the ideas of benchmarks/decode.py, in the product):

- Every engine/model runs in its own worker process (`python -m hearthlm.bench.engines --worker`), so peak memories
  never mix: the peak RSS increase is VmHWM (reset after the imports where the kernel allows) minus the RSS
  after the imports; on CUDA it is torch.cuda.max_memory_allocated. Next to it: `hearth fit`'s estimate for
  the same model, dtype and context, less the imports it also counts.
- The workers of one model stay loaded and the rounds alternate their order, so all engines see the same
  machine conditions. A warm-up run (not counted) follows each load. Figures are medians, with min and max.
- Prompts are seeded random token ids of exactly --prompt-len; decoding is greedy and ignores EOS, so every
  run produces --gen-len tokens. TTFT = prefill + first token; prefill tok/s = prompt tokens / TTFT; decode
  tok/s = tokens after the first / time after the first.
- Roofline: decode at batch 1 reads every weight once per token, so bandwidth (fit.py's cached measurement)
  / bytes read per token (fit.py's estimate at this context) bounds decode tok/s.
- Quality (with --quant): KL divergence, top-1 agreement and perplexity of the quantized model against the
  unquantized one on a fixed text (`compare`), computed in the worker after its peak memory is read.

Engines: hearthlm; transformers (`--vs transformers`, AutoModelForCausalLM on the same folder and dtype);
llama.cpp (`--vs llama.cpp`, llama-cpp-python on the same .gguf file that hearthlm runs, each step one
llama_decode call, greedy by argmax of its logits). On a GGUF file the bytes per token of each engine are the
weights it holds (hearthlm repacks K-quants wider than the file) rather than fit's estimate, and there is no
fit estimate of the peak: fit prices formats, not a given file's mix of types.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engines import ENGINES, Worker, WorkerDied
from .report import plot, plot_check, table
from .results import SEED, BenchError, Quality, Ratio, Result, Row, Stat, compare, quality_ids, synthetic_prompt

VS_ENGINES = ("transformers", "llama.cpp")
FIT_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
__all__ = [
    "BenchError",
    "Quality",
    "Ratio",
    "Result",
    "Row",
    "Stat",
    "bench",
    "compare",
    "plot",
    "plot_check",
    "quality_ids",
    "synthetic_prompt",
    "table",
]

SETTLE = 1.0  # seconds between two engines' runs (measured: without it, hearthlm decode reads ~20% low)


# -- the harness --------------------------------------------------------------------------------------


@dataclass
class _Variant:
    engine: str
    dtype: str
    quant: str | None
    draft: str | None = None  # hearthlm's speculative decoding drafter (LLM's `draft`), None: off


def _variants(dtypes: list[str], quants: list[str | None], vs: list[str], draft: str | None = None) -> list[_Variant]:
    drafts = [None] if draft is None else [None, draft]
    out = [_Variant("hearthlm", d, q, x) for d in dtypes for q in quants for x in drafts]
    return out + [_Variant(e, d, None) for e in vs for d in dtypes]


def _fit_figures(path: Path, fmt: str, context: int, device: str) -> tuple[int | None, int | None]:
    """-> (fit's estimate of the peak memory above the imports, bytes read per decode step), None when fit
    cannot price this format."""
    from .. import fit

    try:
        e = fit.estimate(fit.load(path), fmt, context)
    except (ValueError, FileNotFoundError):
        return None, None
    if device.startswith("cuda"):
        return e.vram - fit.CUDA_CONTEXT, e.bytes_per_token
    return (e.load_peak or e.ram) - fit.RUNTIME_RSS, e.bytes_per_token


def _row(spec: dict, worker: Worker, samples: list[dict], name: str, bandwidth: float | None) -> Row:
    ttft = [s["ttft"] for s in samples]
    decode = Stat.of([s["decode"] for s in samples])
    tokens = {s["tokens"] for s in samples}
    assert len(tokens) == 1, f"runs produced different token counts: {tokens}"
    fmt = spec["quant"] or FIT_FORMATS[spec["dtype"]]
    context = len(spec["prompt"]) + spec["gen_len"]
    if spec["path"].endswith(".gguf"):  # fit prices formats, not a given file's mix of types: ask the engine
        fit_memory, per_token = None, worker.ask("bytes")["bytes"]
    else:
        fit_memory, per_token = _fit_figures(Path(spec["path"]), fmt, context, spec["device"])
    roofline = bandwidth * 1e9 / per_token if bandwidth and per_token else None
    return Row(
        model=name,
        path=spec["path"],
        engine=spec["engine"],
        dtype=spec["dtype"],
        quant=spec["quant"],
        device=spec["device"],
        prompt_tokens=len(spec["prompt"]),
        generated_tokens=tokens.pop(),
        ttft_s=Stat.of(ttft),
        prefill_tok_s=Stat.of([len(spec["prompt"]) / t for t in ttft]),
        decode_tok_s=decode,
        load_s=worker.load_s,
        peak_memory=worker.ask("memory")["peak"],
        fit_memory=fit_memory,
        bytes_per_token=per_token,
        bandwidth_gbps=bandwidth,
        roofline_tok_s=roofline,
        roofline_fraction=decode.median / roofline if roofline else None,
        expert_budget=spec.get("expert_budget"),
        moe=_moe_medians(samples),
        draft=spec.get("draft"),
        acceptance=_acceptance(samples),
    )


def _acceptance(samples: list[dict]) -> float | None:
    """Accepted / drafted tokens over the counted runs (None: nothing drafted)."""
    drafted = sum(s.get("drafted", 0) for s in samples)
    return sum(s.get("accepted", 0) for s in samples) / drafted if drafted else None


def _moe_medians(samples: list[dict]) -> dict | None:
    runs = [s["moe"] for s in samples if "moe" in s]
    return {k: Stat.of([r[k] for r in runs]).median for k in runs[0]} if runs else None


def _bench_model(
    path: Path,
    variants: list[_Variant],
    prompt_len: int,
    gen_len: int,
    runs: int,
    device: str,
    bandwidth,
    step,
    expert_budget: str | None = None,
) -> list[Row]:
    """All variants of one model: workers loaded together, rounds alternating their order."""
    from .. import fit

    if path.suffix == ".gguf" and any(v.quant for v in variants):
        raise BenchError(f"{path.name} is a GGUF file, already quantized: leave out --quant")
    cfg = fit.load(path).config
    if prompt_len + gen_len > cfg.max_position:
        raise BenchError(f"{path.name}: --prompt-len + --gen-len = {prompt_len + gen_len} is over its context")
    prompt = synthetic_prompt(cfg.vocab_size, prompt_len)
    base = {"path": str(path), "prompt": prompt, "gen_len": gen_len, "device": device}
    specs = [base | {"engine": v.engine, "dtype": v.dtype, "quant": v.quant, "draft": v.draft} for v in variants]
    for spec in specs:
        if spec["engine"] == "hearthlm" and expert_budget is not None and cfg.num_experts:
            spec["expert_budget"] = expert_budget
    workers: list[Worker] = []
    try:
        for spec in specs:
            step(f"{path.name}: loading {spec['engine']} {spec['quant'] or spec['dtype']}", 0)
            workers.append(_start(spec))
        samples: list[list[dict]] = [[] for _ in specs]
        for r in range(runs):
            order = range(len(specs)) if r % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                step(f"{path.name}: {specs[i]['engine']} {specs[i]['quant'] or specs[i]['dtype']}, run {r + 1}", 1)
                time.sleep(SETTLE)  # let the previous engine's idle OpenMP threads go to sleep first
                samples[i].append(workers[i].ask("run"))
        rows = [_row(s, w, x, path.name, bandwidth) for s, w, x in zip(specs, workers, samples)]
        for row, w in zip(rows, workers):
            if row.quant is not None:  # after the peak memory was read: the reference model loads here
                row.quality = Quality(**w.ask("quality")["quality"])
        return rows
    finally:
        for w in workers:
            w.close()


def _start(spec: dict) -> Worker:
    """A worker for `spec`. llama.cpp's weights repacked for AMX crash it on some CPUs that report AMX (seen on a
    Xeon VM: a segfault in the first llama_decode); then it is measured once more without its extra buffer types,
    and the report says so."""
    try:
        return Worker(spec)
    except WorkerDied as e:
        if spec["engine"] != "llama.cpp":
            raise
        print(
            f"warning: {str(e).splitlines()[0]}; measuring llama.cpp again without its repacked weight buffers "
            "(use_extra_bufts off), which can understate its speed on this CPU",
            file=sys.stderr,
        )
        spec["extra_buffers"] = False
        return Worker(spec)


def _ratios(rows: list[Row]) -> list[Ratio]:
    out = []
    for other in rows:
        if other.engine == "hearthlm":
            continue
        same = [
            r
            for r in rows
            if r.engine == "hearthlm" and r.path == other.path and r.dtype == other.dtype and not r.draft
        ]
        ours = next((r for r in same if r.quant is None), same[0] if same else None)
        if ours is None:
            continue
        out.append(
            Ratio(
                model=other.model,
                dtype=other.dtype,
                versus=other.engine,
                ttft=ours.ttft_s.median / other.ttft_s.median,
                prefill=ours.prefill_tok_s.median / other.prefill_tok_s.median,
                decode=ours.decode_tok_s.median / other.decode_tok_s.median,
                peak_memory=ours.peak_memory / other.peak_memory if other.peak_memory > 0 else None,
            )
        )
    return out


def _machine(device: str, bandwidth: float | None) -> tuple[dict[str, Any], float | None]:
    import platform

    import torch

    from .. import fit

    m = fit.detect(bandwidth_gbps=bandwidth)
    bw = m.gpu_bandwidth if device.startswith("cuda") and bandwidth is None else m.cpu_bandwidth
    info = {
        "cpu": m.cpu,
        "threads": torch.get_num_threads(),
        "gpus": [g["name"] for g in m.gpus],
        "bandwidth_gbps": bw,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return info, bw


def bench(
    models: list[str] | None = None,
    dtypes: list[str | None] | None = None,
    quants: list[str | None] | None = None,
    prompt_len: int = 128,
    gen_len: int = 32,
    runs: int = 3,
    vs: list[str] | None = None,
    device: str | None = None,
    bandwidth: float | None = None,
    progress: bool = False,
    expert_budget: str | None = None,
    draft: str | None = None,
) -> Result:
    """Benchmark each model (names as `LLM` takes them; none: the demo model) in each dtype and quantization
    with hearthlm, and with each engine in `vs` on the same weights. See the module docstring for the method.
    `expert_budget`: hearthlm runs MoE models under it, and reports hit rate and bytes fetched per token.
    `draft`: hearthlm also runs with this speculative-decoding drafter (LLM's `draft`: "auto", "lookup", a drafter
    folder), a row beside each row without it, with the acceptance rate."""
    import torch

    from .. import store
    from ..api import resolve_dtype

    vs = list(dict.fromkeys(vs or []))
    unknown = [e for e in vs if e not in VS_ENGINES]
    if unknown:
        raise BenchError(f"unknown engine(s) {unknown} for --vs; choose from {', '.join(VS_ENGINES)}")
    if prompt_len < 1 or gen_len < 2 or runs < 1:
        raise BenchError("need --prompt-len >= 1, --gen-len >= 2 and --runs >= 1")
    device = device or os.environ.get("HEARTHLM_DEVICE") or "cpu"
    paths = [store.resolve(m) for m in (models or [None])]
    for path in paths:
        for e in vs:
            ENGINES[e].check(path)
    names = [str(resolve_dtype(d, torch.device(device))).removeprefix("torch.") for d in (dtypes or [None])]
    if draft in ("off", ""):
        draft = None
    if draft is not None:
        from ..engine.speculative import make_drafter

        make_drafter(draft)  # an unknown name fails here, not in a worker
    variants = _variants(list(dict.fromkeys(names)), list(dict.fromkeys(quants or [None])), vs, draft)
    machine, bw = _machine(device, bandwidth)
    rows: list[Row] = []
    with _progress(progress, len(paths) * len(variants) * runs) as step:
        for path in paths:
            rows += _bench_model(path, variants, prompt_len, gen_len, runs, device, bw, step, expert_budget)
    settings = {"prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "vs": vs, "device": device, "seed": SEED}
    if expert_budget is not None:
        settings["expert_budget"] = expert_budget
    if draft is not None:
        settings["draft"] = draft
    return Result(rows, _ratios(rows), settings, machine)


@contextlib.contextmanager
def _progress(show: bool, total: int):
    """-> step(description, advance): a rich progress bar on stderr over the counted runs."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # no auto refresh: a redraw thread would compete with the measured engines for the cores
    with Progress(*columns, console=Console(stderr=True), auto_refresh=False, disable=not show) as bar:
        task = bar.add_task("starting", total=total)

        def step(description: str, advance: int) -> None:
            bar.update(task, description=description, advance=advance)
            bar.refresh()

        yield step
