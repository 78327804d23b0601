"""Decode and prefill speed of hearthlm against transformers, on random-weight checkpoints with the
real shapes of Llama-3.2-1B, Qwen2.5-0.5B and Gemma 4 E2B, next to the memory-bandwidth roofline of this machine.

    python benchmarks/decode.py [--models llama3.2-1b,qwen2.5-0.5b,gemma4-e2b-like] [--dtypes float32,bfloat16,float16]
                                [--tf-dtypes float32,bfloat16] [--formats int8,int4,int4-g128]
                                [--gguf Q4_0,Q8_0] [--runs 3] [--new-tokens 64]
                                [--prompt-len 512] [--layers N]

--formats adds hearthlm rows quantized at load from the bfloat16 checkpoint. --gguf writes the checkpoint
as GGUF files of those types (llama.cpp's layout, with the `gguf` package's quantizers; the LM head, here
the tied embedding, takes the type llama-quantize gives it: Q8_0 in a Q4_0 file at Qwen2.5-0.5B's width) and runs hearthlm on each file and, when llama-cpp-python is installed,
llama.cpp on the same file (2 threads, the machine's cores), so both engines read the same bytes.

Checkpoints are written once (bfloat16 safetensors shards plus config.json, made from transformers'
own model classes) under --cache-dir and reused. Every engine/dtype is measured once per round and
the rounds alternate the order, so all rows see the same machine conditions; figures are medians.

- decode tok/s: batch 1, greedy, after a 16-token prompt; the time between the first and the last
  generated token, so prefill is not in it.
- prefill tok/s: prompt length / time to the first token. transformers gets logits_to_keep=1 as
  generate() gives it, with which Gemma 4 runs its KV-shared layers on the last prompt position only.
- roofline: decode at batch 1 reads every weight once per token, so read bandwidth / weight bytes
  per token bounds tokens/s from above. The bandwidth is sampled just before and after each decode
  run, because on a shared VM it drifts by a third within minutes.
- vs llama.cpp: the ratio of the two rows' medians, and for decode also the median of the per-round ratios
  (both engines run seconds apart within a round, so the machine's drift cancels out of each one).
- other processes: their CPU share is tracked during each run; a run they disturbed (> 10%) is
  measured again and left out of the medians when an undisturbed run of the same row exists.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

from hearthlm import LLM, SamplingParams

try:
    from membw import measure as measure_bandwidth
    from membw import read as read_bandwidth
except ImportError:  # run as `python -m benchmarks.decode`
    from benchmarks.membw import measure as measure_bandwidth
    from benchmarks.membw import read as read_bandwidth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")
GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Bits per weight as the engine holds it: ours after repacking (quant/ggml.py), llama.cpp's as stored.
GGUF_BITS = {"F16": 16, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5, "Q5_0": 5.5, "Q5_1": 6, "Q4_K": 5, "Q5_K": 6, "Q6_K": 7}
GGUF_BITS_LLAMA_CPP = {
    "F16": 16,
    "Q8_0": 8.5,
    "Q4_0": 4.5,
    "Q4_1": 5,
    "Q5_0": 5.5,
    "Q5_1": 6,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
}
RECIPE_VERSION = 2  # part of the cache folder name: bump when a recipe changes so stale folders are rebuilt
SHARD_BYTES = 2 * 2**30  # small shards keep the peak memory of building near one shard
INDEX = "model.safetensors.index.json"
DONE = "benchmark-checkpoint-complete"  # written last: a half-written folder is never reused
DECODE_PROMPT_LEN = 16
FOREIGN_CPU_WARN = 0.1  # other processes' CPU share above which a run is flagged as disturbed
MEMORY_MARGIN = 5 * 2**29  # Python, torch, KV caches, activations and loader transients
RESULTS = Path(__file__).resolve().parent / "results"


# -- model recipes --------------------------------------------------------------------------------


def qwen25_05b(layers: int | None) -> transformers.PretrainedConfig:
    """Qwen2.5-0.5B as published (24 layers, tied embeddings, qkv bias)."""
    n = layers or 24
    return transformers.Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=n,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        use_sliding_window=False,
        sliding_window=32_768,
        max_window_layers=min(21, n),
        bos_token_id=151_643,
        eos_token_id=151_643,
    )


def gemma4_e2b_like(layers: int | None) -> transformers.PretrainedConfig:
    """Gemma 4 E2B's text model: 4 sliding : 1 full layers, the last 20 of 35 layers reuse earlier
    K/V (with a double-wide MLP), per-layer embeddings. With fewer layers the shared fraction is
    kept, but at least the first 5 layers (one full, four sliding) own their K/V, as sharing needs
    an earlier producer of each layer type."""
    n = layers or 35
    types = ["full_attention" if (i + 1) % 5 == 0 or i == n - 1 else "sliding_attention" for i in range(n)]
    shared = max(0, min(round(n * 20 / 35), n - 5))
    return transformers.Gemma4TextConfig(
        vocab_size=262_144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=n,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        sliding_window=512,
        layer_types=types,
        num_kv_shared_layers=shared,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        max_position_embeddings=131_072,
    )


def llama32_1b(layers: int | None) -> transformers.PretrainedConfig:
    """Llama-3.2-1B as published (16 layers, GQA 32:8, tied embeddings, llama3 RoPE scaling)."""
    return transformers.LlamaConfig(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers or 16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131_072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128_000,
        eos_token_id=128_001,
    )


# name -> (config recipe, transformers model class)
MODELS: dict[str, tuple[Callable[[int | None], transformers.PretrainedConfig], str]] = {
    "llama3.2-1b": (llama32_1b, "LlamaForCausalLM"),
    "qwen2.5-0.5b": (qwen25_05b, "Qwen2ForCausalLM"),
    "gemma4-e2b-like": (gemma4_e2b_like, "Gemma4ForCausalLM"),
}


# -- checkpoints ----------------------------------------------------------------------------------


def meta_shapes(config: transformers.PretrainedConfig, cls_name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of this config holds, from the model built on the
    meta device (no memory, no slow init). A tied LM head is not stored, as save_pretrained does."""
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Matrices and biases ~ N(0, 0.02) as transformers initializes them; vectors (norm weights, layer
    scalars) ~ 1 + N(0, 0.02), so activations keep a sane scale through every layer."""
    if len(shape) >= 2 or name.endswith(".bias"):
        # drawn in bfloat16 directly: a float32 draw of the 4.7 GB PLE table would need 14 GB at peak
        return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
    return (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def shard_groups(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_checkpoint(config: transformers.PretrainedConfig, cls_name: str, folder: Path) -> None:
    shapes = meta_shapes(config, cls_name)
    groups = shard_groups(shapes)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], gen) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors  # one shard in memory at a time
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    config.dtype = torch.bfloat16
    config.architectures = [cls_name]
    config.save_pretrained(folder)
    hub_style_config(folder / "config.json")


def hub_style_config(path: Path) -> None:
    """Write Gemma 4's full-attention head shape as the published config.json files state it
    (global_head_dim, num_global_key_value_heads) instead of the per_layer_config that transformers 5
    serializes, so the benchmark reads the same config dialect as a real downloaded checkpoint."""
    cfg = json.loads(path.read_text())
    per_layer = cfg.pop("per_layer_config", None)
    if not per_layer:
        return
    full = next(iter(per_layer.values()))
    cfg["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        cfg["num_global_key_value_heads"] = full["num_key_value_heads"]
    path.write_text(json.dumps(cfg, indent=2))


def ensure_checkpoint(name: str, layers: int | None, cache: Path) -> tuple[Path, float]:
    """-> (checkpoint folder, seconds spent building it; 0 when reused from the cache)."""
    recipe, cls_name = MODELS[name]
    config = recipe(layers)
    folder = cache / f"{name}-L{config.num_hidden_layers}-v{RECIPE_VERSION}"
    if (folder / DONE).exists():
        return folder, 0.0
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_checkpoint(config, cls_name, folder)
    (folder / DONE).write_text(datetime.now().isoformat())
    return folder, time.perf_counter() - start


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


# -- weight bytes: the roofline and the memory budget ---------------------------------------------


@dataclass
class WeightBytes:
    per_token: int  # weight bytes read from memory for one decoded token
    resident: int  # bytes the loaded engine holds


def format_bits(engine: str, fmt: str, name: str, shape: tuple[int, ...]) -> float:
    """Bits per weight of one tensor in a row's format (hearthlm quantizes embeddings and the LM head to int8
    per row under --formats; a GGUF file stores every matrix in its type but the head, as head_type says)."""
    if fmt in DTYPES:
        return torch.finfo(DTYPES[fmt]).bits
    if len(shape) < 2:
        return 32
    if fmt.startswith("gguf-"):
        qtype = fmt[5:]
        if "embed_tokens" in name or "lm_head" in name:  # the head's type, as gguf_file writes it
            qtype = head_type(qtype, shape[-1])
        return (GGUF_BITS_LLAMA_CPP if engine == "llama.cpp" else GGUF_BITS)[qtype]
    if "embed_tokens" in name or "lm_head" in name or fmt == "int8":
        return 8 + 16 / shape[-1]
    group = int(fmt.split("-g")[1]) if "-g" in fmt else 32
    return 4 + 32 / group


def weight_bytes(shapes: dict[str, tuple[int, ...]], tied: bool, engine: str, fmt: str) -> WeightBytes:
    """Every linear weight is read once per token; the token embedding is a one-row gather, but when
    tied it is also the LM head, read in full. Gemma 4's PLE table is a gather too (one row of
    layers * 256 per token); hearthlm keeps it memory-mapped in the stored bfloat16, so it is not
    resident. The KV cache is left out: the decode prompt is short."""
    per_token = resident = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        size = format_bits(engine, fmt, name, shape) / 8
        if name.endswith("embed_tokens_per_layer.weight"):
            row_size = 2 if engine == "hearthlm" and not fmt.startswith("gguf-") else size
            per_token += shape[-1] * row_size
            resident += 0 if engine == "hearthlm" and not fmt.startswith("gguf-") else n * size
        elif name.endswith("embed_tokens.weight"):
            per_token += n * size if tied else shape[-1] * size
            resident += n * size
        else:
            per_token += n * size
            resident += n * size
    return WeightBytes(int(per_token), int(resident))


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- other processes' load ------------------------------------------------------------------------


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq; not idle,
    iowait or steal)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@contextmanager
def foreign_load(out: list[float]) -> Iterator[None]:
    """Append the share of the machine's CPU that other processes used while the block ran: on a
    shared 2-core machine a test run beside the benchmark can cut its speed several times over."""
    busy, own, start = _machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    yield
    wall = time.perf_counter() - start
    others = (_machine_busy_seconds() - busy) - (sum(os.times()[:2]) - own)
    out.append(max(0.0, others / (wall * (os.cpu_count() or 1))))


def wait_for_quiet(max_wait: float) -> float:
    """Sleep in 2 s steps until other processes leave the CPU idle (or max_wait passes); -> seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        load: list[float] = []
        with foreign_load(load):
            time.sleep(2.0)
        if load[0] <= FOREIGN_CPU_WARN:
            break
    return time.perf_counter() - start


# -- engines --------------------------------------------------------------------------------------


class Engine(Protocol):
    def prefill(self, ids: list[int]) -> float:
        """Seconds from the call to the first generated token."""

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        """Generate n greedy tokens -> (tokens/s over tokens 2..n, the tokens)."""


class HearthEngine:
    def __init__(self, folder: Path, fmt: str):
        if fmt in DTYPES:
            self.llm = LLM(folder, dtype=DTYPES[fmt])
        elif fmt.startswith("gguf-"):
            self.llm = LLM(gguf_file(folder, fmt[5:]))
        else:
            self.llm = LLM(folder, quant=fmt)
        self.llm.engine(prefix_caching=False)  # the runs repeat one prompt: every prefill must be cold

    @staticmethod
    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self.llm.generate([ids], self.params(1))
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        # on_token runs as each token is produced: stamps[0] is after prefill, the rest one per step
        stamps: list[float] = []
        stamp = lambda i, t: stamps.append(time.perf_counter())  # noqa: E731
        out = self.llm.generate([ids], self.params(n), on_token=stamp)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out[0].token_ids


class TransformersEngine:
    def __init__(self, folder: Path, fmt: str):
        auto = transformers.AutoModelForCausalLM
        self.device = torch.device(os.environ.get("HEARTHLM_DEVICE") or "cpu")  # the device hearthlm runs on too
        model = auto.from_pretrained(folder, dtype=DTYPES[fmt], attn_implementation="sdpa")
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def _step(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        # logits_to_keep=1 as generate() passes it: the LM head runs on the last position only (and
        # Gemma 4 runs its KV-shared layers on the last prompt position only)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        int(self._step(torch.tensor([ids], device=self.device), None)[0])  # int(): waits for a GPU to finish
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        # a manual cached loop rather than generate(): no logits processors or stopping checks in the time
        token, cache = self._step(torch.tensor([ids], device=self.device), None)
        tokens, stamps = [int(token)], [time.perf_counter()]
        for _ in range(n - 1):
            token, cache = self._step(token, cache)
            tokens.append(int(token))
            stamps.append(time.perf_counter())
        return (n - 1) / (stamps[-1] - stamps[0]), tokens


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on the GGUF file hearthlm reads too; greedy by argmax of the logits."""

    def __init__(self, folder: Path, fmt: str):
        import llama_cpp

        self.np = __import__("numpy")
        path = gguf_file(folder, fmt[5:])
        safe = extra_buffers_work(path)
        if not safe:
            print(f"llama.cpp crashed on {path.name} with its AMX weight buffers: running it without them")
        with nullcontext() if safe else llama_cpp_without_amx(path):
            self.llm = llama_cpp.Llama(
                str(path), n_ctx=2048, n_batch=512, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
                verbose=False,
            )  # fmt: skip

    def _next(self) -> int:
        # The last position's logits, from the context: llama-cpp-python fills `scores` only with logits_all=True
        # (which would compute the logits of every prompt position), and reading it otherwise gives zeros.
        import llama_cpp

        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).argmax())

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        self._next()
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(ids)
        tokens, stamps = [self._next()], [time.perf_counter()]
        for _ in range(n - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self._next())
            stamps.append(time.perf_counter())
        return (n - 1) / (stamps[-1] - stamps[0]), tokens


@functools.cache
def extra_buffers_work(path: Path) -> bool:
    """Whether llama.cpp survives a 512-token prefill of `path` with its default weight buffers (AMX where the CPU
    has it, repacked layouts), tried in a child process: the llama-cpp-python 0.3.36 build here segfaults on Q8_0,
    Q4_0 and Q4_K files with its AMX buffers. Where it crashes, llama.cpp runs as on an AVX-512 CPU without AMX."""
    probe = (
        "import llama_cpp, sys\n"
        "llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, n_batch=512, n_threads=2, verbose=False)\n"
        "llm.eval(list(range(100, 612)))\n"
    )
    return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True).returncode == 0


REPACKED = {2: "Q4_0", 12: "Q4_K"}  # GGML types llama.cpp's CPU_REPACK buffer takes on x86 (AVX2 and wider)


@contextmanager
def llama_cpp_without_amx(path: Path) -> Iterator[None]:
    """llama.cpp models loaded inside get the weight buffers llama.cpp picks on an AVX-512 CPU without AMX. On CPUs
    that report AMX it repacks the weights for AMX by default, and that crashes it in the first llama_decode on the
    Xeon VMs here (Q4_0 and Q8_0 files alike). llama-cpp-python cannot leave out one extra buffer type, so all are
    switched off and the GGUF file's matrices that llama.cpp would repack for AVX2/AVX-512 (_repacked) are placed
    in its CPU_REPACK buffer by name (tensor_buft_overrides)."""
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as lib

    from hearthlm.weights.gguf import GGUFFile

    class Override(ctypes.Structure):  # llama_model_tensor_buft_override
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    repack = _extra_buffer_types(Path(llama_cpp.__file__).parent / "lib").get("CPU_REPACK")
    names = [t.name for t in GGUFFile(path).tensors.values() if _repacked(t)]
    pattern = ("^(" + "|".join(re.escape(n) for n in names) + ")$").encode()
    table = (Override * 2)(Override(pattern, repack), Override(None, None))
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        if names and repack:
            p.tensor_buft_overrides = ctypes.cast(table, ctypes.c_void_p)
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def _repacked(t) -> bool:
    """Whether llama.cpp repacks this GGUF tensor for AVX2/AVX-512: a layer's matrix (not the token embedding, which
    it reads by rows) of a type it repacks, with rows a multiple of 8."""
    return t.name.startswith("blk.") and t.ggml_type in REPACKED and len(t.shape) == 2 and t.shape[0] % 8 == 0


def _extra_buffer_types(libs: Path) -> dict[str, int]:
    """{name: ggml_backend_buffer_type_t} of the CPU backend's extra buffer types (AMX, CPU_REPACK, ...)."""
    import ctypes

    import llama_cpp.llama_cpp as lib

    ggml, base, vp = ctypes.CDLL(str(libs / "libggml.so")), ctypes.CDLL(str(libs / "libggml-base.so")), ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.restype, ggml.ggml_backend_dev_by_type.argtypes = vp, [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype, base.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    base.ggml_backend_reg_get_proc_address.restype = vp
    base.ggml_backend_reg_get_proc_address.argtypes = [vp, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype, base.ggml_backend_buft_name.argtypes = ctypes.c_char_p, [vp]
    lib.llama_backend_init()
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    get = base.ggml_backend_reg_get_proc_address(
        base.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts"
    )
    if not get:
        return {}
    types = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(get)(dev)  # NULL-terminated
    out, i = {}, 0
    while types[i]:
        out[base.ggml_backend_buft_name(types[i]).decode()] = types[i]
        i += 1
    return out


LOADERS: dict[str, Callable[[Path, str], Engine]] = {
    "hearthlm": HearthEngine,
    "transformers": TransformersEngine,
    "llama.cpp": LlamaCppEngine,
}


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def head_type(qtype: str, hidden: int) -> str:
    """The LM head's type in a `qtype` file as llama-quantize makes it (src/llama-quant.cpp): the output tensor,
    or the token embedding where it is tied, gets Q6_K unless the file is Q8_0 or float, and Q8_0 where rows are
    not whole 256-blocks (Qwen2.5-0.5B's 896). The files users download have this head, not a `qtype` one."""
    if qtype in ("F32", "F16", "BF16", "Q8_0"):
        return qtype
    return "Q6_K" if hidden % 256 == 0 else "Q8_0"


def gguf_file(folder: Path, qtype: str) -> Path:
    """The checkpoint as a GGUF file of `qtype` with llama-quantize's head type, written once beside it
    (tests/gguf_files.py's layout)."""
    cfg = json.loads((folder / "config.json").read_text())
    path = folder / f"model-{qtype}-head-{head_type(qtype, cfg['hidden_size'])}.gguf"
    if path.exists():
        return path
    import gguf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_files import demo_vocab, gemma4_vocab, write_gguf

    recipes = {
        "llama": ("LlamaForCausalLM", demo_vocab),
        "qwen2": ("Qwen2ForCausalLM", demo_vocab),
        "gemma4_text": ("Gemma4ForCausalLM", lambda n: gemma4_vocab(n, learnt=150)),
    }
    if cfg.get("model_type") not in recipes:
        raise ValueError(f"GGUF rows are written for {sorted(recipes)} only")
    arch, vocab = recipes[cfg["model_type"]]

    def tensors():
        for file in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values())):
            with safe_open(str(folder / file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).float().numpy()

    part = Path(str(path) + ".part")
    write_gguf(
        part,
        arch,
        cfg,
        tensors(),
        getattr(gguf.GGMLQuantizationType, qtype),
        vocab(cfg["vocab_size"]),
        head_qtype=getattr(gguf.GGMLQuantizationType, head_type(qtype, cfg["hidden_size"])),
    )
    part.rename(path)
    return path


class Pool:
    """Loaded engines, least recently used first. Loading one evicts others until the estimated
    resident bytes fit the budget: a big model's rows then reload each round instead of swapping."""

    def __init__(self, budget: int):
        self.budget = budget
        self.loaded: OrderedDict[tuple[str, str], tuple[Engine, int]] = OrderedDict()

    def get(self, key: tuple[str, str], resident: int, load: Callable[[], Engine]) -> tuple[Engine, float]:
        """-> (engine, seconds spent loading it; 0 when it was loaded already)."""
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key][0], 0.0
        if resident > self.budget:
            raise MemoryError(f"needs ~{resident / 1e9:.1f} GB, over the {self.budget / 1e9:.1f} GB budget")
        while self.loaded and sum(r for _, r in self.loaded.values()) + resident > self.budget:
            self.loaded.popitem(last=False)
            release_memory()
        start = time.perf_counter()
        engine = load()
        self.loaded[key] = (engine, resident)
        return engine, time.perf_counter() - start

    def clear(self) -> None:
        self.loaded.clear()
        release_memory()


def release_memory() -> None:
    """Free dropped engines now and hand glibc's freed heap back to the system, so that the next
    model's budget is not eaten by the last one's leftovers."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class RunSample:
    decode: float  # tokens/s over generated tokens 2..N
    prefill: float  # prompt tokens/s to the first token
    bandwidth: float  # read GB/s sampled just before and just after the decode
    foreign_cpu: float  # the largest share of the CPU other processes used during prefill or decode
    round: int = 0  # which round of --runs it belongs to (rows alternate within a round)

    @property
    def disturbed(self) -> bool:
        return self.foreign_cpu > FOREIGN_CPU_WARN


@dataclass
class Row:
    model: str
    engine: str
    dtype: str
    bytes_per_token: int
    resident_bytes: int
    runs: list[RunSample] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the last decode run
    error: str | None = None

    def used(self) -> list[RunSample]:
        """The runs the figures come from: the undisturbed ones, or all when every run was disturbed."""
        return [r for r in self.runs if not r.disturbed] or self.runs

    def median(self, key: str) -> float:
        return median([getattr(r, key) for r in self.used()])


@dataclass
class ModelRun:
    name: str
    folder: str
    layers: int
    build_s: float
    bench_s: float = 0.0
    rows: list[Row] = field(default_factory=list)
    read_gb_s: list[float] = field(default_factory=list)  # 1 GiB samples before and after the rows
    copy_gb_s: list[float] = field(default_factory=list)

    def sample_bandwidth(self) -> None:
        if on_gpu():
            self.read_gb_s += [gpu_bandwidth() for _ in range(3)]
            return
        bw = measure_bandwidth(reps=5)
        self.read_gb_s += bw["read"].samples
        self.copy_gb_s += bw["copy"].samples


@dataclass
class Bench:
    """What every measurement of one model shares."""

    folder: Path
    pool: Pool
    args: argparse.Namespace
    progress: Progress
    decode_ids: list[int]
    prefill_ids: list[int]

    def log(self, message: str) -> None:
        self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)


def make_rows(name: str, folder: Path, args: argparse.Namespace) -> list[Row]:
    """One row per engine and dtype, ordered by dtype with the engines alternating."""
    shapes = stored_shapes(folder)
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    wanted = [(engine, dtype) for dtype in DTYPES for engine, dtypes in
              (("hearthlm", args.dtypes), ("transformers", args.tf_dtypes)) if dtype in dtypes]  # fmt: skip
    wanted += [("hearthlm", f) for f in args.formats]
    for qtype in args.gguf:
        wanted.append(("hearthlm", f"gguf-{qtype}"))
        if llama_cpp_installed():
            wanted.append(("llama.cpp", f"gguf-{qtype}"))
    rows = []
    for engine, fmt_ in wanted:
        wb = weight_bytes(shapes, tied, engine, fmt_)
        rows.append(Row(name, engine, fmt_, wb.per_token, wb.resident))
    return rows


def prompts(folder: Path, prompt_len: int) -> tuple[list[int], list[int]]:
    """(decode prompt, prefill prompt): fixed random ids, the same for every engine."""
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (DECODE_PROMPT_LEN + prompt_len,), generator=gen).tolist()
    return ids[:DECODE_PROMPT_LEN], ids[DECODE_PROMPT_LEN:]


@contextmanager
def paused(progress: Progress) -> Iterator[None]:
    """hearthlm's loader draws its own rich progress bar; two live displays cannot share a terminal."""
    progress.stop()
    try:
        yield
    finally:
        progress.start()


def on_gpu() -> bool:
    return (os.environ.get("HEARTHLM_DEVICE") or "cpu").startswith("cuda")


def gpu_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """The GPU's memory bandwidth in GB/s from a device-to-device copy, counting bytes read and written (a
    stream that only reads moves about as much): the roofline of a decode step that reads every weight once."""
    n = int(gib * 2**30) // 2
    src, dst = torch.empty(n, dtype=torch.bfloat16, device="cuda"), torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 4 * n / statistics.median(times) / 1e9


def load_engine(row: Row, bench: Bench) -> Engine:
    def load() -> Engine:
        engine = LOADERS[row.engine](bench.folder, row.dtype)
        engine.decode(bench.decode_ids[:8], 4)  # first calls pay one-time kernel and allocator setup
        if on_gpu():  # and a GPU's: its clocks ramp up, and each new shape picks its kernels on first use
            engine.prefill(bench.prefill_ids)
            engine.decode(bench.decode_ids, bench.args.new_tokens)
        return engine

    with paused(bench.progress):
        engine, load_s = bench.pool.get((row.engine, row.dtype), row.resident_bytes, load)
    if load_s:
        row.load_s.append(load_s)
        bench.log(f"loaded {row.engine} {row.dtype} in {load_s:.1f} s")
    return engine


def measure_once(row: Row, bench: Bench) -> RunSample:
    engine = load_engine(row, bench)
    waited = wait_for_quiet(bench.args.quiet_wait)
    if waited > 2.5:
        bench.log(f"waited {waited:.0f} s for other processes to leave the CPU")
    load: list[float] = []
    with foreign_load(load):
        prefill = len(bench.prefill_ids) / engine.prefill(bench.prefill_ids)
    # This VM's bandwidth drifts by a third within minutes (its neighbours' load), so each decode
    # run gets its own roofline from quick samples taken just before and just after it.
    before = gpu_bandwidth() if on_gpu() else read_bandwidth(gib=0.5, reps=3).median
    with foreign_load(load):
        decode, row.tokens = engine.decode(bench.decode_ids, bench.args.new_tokens)
    bandwidth = (before + (gpu_bandwidth() if on_gpu() else read_bandwidth(gib=0.5, reps=3).median)) / 2
    return RunSample(decode, prefill, bandwidth, max(load))


def measure_run(row: Row, bench: Bench, label: str, round_: int) -> None:
    """One run of a row; measured again (up to --retries times) when other processes disturbed it."""
    for attempt in range(1 + bench.args.retries):
        try:
            sample = measure_once(row, bench)
            sample.round = round_
        except Exception as e:  # one failing engine/dtype must not end the benchmark
            row.error = f"{type(e).__name__}: {e}"
            bench.log(f"{label}: FAILED\n{traceback.format_exc()}")
            return
        row.runs.append(sample)
        note = " (disturbed" + (", measuring again)" if attempt < bench.args.retries else ")")
        bench.log(
            f"{label}: decode {sample.decode:.2f} tok/s, prefill {sample.prefill:.1f} tok/s, read bandwidth "
            f"{sample.bandwidth:.1f} GB/s, other processes {100 * sample.foreign_cpu:.0f}% CPU"
            + (note if sample.disturbed else "")
        )
        if not sample.disturbed:
            return


def run_model(name: str, args: argparse.Namespace, progress: Progress, budget: int) -> ModelRun:
    task = progress.add_task(f"{name}: building checkpoint", total=None)
    folder, build_s = ensure_checkpoint(name, args.layers, args.cache_dir)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    result = ModelRun(name, str(folder), layers, build_s)
    result.rows = rows = make_rows(name, folder, args)
    progress.update(task, description=f"{name}: memory bandwidth", refresh=True)
    result.sample_bandwidth()
    bench = Bench(folder, Pool(budget), args, progress, *prompts(folder, args.prompt_len))
    progress.update(task, total=args.runs * len(rows), completed=0, refresh=True)
    start = time.perf_counter()
    for r in range(args.runs):
        # odd rounds run backwards: the last engine loaded stays loaded for the next round's first row
        for row in rows if r % 2 == 0 else rows[::-1]:
            label = f"{name} run {r + 1}/{args.runs} {row.engine} {row.dtype}"
            progress.update(task, description=label, refresh=True)
            if row.error is None:
                measure_run(row, bench, label, r)
            progress.advance(task)
            progress.refresh()
    bench.pool.clear()
    result.bench_s = time.perf_counter() - start
    result.sample_bandwidth()
    return result


# -- report ---------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def best_row(rows: list[Row], engine: str, key: str) -> Row | None:
    """The engine's fastest float row (quantized rows are compared with llama.cpp's, format by format)."""
    ok = [r for r in rows if r.engine == engine and r.runs and r.dtype in DTYPES]
    return max(ok, key=lambda r: r.median(key), default=None)


def leading_match(tokens: list[int], reference: list[int]) -> int:
    n = 0
    while n < min(len(tokens), len(reference)) and tokens[n] == reference[n]:
        n += 1
    return n


def reference_tokens(rows: list[Row]) -> list[int]:
    """transformers' float32 greedy tokens (else its first measured dtype): a sanity check that the
    engines compute the same model, not only at the same speed."""
    tf = [r for r in rows if r.engine == "transformers" and r.tokens]
    tf.sort(key=lambda r: r.dtype != "float32")
    return tf[0].tokens if tf else []


def row_figures(row: Row, reference: list[int]) -> dict[str, Any]:
    """Medians over the used runs; the roofline fraction pairs each run with its own bandwidth."""
    used = row.used()
    fractions = [r.decode * row.bytes_per_token / (r.bandwidth * 1e9) for r in used]
    match = f"{leading_match(row.tokens, reference)}/{len(row.tokens)}" if reference and row.tokens else "-"
    return {
        "decode_tok_s": row.median("decode"),
        "decode_min_max": [min(r.decode for r in used), max(r.decode for r in used)] if used else None,
        "prefill_tok_s": row.median("prefill"),
        "gb_per_token": row.bytes_per_token / 1e9,
        "bandwidth_gb_s": row.median("bandwidth"),
        "roofline_tok_s": row.median("bandwidth") * 1e9 / row.bytes_per_token,
        "roofline_fraction": median(fractions),
        "greedy_match": match,
        "clean_runs": f"{sum(not r.disturbed for r in row.runs)}/{len(row.runs)}" if row.runs else "-",
    }


def summary(rows: list[Row]) -> dict[str, Any]:
    """hearthlm's best dtype against transformers' best dtype, for decode and for prefill."""
    out: dict[str, Any] = {}
    for key in ("decode", "prefill"):
        hl, tf = best_row(rows, "hearthlm", key), best_row(rows, "transformers", key)
        out[key] = {
            "hearthlm_best": [hl.dtype, hl.median(key)] if hl else None,
            "transformers_best": [tf.dtype, tf.median(key)] if tf else None,
            "ratio": hl.median(key) / tf.median(key) if hl and tf else None,
        }
    # hearthlm against llama.cpp: on the same GGUF file, and our own formats against the GGUF type of the same
    # bits (int4 vs Q4_0, int8 vs Q8_0)
    runs = {(r.engine, r.dtype): r for r in rows if r.runs}
    pairs = [(f"gguf-{t}", f"gguf-{t}") for t in GGUF_TYPES] + [("int4", "gguf-Q4_0"), ("int4-g32", "gguf-Q4_0"),
             ("int4-g128", "gguf-Q4_0"), ("int8", "gguf-Q8_0")]  # fmt: skip
    for ours, theirs in pairs:
        a, b = runs.get(("hearthlm", ours)), runs.get(("llama.cpp", theirs))
        if a and b:
            out[f"{ours} vs llama.cpp {theirs[5:]}"] = {
                key: a.median(key) / b.median(key) for key in ("decode", "prefill")
            }
            out[f"{ours} vs llama.cpp {theirs[5:]}"]["decode_paired"] = paired_ratio(a, b, "decode")
            # how many leading greedy tokens the two engines agree on (the same file or the same bits)
            out[f"{ours} vs llama.cpp {theirs[5:]}"]["greedy_common"] = [
                leading_match(a.tokens, b.tokens),
                len(b.tokens),
            ]
    return out


def paired_ratio(a: Row, b: Row, key: str) -> float | None:
    """The median over rounds of a's figure / b's in the same round: the two ran seconds apart, so the drift of
    this VM's speed (a third within minutes) cancels out of each ratio, where a ratio of medians keeps it."""
    by_round = [{r.round: getattr(r, key) for r in row.used()} for row in (a, b)]
    ratios = [by_round[0][r] / by_round[1][r] for r in by_round[0] if r in by_round[1]]
    return median(ratios) if ratios else None


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def results_table(run: ModelRun, prompt_len: int) -> Table:
    title = (
        f"{run.name} ({run.layers} layers); memory read bandwidth before/after: best "
        f"{max(run.read_gb_s):.1f} GB/s, median {median(run.read_gb_s):.1f} GB/s; rooflines use samples "
        "taken around each decode run"
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col in (
        "engine",
        "dtype",
        "decode tok/s",
        "(min-max)",
        f"prefill tok/s @{prompt_len}",
        "GB/token",
        "read GB/s",
        "roofline tok/s",
        "% roofline",
        "greedy = tf",
        "clean runs",
        "load s",
    ):
        table.add_column(col, justify="left" if col in ("engine", "dtype") else "right", no_wrap=col == "engine")
    reference = reference_tokens(run.rows)
    for row in run.rows:
        f = row_figures(row, reference)
        low_high = f["decode_min_max"]
        spread = f"{fmt(low_high[0])}-{fmt(low_high[1])}" if low_high else "-"
        cells = [
            fmt(f["decode_tok_s"], 2),
            spread,
            fmt(f["prefill_tok_s"]),
            fmt(f["gb_per_token"], 3),
            fmt(f["bandwidth_gb_s"]),
            fmt(f["roofline_tok_s"]),
            fmt(100 * f["roofline_fraction"], 0),
            f["greedy_match"],
            f["clean_runs"],
            fmt(median(row.load_s)),
        ]
        if row.error:
            cells = ["failed"] + ["-"] * (len(cells) - 1)
        table.add_row(row.engine, row.dtype, *cells)
    return table


def summary_lines(run: ModelRun) -> list[str]:
    lines = []
    for key, s in summary(run.rows).items():
        if "vs llama.cpp" in key:
            paired, common = s["decode_paired"], s["greedy_common"]
            lines.append(
                f"  hearthlm {key}: decode {s['decode']:.2f}x (paired by round: {fmt(paired, 2)}x), "
                f"prefill {s['prefill']:.2f}x, first {common[0]}/{common[1]} greedy tokens the same"
            )
            continue
        hl, tf = s["hearthlm_best"], s["transformers_best"]
        if hl and tf:
            lines.append(
                f"  {key}: hearthlm best {hl[1]:.2f} tok/s ({hl[0]}) / transformers best "
                f"{tf[1]:.2f} tok/s ({tf[0]}) = {s['ratio']:.2f}x"
            )
    lines += [f"  {r.engine} {r.dtype} failed: {r.error}" for r in run.rows if r.error]
    disturbed = sum(r.disturbed for row in run.rows for r in row.runs)
    if disturbed:
        lines.append(
            f"  {disturbed} run(s) were disturbed by other processes (> {100 * FOREIGN_CPU_WARN:.0f}% of the CPU) "
            "and left out of the figures where an undisturbed run of the same row exists (column clean runs)"
        )
    lines.append(
        f"  checkpoint build {run.build_s:.0f} s{' (cached)' if not run.build_s else ''}, benchmark {run.bench_s:.0f} s"
    )
    return lines


def print_report(console: Console, runs: list[ModelRun], prompt_len: int) -> None:
    for run in runs:
        console.print(results_table(run, prompt_len))
        for line in summary_lines(run):
            console.print(line, markup=False, highlight=False)
        console.print()


# -- machine info, JSON, CLI ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    try:
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = None
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hearthlm_git": git,
    }


def write_json(runs: list[ModelRun], args: argparse.Namespace, started: datetime) -> Path:
    models = {}
    for run in runs:
        reference = reference_tokens(run.rows)
        rows = [asdict(r) | row_figures(r, reference) for r in run.rows]
        models[run.name] = {k: v for k, v in asdict(run).items() if k != "rows"} | {
            "rows": rows,
            "summary": summary(run.rows),
            "read_gb_s_best": max(run.read_gb_s),
            "read_gb_s_median": median(run.read_gb_s),
        }
    doc = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": started.isoformat(),
        "machine": machine_info(),
        "settings": {
            "runs": args.runs,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "decode_prompt_len": DECODE_PROMPT_LEN,
            "layers": args.layers,
        },
        "models": models,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"decode-{socket.gethostname()}-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def csv_list(choices: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=csv_list(list(MODELS)), default=list(MODELS), help=", ".join(MODELS))
    ap.add_argument(
        "--dtypes", type=csv_list(list(DTYPES)), default=list(DTYPES), help="hearthlm dtypes, of " + ", ".join(DTYPES)
    )
    ap.add_argument(
        "--tf-dtypes",
        type=csv_list(list(DTYPES)),
        default=["float32", "bfloat16"],
        help="transformers dtypes (empty string: hearthlm only)",
    )
    ap.add_argument(
        "--formats", type=csv_list(FORMATS), default=[], help="hearthlm quantized rows: " + ", ".join(FORMATS)
    )
    ap.add_argument(
        "--gguf", type=csv_list(GGUF_TYPES), default=[], help="GGUF rows (hearthlm and llama.cpp on one file)"
    )
    ap.add_argument("--runs", type=int, default=3, help="rounds over all engines/dtypes; figures are medians")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run (>= 2)")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of the prefill run")
    ap.add_argument("--layers", type=int, default=None, help="build every model with this many layers")
    ap.add_argument("--retries", type=int, default=1, help="extra tries of a run other processes disturbed")
    ap.add_argument(
        "--quiet-wait", type=float, default=120.0, help="seconds to wait for other processes before each run"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/hearthlm-bench-checkpoints"))
    ap.add_argument(
        "--device", default=None, help="cpu or cuda for hearthlm and transformers (default: HEARTHLM_DEVICE)"
    )
    args = ap.parse_args(argv)
    if args.device:
        os.environ["HEARTHLM_DEVICE"] = args.device  # engines run in child processes, which inherit it
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_len < 1:
        ap.error("need --new-tokens >= 2, --runs >= 1, --prompt-len >= 1")
    return args


def main() -> None:
    args = parse_args()
    started = datetime.now()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stdout = Console(width=None if sys.stdout.isatty() else 180)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    stderr = Console(stderr=True)
    # no auto refresh: a redraw thread would compete with the benchmark for the machine's cores;
    # off a terminal the bar is off and the per-measurement log lines remain
    budget = available_memory() - MEMORY_MARGIN  # taken before any model: later figures see our own leftovers
    runs: list[ModelRun] = []
    with Progress(*columns, console=stderr, auto_refresh=False, disable=not stderr.is_terminal) as progress:
        for name in args.models:
            runs.append(run_model(name, args, progress, budget))
            # each model's figures come out (and are saved) as soon as it is done: a run stopped
            # during a later model keeps them
            with paused(progress):
                print_report(stdout, runs[-1:], args.prompt_len)
                path = write_json(runs, args, started)
    stdout.print(f"wrote {path}", highlight=False)


if __name__ == "__main__":
    main()
