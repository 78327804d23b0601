"""CPU kernels in C++ (AVX2/FMA/F16C), compiled on first use into one extension: a batch-1..8 GEMV, decode
attention over the KV cache in its stored dtype, RMSNorm, and RoPE for decode-sized inputs (gemv_cpu.cpp); each
row's argmax of the logits (logits_cpu.cpp); a GEMV and a row dequantizer for quantized weights (quant_cpu.cpp,
with x's rounding in quant_x.cpp, and the AVX-512 VNNI GEMV for 8-bit weights and any number of rows in
quant_vnni.cpp); the prefill GEMMs of AVX2 machines, an integer one for quantized weights (gemm_avx2.cpp) and a
float32 one for 16-bit weights (gemm_half_avx2.cpp); a whole decoder layer's decode step chaining them
(decoder_cpu.cpp). They split their work on hearthlm's own thread pool (threadpool.h) into chunks taken from a
shared counter, so a core that another process takes delays one chunk, not the whole kernel.

On CPUs with AVX-512 (F, BW, VL, DQ) and VNNI a second extension adds a faster integer GEMM for prefill with
quantized weights (gemm_avx512.cpp), on the AMX tile unit where the CPU has AMX-INT8, and a GEMM for bf16 weights with
float32 sums (bf16_gemm: AMX-BF16, else AVX512-BF16 where the CPU has it). `isa()` says which of the paths run
here: "amx", "avx512", "avx2" or "torch".
HEARTHLM_ISA=avx2 or =torch caps it below what the CPU has (tests check the narrower paths on wide machines
that way); HEARTHLM_KERNELS=0 is the same as HEARTHLM_ISA=torch.

The extensions are built with torch's cpp_extension into ~/.cache/hearthlm/kernels (about a minute each, once).
If the CPU lacks AVX2/FMA/F16C or no compiler is available, `available()` is False and callers use PyTorch's
own ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from rich.console import Console

MAX_ROWS = 8  # one pass of the GEMV kernels holds this many input rows in registers
# A fused decode step takes batches up to this many rows in one forward; on AVX2 the GEMV kernels run more rows
# than MAX_ROWS as even slices of at most MAX_ROWS in one pass over the weights (cpu_kernels.h kPassRows), so a
# row's result is the same as when the engine ran such a batch as separate forwards, and the Python around the
# kernels runs once per step.
MAX_DECODE_ROWS = 32


ISAS = ("amx", "avx512", "avx2", "torch")  # widest first
_AVX2 = {"avx2", "fma", "f16c"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
_NEEDS = {"amx": _AVX512 | {"amx_tile", "amx_int8", "amx_bf16"}, "avx512": _AVX512, "avx2": _AVX2}
_CFLAGS = {
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
    # The AMX and AVX512-BF16 code sits beside the VNNI code in one extension; the AMX code only runs where isa() is
    # "amx", the AVX512-BF16 code only where the CPU has avx512_bf16 (bf16_gemm_path() checks), so the extension
    # still loads and runs its integer GEMM on AVX-512 CPUs without them.
    "avx512": ["-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    + ["-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16", "-fopenmp"],
}


@functools.cache
def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return set()


@functools.cache
def isa() -> str:
    """The widest kernel path that runs here: what the CPU has, capped by HEARTHLM_ISA (or HEARTHLM_KERNELS=0)."""
    flags = cpu_flags()
    have = next((name for name in ISAS[:-1] if _NEEDS[name] <= flags), "torch")
    want = "torch" if os.environ.get("HEARTHLM_KERNELS", "1") == "0" else os.environ.get("HEARTHLM_ISA", have)
    if want not in ISAS:
        raise ValueError(f"HEARTHLM_ISA={want!r} is not a kernel path; use one of {', '.join(ISAS)}")
    return ISAS[max(ISAS.index(want), ISAS.index(have))]


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (hyper-threads share its units, and the
    kernels keep them busy): /proc/cpuinfo's (physical id, core id) pairs among the allowed CPUs."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu = set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "processor":
                cpu, socket = int(value), None
            elif key == "physical id":
                socket = value.strip()
            elif key == "core id" and cpu in allowed:
                cores.add((socket, value.strip()))
    except (OSError, ValueError):
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def set_threads(count: int | str | None = None) -> int:
    """Run PyTorch and hearthlm's kernels on `count` threads, else HEARTHLM_THREADS, else the physical cores.
    PyTorch's ops run on its OpenMP pool; the decode kernels run on hearthlm's own pool (threadpool.cpp), which
    reads this same count (torch.get_num_threads) at each call, and whose idle threads sleep after a short spin
    (HEARTHLM_POOL_SPIN_US) so that the two pools do not hold the cores from each other. Returns the count set."""
    where = "--threads" if count is not None else "HEARTHLM_THREADS"
    value = count if count is not None else os.environ.get("HEARTHLM_THREADS")
    if value is None or value == "":
        n = physical_cores()
    else:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{where}={value!r}: give a whole number of threads, 1 or more (this machine has "
                             f"{physical_cores()} physical cores)")  # fmt: skip
    torch.set_num_threads(n)
    return n


def _build(name: str, sources: tuple[str, ...], path: str = "avx2"):
    """Compile (first time) and import one extension from the .cpp files (and their headers) beside this file;
    None if unavailable.

    The build directory is named by a hash of the sources, the flags and the torch version, so two installs
    (venvs, checkouts) never rebuild over each other's library. An flock serializes builders: the kernel drops
    it when a process dies, so an interrupted build never leaves the next run waiting forever (torch's own
    lock file, which a killed build leaves behind, is removed while the flock is held)."""
    if ISAS.index(isa()) > ISAS.index(path):
        return None
    try:
        from torch.utils.cpp_extension import load

        # Link the OpenMP runtime torch itself ships, so the process has one thread pool, not two
        # competing for the same cores.
        torch_lib = Path(torch.__file__).parent / "lib"
        omp = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lgomp"] if (torch_lib / "libgomp.so.1").exists() else []
        cflags = _CFLAGS[path]
        ldflags = omp or ["-fopenmp"]
        here = Path(__file__).parent
        code = b"".join(p.read_bytes() for p in sorted([*here.glob("*.cpp"), *here.glob("*.h")]))
        key = hashlib.sha256(code + repr((sources, cflags, ldflags, torch.__version__)).encode()).hexdigest()[:16]
        root = Path(os.environ.get("HEARTHLM_CACHE", Path.home() / ".cache" / "hearthlm")) / "kernels"
        build = root / f"{name}-{key}"
        build.mkdir(parents=True, exist_ok=True)
        with open(root / f"{name}-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            library = build / f"{name}.so"
            if library.exists():
                return _import(name, library)
            (build / "lock").unlink(missing_ok=True)  # torch's, left by a build that was killed
            with Console(stderr=True).status("building hearthlm's CPU kernels (once, about a minute)"):
                return load(
                    name=name,
                    sources=[str(here / s) for s in sources],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=str(build),
                    verbose=False,
                )
    except Exception as e:  # no compiler / headers: fall back, loudly once
        warnings.warn(f"hearthlm: CPU kernels unavailable ({e}); using PyTorch ops", stacklevel=3)
        return None


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = (
    "threadpool.cpp",
    "gemv_cpu.cpp",
    "gemv_wide.cpp",
    "quant_x.cpp",
    "quant_cpu.cpp",
    "quant_vnni.cpp",
    "gemm_avx2.cpp",
    "gemm_half_avx2.cpp",
    "decoder_cpu.cpp",
    "logits_cpu.cpp",
    "bindings_cpu.cpp",
)
SOURCES_AVX512 = ("threadpool.cpp", "gemm_avx512.cpp", "bindings_avx512.cpp")


@functools.cache
def _load():
    module = _build("hearthlm_cpu", SOURCES)
    if module is not None:  # the GEMVs' path follows isa(), so HEARTHLM_ISA=avx2 keeps them on AVX2
        _set_gemv_path(module, "avx512" if _at_least("avx512") else "avx2")
    return module


# The most rows quant_linear gives quant_gemv rather than the integer GEMM (quant_gemm), for 8-bit weights on the
# VNNI path: it takes any number of rows in one pass over the weights (quant_vnni.cpp), and on Zen 4 it ran as
# fast as the GEMM at 256 rows and faster below (benchmarks/quant_gemv_paths.py --gemm --rows N). 4-bit weights
# there run 8 rows a pass. Where AMX runs the GEMM, its tiles keep every batch they had.
QUANT_GEMV_ROWS_VNNI = 128
# The same on the AVX2 path, whose GEMV holds 8 rows a pass (more run as even slices in one pass over the weights):
# on Zen 3, over Qwen2.5-0.5B's qkv, gate_up and down from DRAM, the GEMV was 1.0-1.4x faster than the AVX2 GEMM at
# 10 rows, 0.8-1.2x at 12 and 0.66-0.83x at 16 (benchmarks/quant_gemv_paths.py --gemm --rounds 4 --rows N). The
# fused decode step switches at the same count (decoder_cpu.cpp, kQuantGemvRowsAvx2), so it stays the module path.
QUANT_GEMV_ROWS_AVX2 = 12
_avx512_gemv = False  # the GEMVs' path is AVX-512 with VNNI (set_gemv_isa)


def _set_gemv_path(module, path: str) -> None:
    global _avx512_gemv
    module.set_gemv_isa(path)
    _avx512_gemv = path == "avx512"


def _wide_gemv() -> bool:
    """Whether the GEMVs take a batch in one pass here and HEARTHLM_ISA leaves the row limits to them: their path is
    AVX-512 and isa() is not AMX, whose GEMMs keep the batches they had."""
    return _avx512_gemv and isa() == "avx512"


def quant_gemv_rows(bits: int) -> int:
    """The most input rows that quant_linear runs on quant_gemv for `bits`-bit weights (more go to quant_gemm, or
    the float tiles); see QUANT_GEMV_ROWS_VNNI and QUANT_GEMV_ROWS_AVX2. Follows HEARTHLM_ISA: capped to avx2, the
    AVX2 limit."""
    if _wide_gemv():
        return QUANT_GEMV_ROWS_VNNI if bits == 8 else MAX_ROWS
    # One pass where AMX's tiles take the rest, or a "torch" cap its exact float tiles.
    return QUANT_GEMV_ROWS_AVX2 if isa() == "avx2" and not _avx512_gemv else MAX_ROWS


# The most rows linear() runs on gemv for float weights (more go to a GEMM). On the AVX-512 path gemv takes any
# number of rows in one pass over the weights (gemv_wide.cpp); on Zen 4 it beat bf16_gemm (AVX512-BF16) up to 256 rows
# and tied it at 512 (benchmarks/gemv_paths.py --gemm). On AMX 16-bit weights go to gemv up to 32 rows, in passes of 8,
# and its bf16 tiles take more. On AVX2 gemv takes them up to 16 rows and half_gemm past that: on Zen 3, with the rows
# past 8 in one pass over the weights, gemv was 1.4x faster than half_gemm at 9-16 rows, 1.1x at 24 and 0.9x at 32
# (benchmarks/gemv_paths.py --dtype bf16 --gemm --rows 9,12,16,24,32; in cache, at the demo's LM head, they tied at
# 9-16 rows and half_gemm was 1.1-1.2x faster at 24-32). float32 weights keep PyTorch's GEMM past MAX_ROWS everywhere:
# gemv was 1.2-1.8x faster up to 64 rows, but moving a float32 model's short prompts off the GEMM changes their float32
# rounding, which the tensor-parallel exactness tests bound at 1e-5 (docs/cpu-kernels.md). The fused decode step runs
# its float projections on gemv at every batch size.
GEMV_ROWS = {"avx512": (256, MAX_ROWS), "amx": (32, MAX_ROWS), "avx2": (16, MAX_ROWS)}  # (16-bit, float32)


def gemv_rows(dtype: torch.dtype) -> int:
    """The most input rows that linear() runs on gemv for float weights of `dtype`; see GEMV_ROWS. Follows
    HEARTHLM_ISA, as quant_gemv_rows does."""
    half, full = GEMV_ROWS["avx512" if _wide_gemv() else "amx" if isa() == "amx" else "avx2"]
    return half if dtype in (torch.float16, torch.bfloat16) else full


# The most rows a speculative verify step fills (Engine._fit_rows trims drafts to it). On the AVX-512 path the GEMVs
# take a batch in one pass over the weights, and 16 rows beat 8 at batch 4 on the demo model with its drafter
# (benchmarks/speculative.py --task heldout, speed over plain decoding: 0.88-0.99x with 16 rows against 0.85-0.94x
# with 8; an always-right drafter at the drafter's cost 1.28-1.44x against 1.05-1.15x); elsewhere one 8-row pass is
# the cheap step.
VERIFY_ROWS_WIDE = 16


def verify_rows() -> int:
    """The most rows (decode rows plus draft tokens) one speculative verify step runs on CPU; see VERIFY_ROWS_WIDE.
    Follows the GEMVs' path (set_gemv_isa)."""
    return VERIFY_ROWS_WIDE if _avx512_gemv else MAX_ROWS


@functools.cache
def _load_avx512():
    return _build("hearthlm_avx512", SOURCES_AVX512, "avx512")


def available() -> bool:
    return _load() is not None


def native_bf16() -> bool:
    """Whether PyTorch's bfloat16 GEMM (oneDNN) runs on bfloat16 instructions here (AVX512-BF16 or AMX), which
    makes it several times faster than float32; without them it emulates bfloat16 and is slower. Off when
    HEARTHLM_ISA caps the kernels below avx512."""
    return _at_least("avx512") and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def amx_bf16() -> bool:
    """Whether bf16_gemm runs on AMX-BF16 here (isa() "amx")."""
    return avx512_gemm_available() and _amx()


def bf16_gemm_path() -> str | None:
    """Where bf16_gemm runs under the current HEARTHLM_ISA cap: "amx" (AMX-BF16, isa() "amx"), "avx512_bf16"
    (VDPBF16PS: isa() "avx512", or "amx" capped to it, on a CPU with AVX512-BF16), or None (not here)."""
    if not avx512_gemm_available():
        return None
    if _amx():
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in cpu_flags() and _load_avx512().avx512_bf16_available() else None


def bf16_gemm_available() -> bool:
    """Whether bf16_gemm runs here (on AMX-BF16 or AVX512-BF16; see bf16_gemm_path)."""
    return bf16_gemm_path() is not None


def gemm_path() -> str | None:
    """Where the integer GEMM (quant_gemm) runs under the HEARTHLM_ISA cap: "amx" (the tile unit), "avx512" (VNNI),
    "avx2" (gemm_avx2.cpp, the AVX2 extension's own), or None (no kernels: quant_linear keeps PyTorch's float
    tiles)."""
    if avx512_gemm_available():
        return "amx" if _amx() else "avx512"
    return "avx2" if _avx2_kernels() else None


def gemm_available() -> bool:
    """Whether the integer GEMM (quant_gemm) runs here: on AMX, AVX-512 VNNI or AVX2 (see gemm_path)."""
    return gemm_path() is not None


def avx512_gemm_available() -> bool:
    """Whether the AVX-512 extension (the VNNI and AMX GEMMs, bf16_gemm) loads here under the HEARTHLM_ISA cap."""
    return _at_least("avx512") and available() and _load_avx512() is not None


def _avx2_kernels() -> bool:
    """Whether the AVX2 extension's prefill GEMMs (gemm_avx2.cpp, gemm_half_avx2.cpp) run under the HEARTHLM_ISA cap:
    the AVX2 path or wider, with the kernels built."""
    return _at_least("avx2") and available()


def _at_least(path: str) -> bool:
    return ISAS.index(isa()) <= ISAS.index(path)


def _amx() -> bool:
    return isa() == "amx" and _load_avx512().amx_available()


def bf16_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias for a contiguous bfloat16 weight [N, K] (K a multiple of 32) -> float32
    [..., N], the float32 path's numbers (x kept to 16 bits, float32 sums): on the AMX tile unit where isa() is
    "amx", else with AVX512-BF16 dot products. Call it only where bf16_gemm_available()."""
    return _load_avx512().bf16_gemm(x, weight, bias, _amx())


def half_gemm_available() -> bool:
    """Whether half_gemm runs here under the HEARTHLM_ISA cap (see _avx2_kernels)."""
    return _avx2_kernels()


def half_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias for a contiguous bfloat16 or float16 weight [N, K] (K a multiple of 8) ->
    float32 [..., N]: x and the sums in float32 (the float32 path's numbers), the weight converted a panel at a time
    as it is packed (kernels/gemm_half_avx2.cpp), not whole per call. Prefill's GEMM for 16-bit weights where
    bf16_gemm does not run."""
    return _load().half_gemm(x, weight, bias)


def quant_gemm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bits: int,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """quant_gemv's product for any number of rows, as an integer GEMM on the widest of AMX, AVX-512 VNNI and AVX2
    that runs here (gemm_path): x [..., K], the QuantTensor parts of W [N, K], bias or None -> x @ W.T + bias,
    float32 [..., N]. x is rounded to int8 per block of 32 as in quant_gemv, so both agree with the dequantized
    product to the same bound. Call it only where gemm_available()."""
    if avx512_gemm_available():
        return _load_avx512().quant_gemm(x, qdata, scales, mins, bits, group, bias, _amx())
    return _load().quant_gemm(x, qdata, scales, mins, bits, group, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (any float dtype), weight [N, K] contiguous, bias float32 [N] or None -> x @ weight.T + bias,
    float32 [..., N]. On the AVX-512 path any number of rows run in one pass over the weights, and a row's result is
    the same bits alone and in any batch; on AVX2 more than MAX_ROWS rows run as even slices of at most MAX_ROWS, also in
    one pass over the weights, each slice with the bits of a call of its own."""
    return _load().gemv(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """float32 x [..., D] -> RMSNorm(x) * weight (float32 weight or None)."""
    return _load().rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float32 x [B, T, H, D], cos/sin [B, T, 1, D] -> rotate-half RoPE of x."""
    return _load().rope(x, cos, sin)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q [B, Hq, D] float32; k, v [B, Hkv, S, D] in the cache dtype; mask [B, S] bool -> [B, Hq, D]."""
    return _load().decode_attention(q, k, v, mask, scale)


def paged_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q [B, Hq, D] float32; k, v [Hkv, slots, D] contiguous; row b's keys at slots [B, S] int64; mask [B, S]
    bool -> [B, Hq, D]: decode attention over a paged cache, read in place."""
    return _load().paged_decode_attention(q, k, v, slots, mask, scale)


def kv_store(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k_cache[h, slots[i]] = k[i, h] (and v): caches [Hkv, slots, D] contiguous, k/v float32 [n, Hkv, D]."""
    _load().kv_store(k_cache, v_cache, slots, k, v)


def act_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """float32 [..., 2I] = [gate | up] -> act(gate) * up [..., I]; act 'silu' or 'gelu_tanh'."""
    return _load().act_mul(x, act)


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Contiguous float32 x -> x = cap * tanh(x / cap) in place (cap > 0); returns x."""
    return _load().softcap_(x, cap)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 x [..., V] -> int64 [...]: each row's first largest index, NaN counting as largest
    (torch.argmax's answer)."""
    return _load().argmax_rows(x)


def quant_gemv(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bits: int,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (any float dtype), the QuantTensor parts of a 2-D weight W [N, K] (contiguous), bias float32 [N]
    or None -> x @ W.T + bias, float32 [..., N]. On the AVX-512 VNNI path 8-bit weights take any number of rows in
    one pass over the weights; otherwise more than MAX_ROWS rows run as even slices of at most MAX_ROWS (on AVX2 in one
    pass over the weights, each slice with the bits of a call of its own). Either way
    a row's result does not depend on the rows beside it (bit for bit on VNNI).

    x is rounded to int8 per block of 32 elements inside (one scale per block, as llama.cpp's Q8_0), so the
    result is W . x^ where each element of x^ is off by at most 1/254 of its block's largest |x|.
    """
    return _load().quant_gemv(x, qdata, scales, mins, bits, group, bias)


def gemv_isa() -> str:
    """The instructions the GEMVs (gemv, quant_gemv, and the fused decoder layer's projections) run on now:
    "avx512" (AVX-512 with VNNI, chosen at load where isa() is "avx512" or wider) or "avx2"."""
    return _load().gemv_isa()


def gemv_paths() -> list[str]:
    """The GEMV paths that may run here under the HEARTHLM_ISA cap, widest first (tests check each)."""
    return ["avx512", "avx2"] if _at_least("avx512") else ["avx2"]


def set_gemv_isa(path: str) -> None:
    """Switch the GEMVs (process-wide, DecodeLinear included) to one of gemv_paths(): a test hook."""
    if path not in gemv_paths():
        raise ValueError(f"GEMV path {path!r} does not run here; use one of {gemv_paths()}")
    _set_gemv_path(_load(), path)


def dequant_rows(
    qdata: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bits: int,
    group: int,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Rows `rows` (int64, any shape, values in [0, N)) of the 2-D quantized weight W [N, K] -> float32
    [*rows.shape, K], bit for bit `quant.tensor.dequantize(...)[rows]` (embedding lookups, prefill tiles)."""
    if rows.dim() == 1:
        return _load().dequant_rows(qdata, scales, mins, bits, group, rows)
    out = _load().dequant_rows(qdata, scales, mins, bits, group, rows.reshape(-1))
    return out.view(*rows.shape, out.shape[-1])


def decode_linear(
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    mins: torch.Tensor | None = None,
    bits: int = 0,
    group: int = 0,
    bias: torch.Tensor | None = None,
):
    """One weight as decoder_layer takes it: float [N, K] (bits 0), or the QuantTensor parts of a quantized one
    (weight = qdata); bias float32 [N] or None. Holds references, not copies."""
    return _load().DecodeLinear(weight, scales, mins, bits, group, bias)


def decode_linear_concat(parts: list, bias: torch.Tensor | None = None):
    """decode_linear parts of different formats stacked along the output rows (a RowConcat); bias float32."""
    return _load().DecodeLinear(parts, bias)


def decoder_layer(**parts):
    """A decoder layer's weights by role (keyword arguments: kernels/decoder_cpu.h lists them; norms float32,
    projections from decode_linear) -> an object whose `decode(x, cos, sin, K, V, write, read_slots, read_start,
    S, mask, ple)` runs one decode step: x [B, 1, hidden] float32 -> the layer's output."""
    return _load().DecoderLayer(**parts)


if os.environ.get("HEARTHLM_THREADS"):
    set_threads()  # the user's choice holds for the Python API as for the CLI
