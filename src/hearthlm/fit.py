"""`hearth fit`: memory and decode-speed estimates from a model's config alone (no weights read).

Parameters are counted from the family's own module, built on the meta device from the same
ModelConfig the loader builds (one truth for shapes), and split into embedding / LM head / PLE table /
routed experts / other matrices / vectors. Each weight format prices a tensor in bytes:

- bf16 / fp16 / fp32: what hearthlm runs today. Matrices in that dtype; vectors (norms) in fp32
  (`RMSNorm.after_load`); the PLE table stays in the checkpoint's dtype (gathered, never converted).
- int8 / int4 (weights/loader.py): matrices in int8 with one fp16 scale per row, or in int4 with an
  fp16 scale and an fp16 min per 32 input columns (5.0 bits per weight); the embedding and the LM head
  (tied or not) in int8 per row in both; the PLE table stays in the checkpoint's dtype.
- GGUF Q8_0 (34 bytes / 32 weights) and Q4_0 (18 / 32): every matrix in that block format, except the
  output matrix, which llama.cpp writes as Q6_K unless the file is Q8_0.
- GGUF Q4_K_M: llama.cpp's per-tensor recipe: Q4_K everywhere, Q6_K for the output matrix and for
  attn_v and ffn_down of the layers where llama.cpp's `use_more_bits` holds (the first and last eighth
  of the layers and every third layer between).
  GGUF types are priced as hearthlm holds them after repacking (quant/ggml.py), which for the K-types is
  wider than the file: Q4_K 5 bits per weight (file 4.5), Q6_K 7 (file 6.56); Q8_0 and Q4_0 as in the file.

KV cache bytes per token come from the LayerSpecs as `engine/kv_cache.py` allocates them: a K and a
V buffer per layer that computes K/V (k=v layers included: V is v_norm(k), K is rope(k_norm(k))),
sliding layers capped at their window, KV-shared layers nothing.

Resident memory (what "fits" means) = weights + KV cache + activations + runtime. On a GPU the PLE
table stays in host memory (memory-mapped, only gathered rows move). Separately, `load_peak` is the
peak RSS of hearthlm's loader on CPU: parameters that are views of the (private) file mapping keep its
pages; fused (qkv, gate+up, stacked experts) and dtype-converted tensors are copies, after which the
loader drops their source pages, so the peak is the weights plus one copy's sources in flight.

Images and audio (Gemma 4 checkpoints with towers; `images` / `audio_clips` per sequence): the towers and their
projections are counted from vision_config / audio_config (their modules built on the meta device, as the text
model's), held as multimodal/towers.py holds them: on CPU the linear layers' weights (the clipped ones and the
projections) in their stored dtype (bf16 / fp16 kept, read from the checkpoint's tower tensors or the config's
dtype) and everything else in float32; on a GPU all in the model dtype. With `quant_towers` (`--quant-towers`, int8
and int4 formats only, as `LLM(quant_towers=True)` allows) those linear weights whose input width allows it take the
format's bytes; a folder `hearth quantize --quant-towers` wrote holds them quantized whatever is asked. Plus one batch
of tower activations (every image of a sequence encoded together). Each image adds
`image_tokens` + 2 positions to the sequence, each clip up to 752: their K/V is the cache grown by those positions
(`media_kv`). Text-only use loads no tower, so with no images or clips nothing is added.

Decode speed is the memory-bandwidth roofline: bandwidth / bytes read per token (every matrix once,
the LM head, the active experts only, the KV cache at the given context; embedding and PLE gathers
are negligible). Bandwidth is measured once per machine (about a second) and cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, read_json
from .models import resolve as resolve_family

KNOWN_DIR = Path(__file__).parent / "known_models"
# Known model name -> Hugging Face repo id (its config.json ships in known_models/<name>.json).
KNOWN_MODELS = {
    "gemma-4-E2B": "google/gemma-4-E2B-it",
    "gemma-4-E4B": "google/gemma-4-E4B-it",
    "gemma-4-26B-A4B": "google/gemma-4-26B-A4B-it",
    "gemma-4-31B": "google/gemma-4-31B-it",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
    "gemma-3-27b": "google/gemma-3-27b-it",
    "Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B-Instruct",
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
}
DEFAULT_FORMATS = ("bf16", "int8", "int4", "Q8_0", "Q4_K_M", "Q4_0")
NATIVE = {"fp32": 4, "fp16": 2, "bf16": 2}  # formats hearthlm loads today: bytes per weight
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}

INT4_GROUP = 32
QUANT_CHUNK = 1 << 20  # quant/quantize.py's _CHUNK
QUANT_TEMPORARIES = 6  # float32 chunk-sized temporaries alive at once while quantizing (measured)
Q8_0, Q4_0 = 34 / 32, 18 / 32  # GGUF bytes per weight, in the file and as hearthlm holds them
GGUF_K = {"file": (144 / 256, 210 / 256), "resident": (5 / 8, 7 / 8)}  # Q4_K, Q6_K (repacked: quant/ggml.py)

# Runtime memory, measured on the CPU build of torch 2.13 (x86-64, Python 3.11):
RUNTIME_RSS = 220 * 10**6  # `import torch, hearthlm`
# What loading adds besides the weights: the CPU kernels, the tokenizer, first-forward libraries, and the modules
# LLM imports (embeddings, the media spec, the template sandbox); measured again when those came (was 32 MB).
LOAD_OVERHEAD = 38 * 10**6
CUDA_CONTEXT = 500 * 10**6  # VRAM taken by the CUDA context and cuBLAS workspaces (typical; not measured here)
PREFILL_CHUNK = 512  # the engine prefills in chunks of this many tokens (Engine.prefill_chunk)


# -- parameters ---------------------------------------------------------------------------------------


@dataclass
class Tensor:
    """One parameter of hearthlm's model: its name, shape, role and layer."""

    name: str
    shape: tuple[int, ...]
    role: str  # "embed" | "lm_head" | "ple_table" | "experts" | "matrix" | "vector"
    layer: int | None
    fused: bool  # built by concatenating/stacking checkpoint tensors (a copy at load, never a view)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Model:
    """A model as `fit` sees it: its config, its parameter tensors, and the checkpoint's dtype."""

    name: str
    config: ModelConfig
    tensors: list[Tensor]
    file_dtype_bytes: int = 2
    source: str = "config"  # "known" | a folder path
    towers: dict[str, TowerSize] = field(default_factory=dict)  # "image" / "audio": the tower that reads it
    towers_quant: str | None = None  # the format a quantized folder stores its towers' linear weights in

    def count(self, *roles: str) -> int:
        return sum(t.numel for t in self.tensors if not roles or t.role in roles)

    @property
    def params(self) -> int:
        return self.count()

    @property
    def active_params(self) -> int:
        """Parameters used per token: all but the unrouted experts (and counting the PLE table whole)."""
        cfg = self.config
        experts = self.count("experts")
        return self.params - experts + (experts * cfg.experts_per_token // cfg.num_experts if experts else 0)


@dataclass(frozen=True)
class TowerSize:
    """One tower with its projection into the text width: parameters, and working-set bytes per encoded token
    (float32; what one layer holds for each patch / frame at once)."""

    params: int
    activation_per_input: int  # bytes per patch (vision) or per 10-ms feature frame (audio)
    inputs_per_token: int  # patches per soft token (pool^2) or frames per audio token (4)
    linear: tuple[tuple[int, int], ...] = ()  # [out, in] of the clipped linear layers' and the projection's weights
    stored_bytes: int = 2  # bytes per weight of those as the checkpoint stores them

    def weight_bytes(self, quant: str | None = None, gpu_bytes: int | None = None) -> int:
        """Bytes held (multimodal/towers.py): on CPU (`gpu_bytes` None) the linear weights as stored if half
        precision, else float32, the rest float32; on a GPU everything in `gpu_bytes` per parameter. `quant`
        ("int8" / "int4"): the linear weights whose input width allows it in that format instead."""
        from .quant.quantize import parse_quant

        spec = parse_quant(quant) if quant else None
        linear = sum(n * k for n, k in self.linear)
        held = (self.params - linear) * (gpu_bytes or 4)
        for n, k in self.linear:
            if spec is not None and k % 32 == 0 and (spec.group is None or k % spec.group == 0):
                held += n * k + 2 * n if spec.bits == 8 else n * k // 2 + 4 * (n * k // spec.group)
            else:
                held += n * k * (gpu_bytes or (self.stored_bytes if self.stored_bytes == 2 else 4))
        return held


def _towers(hf: dict[str, Any], stored_bytes: int = 2) -> dict[str, TowerSize]:
    """The towers a multimodal config describes (vision_config, audio_config), counted on the meta device;
    `stored_bytes`: bytes per weight of their linear layers in the checkpoint."""
    from .models.gemma4_audio import AudioSpec, AudioTower
    from .models.gemma4_media import ClippedLinear
    from .models.gemma4_vision import VisionSpec, VisionTower

    def linear(tower: torch.nn.Module, width: int) -> tuple[tuple[int, int], ...]:
        shapes = [tuple(m.weight.shape) for m in tower.modules() if isinstance(m, ClippedLinear)]
        return (*shapes, (text["hidden_size"], width))  # the projection into the text width

    out: dict[str, TowerSize] = {}
    if hf.get("model_type") not in ("gemma4", "gemma4_text") or not isinstance(hf.get("text_config", hf), dict):
        return out
    text = hf.get("text_config") or hf
    with torch.device("meta"):
        if isinstance(hf.get("vision_config"), dict):
            v = VisionSpec.from_hf(hf["vision_config"])
            tower = VisionTower(v)
            n = sum(p.numel() for p in tower.parameters()) + v.hidden * text["hidden_size"]
            act = 4 * (6 * v.hidden + 3 * v.intermediate + 3 * v.heads * v.head_dim)
            out["image"] = TowerSize(n, act, v.pool**2, linear(tower, v.hidden), stored_bytes)
        if isinstance(hf.get("audio_config"), dict):
            a = AudioSpec.from_hf(hf["audio_config"])
            tower = AudioTower(a)
            n = sum(p.numel() for p in tower.parameters()) + a.out_dims * text["hidden_size"]
            act = 4 * (a.channels[0] * 64 + 12 * a.hidden)  # the first convolution's map, then 4x fewer frames
            out["audio"] = TowerSize(n, act, 4, linear(tower, a.out_dims), stored_bytes)
    return out


def _role(name: str, shape: tuple[int, ...]) -> str:
    if name == "embed.weight":
        return "embed"
    if name == "lm_head.weight":
        return "lm_head"
    if name == "ple.table":
        return "ple_table"
    if ".experts." in name:
        return "experts"
    return "matrix" if len(shape) >= 2 else "vector"


def model_from_hf(
    name: str,
    hf: dict[str, Any],
    where: str,
    file_dtype_bytes: int | None = None,
    tower_bytes: int | None = None,
    tp: int = 1,
    split: str = "tp",
) -> Model:
    """Build the family's module on the meta device from a config.json dict and list its tensors. `tp` > 1: what
    the largest rank of `--{split} tp` holds, split by the distributed code itself; a model that cannot be split
    raises its TensorParallelError or PipelineError."""
    from .weights.mapping import Cat, Stack

    cls, arch, text = resolve_family(hf, where)
    cfg = cls.config_from_hf(text, arch, where)
    with torch.device("meta"):
        module = cls(cfg)
    sources = module.weight_map("")
    if tp > 1:
        cfg = _rank_share(module, tp, split)
    tensors = []
    for pname, p in module.named_parameters():
        parts = sources.get(pname.replace(".part.", "."))  # a row-parallel projection keeps its weight in .part
        fused = isinstance(parts, (Cat, Stack)) and len(parts.parts) > 1
        layer = int(pname.split(".")[1]) if pname.startswith("layers.") else None
        tensors.append(Tensor(pname, tuple(p.shape), _role(pname, tuple(p.shape)), layer, fused))
    if file_dtype_bytes is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        file_dtype_bytes = _DTYPE_BYTES.get(dtype, 2)
    quant = hf.get("quantization_config")
    towers_quant = quant.get("towers") if isinstance(quant, dict) else None  # `hearth quantize --quant-towers`
    towers = _towers(hf, tower_bytes or file_dtype_bytes)
    return Model(name, cfg, tensors, file_dtype_bytes, towers=towers, towers_quant=towers_quant)


def _rank_share(module, ranks: int, split: str):
    """Split the meta `module` as its largest rank keeps it (no collective runs here); -> that rank's config."""
    from .distributed.mesh import Mesh

    if split != "pp":  # rank 0: the largest share of the vocabulary
        from .distributed.tensor_parallel import shard_model

        return shard_model(module, Mesh(rank=0, world=ranks, split=split)).config
    from .distributed.pipeline import layer_bytes, split_model, stage_bounds

    stages = stage_bounds(module, ranks)
    rank = max(range(ranks), key=lambda r: sum(layer_bytes(module.layers[i]) for i in range(*stages[r])))
    split_model(module, Mesh(rank=rank, world=ranks, split="pp"))
    return dataclasses.replace(module.config, layers=module.kv_layers)  # its KV cache: its own layers'


def _file_dtype_bytes(folder: Path) -> int | None:
    """The dtype of the first tensor of a safetensors file in `folder` (the config's dtype may be absent)."""
    for path in sorted(folder.glob("*.safetensors"))[:1]:
        for entry in _header(path).values():
            return _DTYPE_BYTES.get(entry["dtype"])
    return None


def _tower_dtype_bytes(folder: Path) -> int | None:
    """The dtype of the towers' linear weights in `folder`'s safetensors files (a checkpoint may store its towers
    in another dtype than its text model), None when it has none."""
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in _header(path).items():
            if "_tower." in name and name.endswith(".linear.weight"):
                return _DTYPE_BYTES.get(entry["dtype"])
    return None


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensor entries, read and checked as the loader reads them."""
    from .weights.safetensors import _read_header

    with open(path, "rb") as f:
        _, header = _read_header(f, path, os.path.getsize(path))
    header.pop("__metadata__", None)
    return header


def known_model(name: str, tp: int = 1, split: str = "tp") -> Model | None:
    """A shipped config by known name or HF id (case-insensitive), else None; `tp`, `split`: see model_from_hf."""
    key = name.lower()
    for known, repo in KNOWN_MODELS.items():
        if key in (known.lower(), repo.lower(), repo.lower().rsplit("/", 1)[1]):
            path = KNOWN_DIR / f"{known}.json"
            m = model_from_hf(known, read_json(path), str(path), tp=tp, split=split)
            m.source = "known"
            return m
    return None


def load(name: str | Path, tp: int = 1, split: str = "tp") -> Model:
    """A model by name: a folder, a pulled model or the demo (store.resolve), else a known model; `tp` > 1: one
    rank's share under `--{split} tp` (model_from_hf)."""
    from . import store

    try:
        path = store.resolve(name)
    except store.ModelNotFoundError as e:
        found = known_model(str(name), tp, split)
        if found is None:
            raise store.ModelNotFoundError(f"{e}; `hearth fit` also knows: {', '.join(KNOWN_MODELS)}") from None
        return found
    if path.suffix == ".gguf":  # its metadata read as a config.json; formats are priced as for any checkpoint
        from .weights.gguf import GGUFFile
        from .weights.gguf_model import hf_config

        m = model_from_hf(path.name, hf_config(GGUFFile(path)), str(path), file_dtype_bytes=2, tp=tp, split=split)
    else:
        hf = read_json(path / "config.json")
        where = str(path / "config.json")
        m = model_from_hf(path.name, hf, where, _file_dtype_bytes(path), _tower_dtype_bytes(path), tp, split)
    m.source = str(path)
    return m


# -- formats ------------------------------------------------------------------------------------------


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _q4_k_m(m: Model, t: Tensor, file: bool) -> float:
    """Bytes of one tensor under llama.cpp's Q4_K_M recipe."""
    Q4_K, Q6_K = GGUF_K["file" if file else "resident"]
    cfg = m.config
    if t.role == "lm_head" or (t.role == "embed" and cfg.tie_embeddings):
        return t.numel * Q6_K
    if t.layer is None or not _more_bits(t.layer, cfg.num_layers):
        return t.numel * Q4_K
    spec = cfg.layers[t.layer]
    if t.name.endswith("attn.qkv.weight") and spec.kv_source is None and not spec.k_eq_v:
        v = spec.num_kv_heads * spec.head_dim * t.shape[1]  # the V rows of the fused projection
        return (t.numel - v) * Q4_K + v * Q6_K
    if t.name.endswith(("mlp.down.weight", "experts.down")):
        return t.numel * Q6_K
    return t.numel * Q4_K


def tensor_bytes(m: Model, t: Tensor, fmt: str, file: bool = False) -> float:
    """Bytes that tensor `t` takes in format `fmt` (see the module docstring for each format's rules);
    `file`: in a GGUF file rather than in memory."""
    Q6_K = GGUF_K["file" if file else "resident"][1]
    if t.role == "vector":
        return t.numel * 4
    if fmt in NATIVE:
        return t.numel * (m.file_dtype_bytes if t.role == "ple_table" else NATIVE[fmt])
    if fmt in ("int8", "int4"):
        if t.role == "ple_table":
            return t.numel * m.file_dtype_bytes
        rows = t.numel // t.shape[-1]
        if fmt == "int8" or t.role in ("embed", "lm_head"):
            return t.numel + rows * 2
        return t.numel * 0.5 + (t.numel // INT4_GROUP) * 4
    if fmt == "Q8_0":
        return t.numel * Q8_0
    if fmt == "Q4_0":
        output = t.role == "lm_head" or (t.role == "embed" and m.config.tie_embeddings)
        return t.numel * (Q6_K if output else Q4_0)
    if fmt == "Q4_K_M":
        return _q4_k_m(m, t, file)
    raise ValueError(
        f"unknown format '{fmt}' (known: {', '.join((*NATIVE, 'int8', 'int4', 'Q8_0', 'Q4_K_M', 'Q4_0'))})"
    )


def gguf_file_bytes(m: Model, fmt: str) -> float:
    """The size of a GGUF file of `fmt` (its tensors), for checking the recipe against published files."""
    return sum(tensor_bytes(m, t, fmt, file=True) for t in m.tensors)


# -- KV cache and activations -------------------------------------------------------------------------


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """K+V bytes one token adds, per layer kind ("full" / "sliding"), as ContiguousKVCache allocates them."""
    out = {"full": 0, "sliding": 0}
    for spec in cfg.layers:
        if spec.kv_source is None:
            out[spec.kind] += 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes
    return out


def kv_cache_bytes(cfg: ModelConfig, context: int, concurrency: int = 1, dtype_bytes: int = 2) -> int:
    """The cache for `concurrency` sequences of `context` tokens: sliding layers hold min(window, context)."""
    from .engine.kv_cache import buffer_shapes

    shapes = buffer_shapes(cfg.layers, concurrency, context).values()
    return sum(2 * math.prod(shape) * dtype_bytes for shape in shapes)


def activation_bytes(cfg: ModelConfig, context: int, concurrency: int = 1, on_gpu: bool = False) -> int:
    """Working memory of a forward at `context` (an estimate): one prefill chunk's hidden states, projections
    and MLP in the compute dtype (fp32 on CPU), one layer's K/V converted to fp32 for attention (CPU), the
    attention mask, the RoPE cos/sin tables (fp32, grown to a power of two), and the logits of each row."""
    act = 2 if on_gpu else 4
    T = min(PREFILL_CHUNK, context)
    H = cfg.hidden_size
    widest = max(
        max(s.intermediate_size for s in cfg.layers), cfg.moe_intermediate_size * max(cfg.experts_per_token, 1)
    )
    qkv = max(cfg.num_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim for s in cfg.layers)
    chunk = T * (6 * H + 2 * qkv + 3 * widest + 3 * cfg.num_layers * cfg.ple_dim) * act
    kv_fp32 = 0 if on_gpu else max(2 * s.num_kv_heads * s.head_dim * 4 * context for s in cfg.layers)
    mask = T * context
    rope_len = 256
    while rope_len < context:
        rope_len *= 2
    rope = sum(2 * rope_len * d * 4 for d in {(s.rope, s.head_dim): s.head_dim for s in cfg.layers}.values())
    logits = concurrency * cfg.vocab_size * 4 * 2
    return chunk + kv_fp32 + mask + rope + logits


# -- the estimate -------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Memory (bytes) and roofline speed of one model in one format, at a context and a concurrency."""

    model: str
    format: str
    params: int
    active_params: int
    weights: int  # every weight resident in this format
    weights_active_experts: int | None  # MoE: only the routed experts one token uses resident
    ple_table: int  # part of `weights`; on a GPU it stays in host memory
    kv_cache: int
    kv_per_token: dict[str, int]
    activations: int
    towers: int  # tower weights resident while images / audio are in use (0: none asked for)
    runtime: int  # torch + hearthlm + what loading adds (host memory)
    ram: int  # resident host memory running on CPU
    vram: int  # GPU memory running on a GPU (the PLE table stays on the host)
    ram_with_gpu: int  # host memory beside the GPU
    load_peak: int | None  # peak RSS of hearthlm's loader today (native formats from safetensors only)
    bytes_per_token: int  # read per decode step at batch 1 (weights + the KV cache at this context)
    supported: bool  # whether hearthlm loads this format today
    context: int = 0
    concurrency: int = 1
    fits_ram: bool | None = None
    fits_vram: bool | None = None
    device: str | None = None  # where it would run: "gpu" | "cpu" | None (fits nowhere)
    tokens_per_s: float | None = None  # roofline decode speed of each sequence
    notes: list[str] = field(default_factory=list)
    media_tokens: int = 0  # positions the images and clips of one sequence add to the context
    media_kv: int = 0  # part of kv_cache: the K/V of those positions, all sequences
    tp: int = 1  # > 1: the figures are one rank's of `hearth serve --{split} tp` (fit's `tp`)
    split: str = "tp"  # how the ranks split the model: tp, ep or pp


AUDIO_TOKENS = 750  # the most soft tokens one clip takes (30 s); the estimate assumes clips that long


def media(
    m: Model,
    images: int = 0,
    image_tokens: int = 280,
    audio_clips: int = 0,
    quant: str | None = None,
    gpu_bytes: int | None = None,
) -> tuple[int, int, int]:
    """What images and audio clips per sequence add: (positions in the sequence, tower weight bytes as held on CPU,
    or on a GPU at `gpu_bytes` per parameter, their linear weights in `quant` when given (TowerSize.weight_bytes),
    tower activation bytes in float32). A ValueError when the model has no tower for them."""
    asked = {"image": images, "audio": audio_clips}
    for kind, n in asked.items():
        if n < 0:
            raise ValueError(f"--{'images' if kind == 'image' else 'audio-clips'} must be 0 or more, not {n}")
        if n and kind not in m.towers:
            raise ValueError(f"{m.name} has no {kind} tower in its config: it takes no {kind} input")
    per_item = {"image": image_tokens, "audio": AUDIO_TOKENS}
    tokens = sum(n * (per_item[k] + 2) for k, n in asked.items())  # each item between its begin/end markers
    used = [k for k, n in asked.items() if n]
    weights = sum(m.towers[k].weight_bytes(quant, gpu_bytes) for k in used)
    act = sum(asked[k] * per_item[k] * m.towers[k].inputs_per_token * m.towers[k].activation_per_input for k in used)
    return tokens, weights, act


def estimate(
    m: Model,
    fmt: str = "bf16",
    context: int = 4096,
    concurrency: int = 1,
    kv_dtype_bytes: int | None = None,
    images: int = 0,
    image_tokens: int = 280,
    audio_clips: int = 0,
    quant_towers: bool = False,
) -> Estimate:
    """Memory and bytes per token of model `m` in format `fmt` (no machine involved: see `judge`); `images` and
    `audio_clips` per sequence add their tower memory and the K/V of their soft tokens (`image_tokens` each), the
    towers' linear weights in `fmt` with `quant_towers` when `fmt` is int8 or int4 (as LLM(quant_towers=True))."""
    cfg = m.config
    tq = m.towers_quant or (fmt if quant_towers and fmt in ("int8", "int4") else None)
    media_tokens, towers_cpu, tower_act = media(m, images, image_tokens, audio_clips, tq)
    on_gpu = 4 if fmt in ("fp32", "fp16") else 2  # the model dtype on a GPU; float16 overflows: float32
    towers_gpu = media(m, images, image_tokens, audio_clips, tq, on_gpu)[1]
    text_context = min(context, cfg.max_position)
    context = min(context + media_tokens, cfg.max_position)
    sizes = {t.name: tensor_bytes(m, t, fmt) for t in m.tensors}
    weights = int(sum(sizes.values()))
    by_role: dict[str, float] = {}
    for t in m.tensors:
        by_role[t.role] = by_role.get(t.role, 0) + sizes[t.name]
    experts = by_role.get("experts", 0)
    active_experts = experts * cfg.experts_per_token / cfg.num_experts if cfg.num_experts else 0
    ple = int(by_role.get("ple_table", 0))
    kv_b = kv_dtype_bytes or (NATIVE[fmt] if fmt in NATIVE else 2)
    kv = kv_cache_bytes(cfg, context, concurrency, kv_b)
    media_kv = kv - kv_cache_bytes(cfg, text_context, concurrency, kv_b)
    act_cpu = activation_bytes(cfg, context, concurrency)
    act_gpu = activation_bytes(cfg, context, concurrency, on_gpu=True)
    runtime = RUNTIME_RSS + LOAD_OVERHEAD
    # Read per token: every matrix but the gathered tables, the LM head (the embedding when tied), the experts
    # one token routes to, and each sequence's KV cache.
    head = by_role.get("lm_head", 0) or (by_role.get("embed", 0) if cfg.tie_embeddings else 0)
    dense = by_role.get("matrix", 0) + by_role.get("vector", 0)
    per_token = int(dense + head + active_experts + kv / concurrency)
    load_peak = None
    if fmt in NATIVE or fmt in ("int8", "int4"):
        # The loader fills the parameters one at a time (in this order): a copy (fused tensors and, across
        # dtypes, every tensor but the PLE table) briefly holds its source pages too, which are then dropped.
        # Quantizing copies every matrix; a fused one is first concatenated in the file's dtype, and the
        # quantizer's float32 temporaries work on chunks of at most quantize._CHUNK elements.
        quant = fmt not in NATIVE
        same = not quant and NATIVE[fmt] == m.file_dtype_bytes
        resident = peak = 0
        for t in m.tensors:
            copied = (quant or t.fused or t.role == "vector" or not same) and t.role != "ple_table"
            source = t.numel * m.file_dtype_bytes * (2 if quant and t.fused else 1) if copied else 0
            matrix = quant and t.role not in ("vector", "ple_table")
            temp = QUANT_TEMPORARIES * 4 * min(t.numel, QUANT_CHUNK) if matrix else 0
            peak = max(peak, resident + source + temp + sizes[t.name])
            resident += sizes[t.name]
        load_peak = int(runtime + peak + kv + act_cpu)
    return Estimate(
        model=m.name,
        format=fmt,
        params=m.params,
        active_params=m.active_params,
        weights=weights,
        weights_active_experts=int(weights - experts + active_experts) if experts else None,
        ple_table=ple,
        kv_cache=kv,
        kv_per_token=kv_bytes_per_token(cfg, kv_b),
        activations=act_cpu,
        runtime=runtime,
        towers=towers_cpu,
        ram=weights + kv + act_cpu + runtime + towers_cpu + tower_act,
        vram=weights - ple + kv + act_gpu + CUDA_CONTEXT + towers_gpu + tower_act * on_gpu // 4,
        ram_with_gpu=ple + runtime,
        load_peak=load_peak,
        bytes_per_token=per_token,
        supported=True,  # every format priced here loads for every family (Gemma 3 and 4 GGUF files included)
        context=context,
        concurrency=concurrency,
        media_tokens=media_tokens,
        media_kv=media_kv,
    )


# -- the machine --------------------------------------------------------------------------------------


@dataclass
class Machine:
    ram: int  # bytes
    ram_available: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)  # name, memory (bytes)
    cpu: str = "unknown CPU"
    cpu_bandwidth: float | None = None  # GB/s (10^9 bytes per second), read
    gpu_bandwidth: float | None = None

    @property
    def vram(self) -> int:
        return max((g["memory"] for g in self.gpus), default=0)  # one GPU: hearthlm does not split a model


def _meminfo() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def cache_path() -> Path:
    return Path(os.environ.get("HEARTHLM_CACHE", Path.home() / ".cache" / "hearthlm")) / "machine.json"


def measure_bandwidth(device: str = "cpu", seconds: float = 1.0) -> float:
    """Read bandwidth in GB/s: the median of timed sums over a buffer far larger than any cache
    (benchmarks/membw.py's method, shortened to about `seconds`)."""
    size = (256 if device == "cpu" else 1024) * 2**20
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    src.sum()  # fault the pages in, warm the thread pool
    sync()
    rates: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        start = time.perf_counter()
        src.sum()
        sync()
        rates.append(src.nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def _cached_bandwidth(key: str, device: str) -> float:
    path = cache_path()
    cached: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
    entry = cached.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("read_gbps"), (int, float)):
        return float(entry["read_gbps"])
    gbps = measure_bandwidth(device)
    cached[key] = {"read_gbps": round(gbps, 2), "threads": torch.get_num_threads(), "measured": time.time()}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    return gbps


def detect(
    ram_gb: float | None = None, vram_gb: float | None = None, bandwidth_gbps: float | None = None, measure: bool = True
) -> Machine:
    """This machine: RAM from /proc/meminfo, CUDA GPUs from torch; overrides in GB (10^9 bytes). The CPU's read
    bandwidth is measured once and cached in ~/.cache/hearthlm/machine.json, keyed by CPU model and threads."""
    for flag, value in (("--ram", ram_gb), ("--bandwidth", bandwidth_gbps)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be a positive number, not {value}")
    if vram_gb is not None and not vram_gb >= 0:
        raise ValueError(f"--vram must be 0 (no GPU) or more, not {vram_gb}")
    info = _meminfo()
    ram = int(ram_gb * 1e9) if ram_gb is not None else info.get("MemTotal", 0)
    machine = Machine(ram=ram, ram_available=info.get("MemAvailable"), cpu=_cpu_name())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            machine.gpus.append({"name": props.name, "memory": props.total_memory})
    if vram_gb is not None:
        machine.gpus = [{"name": "given", "memory": int(vram_gb * 1e9)}] if vram_gb > 0 else []
    machine.cpu_bandwidth = bandwidth_gbps
    if bandwidth_gbps is None and measure:
        machine.cpu_bandwidth = _cached_bandwidth(f"cpu: {machine.cpu}, {torch.get_num_threads()} threads", "cpu")
        if machine.gpus and torch.cuda.is_available():
            machine.gpu_bandwidth = _cached_bandwidth(f"cuda: {torch.cuda.get_device_name(0)}", "cuda")
    return machine


def judge(e: Estimate, machine: Machine) -> Estimate:
    """Fill in what fits on `machine` and the roofline decode speed where it would run (GPU first)."""
    e.fits_ram = e.ram <= machine.ram
    e.fits_vram = e.vram <= machine.vram and e.ram_with_gpu <= machine.ram if machine.gpus else None
    if e.fits_vram:
        e.device, bw = "gpu", machine.gpu_bandwidth
    elif e.fits_ram:
        e.device, bw = "cpu", machine.cpu_bandwidth
    else:
        e.device, bw = None, None
    e.tokens_per_s = round(bw * 1e9 / e.bytes_per_token, 1) if bw else None
    if not e.supported:
        e.notes.append("hearthlm cannot load this format for this model yet: an estimate for planning")
    return e


def fit(
    names: list[str] | None = None,
    machine: Machine | None = None,
    context: int = 4096,
    concurrency: int = 1,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    images: int = 0,
    image_tokens: int = 280,
    audio_clips: int = 0,
    quant_towers: bool = False,
    tp: int = 1,
    split: str = "tp",
) -> list[Estimate]:
    """Estimates for each model (default: every known model) in each format, judged against `machine`; with
    `images` / `audio_clips` per sequence, the known models without such a tower are left out; `quant_towers`:
    see `estimate`. `tp` > 1: per rank of `hearth serve --{split} tp` (the largest share; `machine` is one
    rank's); named models that cannot be split raise, known ones are left out."""
    if context < 1 or concurrency < 1:
        raise ValueError(f"--context and --concurrency must be at least 1 (got {context} and {concurrency})")
    if tp < 1:
        raise ValueError(f"--tp must be at least 1 (got {tp})")
    models = [load(n, tp, split) for n in names] if names else _known_splittable(tp, split)
    if not names:
        models = [m for m in models if (not images or "image" in m.towers) and (not audio_clips or "audio" in m.towers)]
    out = []
    for m in models:
        whole = load(m.name if m.source == "known" else m.source) if tp > 1 else m
        for fmt in formats:
            e = estimate(
                m, fmt, context, concurrency, images=images, image_tokens=image_tokens, audio_clips=audio_clips,
                quant_towers=quant_towers,
            )  # fmt: skip
            if tp > 1:
                _per_rank(e, whole, fmt, tp, split, (context, concurrency))
            out.append(judge(e, machine) if machine is not None else e)
    return out


def _known_splittable(tp: int, split: str) -> list[Model]:
    from .distributed.pipeline import PipelineError
    from .distributed.tensor_parallel import TensorParallelError

    out = []
    for name in KNOWN_MODELS:
        try:
            out.append(known_model(name, tp, split))
        except (TensorParallelError, PipelineError):
            continue  # heads, widths or layers that do not divide: not servable this way
    return out


def _per_rank(e: Estimate, whole: Model, fmt: str, tp: int, split: str, load: tuple[int, int]) -> None:
    """Mark `e` as one rank's and give it the load peak a rank really has: under --tp / --ep it loads layer by
    layer and splits each as soon as it is filled (distributed/tensor_parallel.py), so beside its share it holds
    one whole layer, the largest, at most; under --pp it reads its own layers only. Under --pp the stages run one
    after another for each token, so a token reads what the whole model reads (`load`: context, concurrency)."""
    e.tp, e.split = tp, split
    if split == "pp":
        e.bytes_per_token = estimate(whole, fmt, *load).bytes_per_token
    if e.load_peak is not None and split != "pp":
        layers: dict[int, float] = {}
        for t in whole.tensors:
            if t.layer is not None:
                layers[t.layer] = layers.get(t.layer, 0) + tensor_bytes(whole, t, fmt)
        e.load_peak += int(max(layers.values(), default=0))
    during = "loading, one whole layer more" if split != "pp" else "loading, no more: it reads its own layers"
    traffic = "the all-reduces'" if split != "pp" else "the hidden states sent between stages and their"
    e.notes.append(
        f"per rank of {tp} (--{split}, the largest share): each rank holds this (ranks on one machine share its "
        f"memory: {tp}x this); while {during}; {traffic} traffic is not in the decode speed"
    )


def to_json(estimates: list[Estimate], machine: Machine | None) -> str:
    doc: dict[str, Any] = {"estimates": [asdict(e) for e in estimates]}
    if machine is not None:
        doc["machine"] = asdict(machine)
    return json.dumps(doc, indent=2)


def _gb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _yes(flag: bool | None) -> str:
    return "—" if flag is None else "[green]yes[/green]" if flag else "[red]no[/red]"


def table(estimates: list[Estimate], machine: Machine | None):
    """A rich Table for humans: one row per model and format."""
    from rich.table import Table

    first = estimates[0] if estimates else None
    where = f"context {first.context} × {first.concurrency}" if first else ""
    title = None
    if machine is not None:
        gpus = ", ".join(f"{g['name']} {_gb(g['memory'])}" for g in machine.gpus) or "no GPU"
        bw = f", {machine.cpu_bandwidth:.0f} GB/s read" if machine.cpu_bandwidth else ""
        title = f"RAM {_gb(machine.ram)}{bw}; {gpus}"
    moe = any(e.weights_active_experts for e in estimates)
    towers = any(e.towers for e in estimates)
    if first is not None and first.tp > 1:
        title = f"per rank of --{first.split} {first.tp}" + (f"; each rank: {title}" if title else "")
    t = Table(title=title, box=None, header_style="bold")
    columns = ["MODEL", "FORMAT", "WEIGHTS"] + (["ACTIVE EXPERTS ONLY"] if moe else []) + (["TOWERS"] if towers else [])
    columns += [f"KV ({where})", "RAM (CPU)", "VRAM (GPU)", "FITS RAM", "FITS VRAM", "DECODE TOK/S"]
    for c in columns:
        t.add_column(c, no_wrap=True, justify="left" if c in ("MODEL", "FORMAT") else "right")
    last = None
    for e in estimates:
        speed = f"{e.tokens_per_s:.1f} ({e.device})" if e.tokens_per_s else "—"
        row = [e.model if e.model != last else "", e.format + ("" if e.supported else "*"), _gb(e.weights)]
        if moe:
            row.append(_gb(e.weights_active_experts) if e.weights_active_experts else "")
        if towers:
            row.append(_gb(e.towers))
        row += [_gb(e.kv_cache), _gb(e.ram), _gb(e.vram), _yes(e.fits_ram), _yes(e.fits_vram), speed]
        t.add_row(*row)
        last = e.model
    t.caption = (
        "* hearthlm cannot load this format for this model yet (a planning estimate). "
        if not all(e.supported for e in estimates)
        else ""
    ) + (
        "RAM/VRAM include the KV cache, activations and the runtime; on a GPU the PLE table stays in host memory. "
        + (
            f"Images and audio: {first.media_tokens} positions per sequence (their K/V {_gb(first.media_kv)}), the "
            "towers as held (linear weights as stored, or in int8 / int4 with --quant-towers; the rest float32 on "
            "CPU) and one batch of their activations. "
            if first is not None and first.media_tokens
            else ""
        )
        + "Decode speed: memory-bandwidth roofline, batch 1."
    )
    return t
