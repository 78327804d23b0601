"""Quality of each weight format against the unquantized model: KL divergence and top-1 agreement of the
next-token distributions, and perplexity, on held-out text (benchmarks/data/heldout.txt: KJV, fortunes and
Python docs passages the demo model never trained on).

    python benchmarks/quality.py [MODEL] [--tokens 1024] [--formats int8,int4-g32,...] [--gguf Q8_0,Q4_0,...]
                                 [--dtypes bfloat16] [--paths exact,gemm] [--files F16,Q8_0,Q4_0,...]
                                 [--llama-cpp] [--random llama3.2-1b --layers 4] [--step 1] [--json PATH]

MODEL defaults to the trained demo model; --random NAME builds one of benchmarks/decode.py's random-weight
checkpoints instead (its shapes, --layers of them); a model without a tokenizer reads the held-out text through
the demo model's. Our formats are quantized at load (LLM(quant=...)). GGUF types
are applied to the same matrices as our formats (linear layers and experts; embeddings and the LM head stay
int8 per row, as in ours, so the rows compare the matrix formats alone): each matrix is encoded into the
type's blocks (the `gguf` package's quantizers; tests/gguf_files.py's simple encoders for the K-types, which
are cruder than llama.cpp's, so their rows are pessimistic) and repacked as a GGUF file's tensor is.
--dtypes adds the model loaded in those 16-bit dtypes. --files adds whole GGUF files of those types (written once
by benchmarks/decode.py's gguf_file, with the LM head type llama-quantize gives it), loaded by hearthlm, and with
--llama-cpp also run by llama.cpp (llama-cpp-python, every position's logits, a float32 KV cache as ours, without
its extra buffer types), so both engines are measured against the same float32 reference on the same bytes.
llama.cpp rounds activations too: to 8 bits per block for quantized types (Q8_0 / Q8_K), to fp16 / bf16 for
F16 / BF16 files.

Logits come from one prefill pass; --step 1 feeds the tokens one at a time through the KV cache instead, as
generation does (the int8-activation GEMV kernel; llama.cpp then decodes in batches of --step too).
--paths picks hearthlm's prefill paths (default: the widest this CPU runs), each row measured on each:
- exact: HEARTHLM_ISA=torch, weights dequantized in tiles and multiplied in float32 (bf16 weights in float32);
- avx2: HEARTHLM_ISA=avx2, the AVX2 integer GEMM, activations rounded as on the AVX-512 path (bf16 in float32);
- gemm: HEARTHLM_ISA=avx512, the AVX-512 VNNI integer GEMM with activations rounded to int8 per block of 32
  (as llama.cpp's Q8_0 / Q8_K activations), and bf16 weights through oneDNN's bf16 GEMM (x rounded to bf16)
  where the CPU has AVX512-BF16 or AMX;
- amx: HEARTHLM_ISA=amx, the same integer GEMM on AMX tiles.
With exact and a GEMM path, "exact→gemm" is the KL of the GEMM path's distributions from the exact path's on the
same model (the cost of the 8-bit activations alone), and "gemm / format" divides it by the format's own KL on the
exact path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import csv_list  # noqa: E402  (the sibling benchmark, for its comma-list option type)

from hearthlm import LLM, load_tokenizer
from hearthlm.bench.results import Quality, logits_of, quality
from hearthlm.kernels import cpu
from hearthlm.quant import ggml
from hearthlm.quant.quantize import QuantSpec
from hearthlm.store import DEMO_DIR, DEMO_MODEL
from hearthlm.weights.loader import _quant_plan

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128"]
GGUF = ["Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q4_0", "Q4_1", "Q4_K"]
FILE_TYPES = ["F32", "F16", "BF16", *GGUF]
DTYPES = ["bfloat16", "float16"]
# hearthlm's prefill paths -> the HEARTHLM_ISA that selects each: dequantized float tiles (no integer GEMM), the
# integer GEMM on AVX2, on AVX-512 VNNI, and on AMX tiles
PATHS = {"exact": "torch", "avx2": "avx2", "gemm": "avx512", "amx": "amx"}
GEMMS = ("avx2", "gemm", "amx")  # the paths that round activations to int8 (and multiply bf16 weights in bf16)
LLAMA_CPP = "llama.cpp"


@dataclass
class Candidate:
    label: str
    make: Callable[[], LLM]
    file: Path | None = None  # a GGUF file, which llama.cpp can run too


def ggml_model(model, qtype: str) -> LLM:
    """`model` loaded in float32 with every planned matrix replaced by its `qtype` blocks, repacked."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import encode

    llm = LLM(model, dtype="float32", quant="int8")  # embeddings / head int8 per row, matrices replaced below
    ref = LLM(model, dtype="float32")
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    plan = _quant_plan(ref.model, QuantSpec(4, 32))
    for name, spec in plan.items():
        if spec.bits == 8 and spec.group is None:  # embeddings and LM head: keep int8 per row
            continue
        owner, _, attr = name.rpartition(".")
        weight = getattr(ref.model.get_submodule(owner), attr).detach()
        data, ttype = encode(weight.float().numpy(), kind)
        if ttype != kind:
            continue  # rows too short for the type's blocks: left as int8
        raw = torch.from_numpy(data.reshape(-1).view("uint8").copy())
        packed = ggml.repack(raw, int(ttype), tuple(weight.shape))
        parent = llm.model.get_submodule(owner)
        delattr(parent, attr)
        setattr(parent, attr, packed)
    return llm


# -- kernel paths ---------------------------------------------------------------------------------------------


@contextmanager
def kernel_path(name: str) -> Iterator[None]:
    """hearthlm's products in the block take prefill path `name` (a key of PATHS), as tests/conftest.py's
    kernel_path fixture sets it: HEARTHLM_ISA, with the cached choice forgotten before and after."""
    old = os.environ.get("HEARTHLM_ISA")
    os.environ["HEARTHLM_ISA"] = PATHS[name]
    cpu.isa.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HEARTHLM_ISA", None)
        else:
            os.environ["HEARTHLM_ISA"] = old
        cpu.isa.cache_clear()


def missing_path(name: str) -> str | None:
    """Why this CPU (or environment) cannot run prefill path `name`; None if it can."""
    with kernel_path(name):
        if cpu.isa() != PATHS[name]:
            return f"the {name} path needs kernel path {PATHS[name]}, and here it is {cpu.isa()}"
        if name in GEMMS and cpu.gemm_path() != name.replace("gemm", "avx512"):
            return f"the {name} path needs its integer GEMM built and able to run here"
        if name == "amx" and not cpu._amx():  # else quant_gemm would run on VNNI under the amx name
            return "the amx path needs the kernel's AMX code and Linux's permission to use the tiles"
    return None


# -- models, tokens, GGUF files -------------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> str | Path | None:
    if args.random is None:
        return args.model
    from decode import ensure_checkpoint

    folder, _ = ensure_checkpoint(args.random, args.layers, args.cache_dir)
    return folder


def heldout_ids(ref: LLM, n: int) -> list[int]:
    """The held-out text's first n token ids; through the demo model's tokenizer when the model has none (the
    random checkpoints), which needs a vocabulary at least as large as the demo's."""
    tokenizer = ref.tokenizer or load_tokenizer(DEMO_DIR / DEMO_MODEL)
    ids = tokenizer.encode((ROOT / "benchmarks" / "data" / "heldout.txt").read_text())[:n]
    if max(ids) >= ref.config.vocab_size:
        raise SystemExit(f"error: {ref.path} has no tokenizer and a vocabulary too small for the demo model's")
    return ids


def gguf_path(folder: Path, qtype: str, cache: Path) -> Path:
    """The checkpoint `folder` as a GGUF file of `qtype`, written once by benchmarks/decode.py's gguf_file (beside a
    sharded checkpoint; a single-file one, like the demo, gets a folder in `cache` that links to it)."""
    from decode import INDEX, gguf_file
    from safetensors import safe_open

    if (folder / INDEX).exists():
        return gguf_file(folder, qtype)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    mirror = cache / f"quality-{folder.name}-{stat.st_size}-{int(stat.st_mtime)}"
    mirror.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if not (mirror / name).exists():
            (mirror / name).symlink_to(folder / name)
    with safe_open(str(weights), framework="pt") as f:
        index = {"weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
    (mirror / INDEX).write_text(json.dumps(index))
    return gguf_file(mirror, qtype)


def candidates(model, folder: Path, args: argparse.Namespace) -> list[Candidate]:
    rows = [Candidate(f, lambda f=f: LLM(model, dtype="float32", quant=f)) for f in args.formats]
    rows += [Candidate(f"GGUF {t}", lambda t=t: ggml_model(model, t)) for t in args.gguf]
    rows += [Candidate(d, lambda d=d: LLM(model, dtype=d)) for d in args.dtypes]
    for t in args.files:
        path = gguf_path(folder, t, args.cache_dir)
        head = path.stem.rsplit("-head-", 1)[-1]
        rows.append(Candidate(f"file {t} (head {head})", lambda p=path: LLM(p, dtype="float32"), path))
    return rows


# -- llama.cpp ------------------------------------------------------------------------------------------------


def llama_cpp_logits(path: Path, ids: list[int], batch: int) -> torch.Tensor:
    """llama.cpp's logits [T, vocab] for every position of `ids` on the GGUF file, in batches of `batch` tokens.
    Without its extra buffer types (weights repacked at load): with AMX it crashes in the first llama_decode on
    the Xeon VMs here, and the repacked kernels quantize the activations as the plain ones do."""
    import llama_cpp
    import numpy as np

    from hearthlm.bench.engines import _extra_buffers

    threads = os.cpu_count()
    with _extra_buffers(False):
        llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=batch, logits_all=True, n_threads=threads,
                              n_threads_batch=threads, type_k=0, type_v=0, verbose=False)  # fmt: skip
    try:
        llm.eval(ids)  # type_k/v 0: a float32 KV cache, as hearthlm's float32 models keep
        return torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32).copy())
    finally:
        llm.close()


# -- measuring and reporting ----------------------------------------------------------------------------------


@contextmanager
def paused(progress: Progress) -> Iterator[None]:
    """hearthlm's loader draws its own progress bar in a terminal; two live displays cannot share one."""
    progress.stop()
    try:
        yield
    finally:
        progress.start()


def measure(row: Candidate, llm: LLM, ref_logits: torch.Tensor, ids: list[int], args: argparse.Namespace) -> dict:
    """{path: Quality against the reference} for each of hearthlm's paths on `llm` (row's model, and llama.cpp on a
    file row), plus added(path) (a GEMM path against exact on the same model) when both ran."""
    logits = {}
    for name in args.paths:
        with kernel_path(name):
            logits[name] = logits_of(llm, ids, args.step)
    out = {name: quality(ref_logits, x, ids) for name, x in logits.items()}
    for name in GEMMS:
        if "exact" in logits and name in logits:
            out[added(name)] = quality(logits["exact"], logits[name], ids)
    if args.llama_cpp and row.file is not None:
        out[LLAMA_CPP] = quality(ref_logits, llama_cpp_logits(row.file, ids, args.step or 512), ids)
    return out


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [T - 1, vocab]
    return math.exp(-logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).mean().item())


def added(path: str) -> str:
    return f"exact→{path}"


def cell(q: Quality | None) -> str:
    return "-" if q is None else f"{q.kl_mean:.2e} ({q.kl_max:.1e}) {100 * q.top1_agreement:.1f}% {q.ppl_candidate:.2f}"


def report(title: str, results: dict[str, dict], paths: list[str]) -> Table:
    """One column per engine (KL mean (max), top-1 agreement, perplexity), then per GEMM path the KL it adds to the
    exact path and that KL / the format's own."""
    engines = paths + ([LLAMA_CPP] if any(LLAMA_CPP in r for r in results.values()) else [])
    gemms = [g for g in GEMMS if g in paths and "exact" in paths]
    table = Table(title=title)
    table.add_column("format")
    for name in engines:
        table.add_column(f"{name}: KL mean (max) top-1 ppl", justify="right")
    for name in gemms:
        table.add_column(f"KL {added(name)}", justify="right")
        table.add_column(f"{name} / format", justify="right")
    for label, r in results.items():
        row = [label] + [cell(r.get(name)) for name in engines]
        for name in gemms:
            extra, own = r[added(name)].kl_mean, r["exact"].kl_mean
            row += [f"{extra:.2e}", f"{extra / own:.2f}" if own > 0 else "-"]
        table.add_row(*row)
    return table


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = sorted(f for f in cpu.cpu_flags() if "avx512" in f or "amx" in f or "vnni" in f)
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags, "loadavg": os.getloadavg()}


def write_json(path: Path, title: str, results: dict[str, dict], before: dict) -> None:
    rows = {
        label: {k: asdict(v) if isinstance(v, Quality) else v for k, v in r.items()} for label, r in results.items()
    }
    doc = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "title": title,
        "machine": before,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a model (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--formats", type=lambda s: [f for f in s.split(",") if f], default=FORMATS)
    ap.add_argument("--gguf", type=csv_list(GGUF), default=GGUF, help="GGUF block types on our matrices")
    ap.add_argument(
        "--dtypes", type=csv_list(DTYPES), default=[], help="16-bit dtypes of the model: " + ", ".join(DTYPES)
    )
    ap.add_argument("--files", type=csv_list(FILE_TYPES), default=[], help="whole GGUF files: " + ", ".join(FILE_TYPES))
    ap.add_argument("--llama-cpp", action="store_true", help="run llama.cpp on each --files file too")
    ap.add_argument(
        "--paths", type=csv_list(list(PATHS)), default=None, help="hearthlm prefill paths: " + ", ".join(PATHS)
    )
    ap.add_argument("--step", type=int, default=None, help="tokens per forward through the KV cache (1: decode)")
    ap.add_argument(
        "--random",
        choices=["llama3.2-1b", "qwen2.5-0.5b", "gemma4-e2b-like"],
        default=None,
        help="a random-weight checkpoint of benchmarks/decode.py's recipes instead of MODEL",
    )
    ap.add_argument("--layers", type=int, default=None, help="layers of the --random checkpoint")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/hearthlm-bench-checkpoints"))
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.tokens < 2 or (args.step is not None and args.step < 1) or (args.layers is not None and args.layers < 1):
        ap.error("need --tokens >= 2, --step >= 1 and --layers >= 1")
    if args.random and args.model:
        ap.error("give MODEL or --random, not both")
    if args.llama_cpp and not args.files:
        ap.error("--llama-cpp runs the --files files: name at least one type")
    args.paths = args.paths or [next((p for p in reversed(PATHS) if missing_path(p) is None), "exact")]
    for name in args.paths:
        if why := missing_path(name):
            ap.error(f"--paths {name}: {why}")
    return args


def main() -> None:
    args = parse_args()
    before = machine()
    model = resolve_model(args)
    ref = LLM(model, dtype="float32")
    ids = heldout_ids(ref, args.tokens)
    ref_logits = logits_of(ref, ids, args.step)
    folder = Path(ref.path)
    del ref
    rows = candidates(model, folder, args)
    step = f", step {args.step}" if args.step else ""
    title = f"{folder.name}: {len(ids)} held-out tokens against float32{step} (perplexity {perplexity(ref_logits, ids):.2f})"
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("measuring", total=len(rows))
        for row in rows:
            progress.update(task, description=row.label)
            try:
                with paused(progress):
                    llm = row.make()
                results[row.label] = measure(row, llm, ref_logits, ids, args)
                del llm
            except ValueError as e:  # a file hearthlm refuses (e.g. a layout llama.cpp would run differently)
                failed[row.label] = str(e)
            progress.advance(task)
    console = Console(width=220)
    console.print(table := report(title, results, args.paths))
    load = os.getloadavg()
    console.print(
        f"{before['cpu']}, {before['cores']} cores, {' '.join(before['flags'])}; load average "
        f"{before['loadavg'][0]:.2f} before, {load[0]:.2f} after",
        highlight=False,
    )
    for label, why in failed.items():
        console.print(f"{label} failed: {why}", highlight=False)
    if args.json:
        write_json(args.json, table.title, results | {k: {"error": v} for k, v in failed.items()}, before)


if __name__ == "__main__":
    main()
