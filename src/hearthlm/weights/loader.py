"""Build a model from a Hugging Face checkpoint folder, a folder `hearth quantize` wrote, or a GGUF file.

The model is constructed on the meta device (no memory), then every parameter is filled from its
weight-map source: tensors come memory-mapped, are combined (fused qkv, stacked experts) and
converted or quantized one at a time, and the file pages of what was copied are dropped, so peak memory
stays near one copy of the weights in their final format.

Quantizing (`quant`): the matrices of linear layers and experts take the requested format. Embeddings and
the LM head take int8 with one scale per row whatever the format: the head's errors land directly on the
logits (int4 there costs far more quality than anywhere else), and a tied table serves as both. Routers
stay in float (a flipped expert choice is a large error), and so do Gemma 4's per-layer embedding tables:
they stay memory-mapped, a few rows read per token, costing page cache rather than memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from ..config import ModelConfig, as_id_list, check_model, check_sizes, read_config
from ..embeddings.sentence_transformers import folder_pooling
from ..layers.embedding import Embedding
from ..layers.linear import Linear
from ..layers.moe import Experts
from ..models import resolve
from ..models.base import CausalLM
from ..moe.budget import Budget, BudgetError
from ..moe.pool import install
from ..moe.tier import CheckpointTier, HostTier
from ..quant.ggml import GGMLRows
from ..quant.quantize import QuantSpec, quantizable, quantize
from ..quant.tensor import QuantTensor, RowConcat, combine
from ..weights.mapping import Cat, PlusOne, Source, Stack, names_in
from .gguf import GGUFFile
from .gguf_model import GGUFCheckpoint, hf_config
from .safetensors import PICKLE_SUFFIXES, Checkpoint, CheckpointError, pickle_advice
from .share import GroupCut, Share, copy, take

HEARTHLM_QUANT = "hearthlm"  # quantization_config.quant_method of the folders `hearth quantize` writes

# Text-model prefixes, most specific first: multimodal wrapper, then CausalLM.
PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.", "")
# Towers of multimodal checkpoints: never read.
IGNORED = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
    "model.multi_modal_projector.",
    "vision_tower.",
    "audio_tower.",
    "multi_modal_projector.",
    "embed_vision.",
    "embed_audio.",
)


def read_model_config(folder: Path) -> tuple[type[CausalLM], ModelConfig]:
    path = folder / "config.json"
    hf = read_config(path)
    cls, arch, text = resolve(hf, str(path))
    cfg = _config(cls, text, arch, str(path))
    cfg.pooling = folder_pooling(folder) or cfg.pooling  # a sentence-transformers folder: an embedding model
    gen = folder / "generation_config.json"
    if gen.exists():
        extra = as_id_list(read_config(gen).get("eos_token_id"))
        cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + extra))
    return cls, cfg


def stored_quant(folder: Path) -> str | None:
    """The format of a folder `hearth quantize` wrote ('int4-g32', ...), None for a float checkpoint; other
    quantized checkpoints (GPTQ, AWQ, bitsandbytes, fp8, ...) are refused with the way out."""
    if folder.suffix == ".gguf":
        return None
    q = read_config(folder / "config.json").get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "unknown")
    if method != HEARTHLM_QUANT:
        raise CheckpointError(
            f"{folder}: the checkpoint is quantized with '{method}', which hearthlm does not load; use the "
            "unquantized checkpoint with --quant int8/int4, or a GGUF file"
        )
    return q.get("format", "quantized")


def load_model(
    source: Path | GGUFFile,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantSpec | None = None,
    expert_budget: Budget | None = None,
    expert_prior: dict[tuple[int, int], float] | None = None,
    rank: RankLoad | None = None,
) -> CausalLM:
    """`source`: a checkpoint folder, a .gguf file, or a GGUF file already opened (its metadata also holds the
    tokenizer); `quant`: quantize float matrices while loading; `expert_budget`: leave the experts in the
    checkpoint and keep that many in a pool (moe/); `expert_prior`: usage counts that seed its policy; `rank`:
    one rank of a model split over several (distributed/), which loads what it keeps, layer by layer."""
    path, stored, cls, cfg, ckpt = _open(source, quant)
    with torch.device("meta"):
        model = cls(cfg)
    if rank is not None:
        rank.plan(model)
    mapping = _mapping(model, ckpt, stored, path)
    params = dict(model.named_parameters())
    unmapped = set(params) - set(mapping)
    assert not unmapped, f"weight map of {cls.__name__} misses {sorted(unmapped)}"
    plan = _quant_plan(model, quant) if quant is not None else {}
    budgeted = _budgeted(model, ckpt, mapping, params, path) if expert_budget is not None else set()
    # Readahead around what is read whole would read experts left in the file, or other ranks' shares, too.
    shared = {
        n for name, s in mapping.items() if rank is not None and rank.share(name) is not None for n in names_in(s)
    }
    narrow = (budgeted or shared) and hasattr(ckpt, "read_only")
    if narrow:
        ckpt.read_only(
            [n for name, s in mapping.items() if name not in budgeted for n in names_in(s) if n not in shared]
        )
    verb = f"loading {path.name}" + (f" as {quant.name}" if quant else "")
    keep = getattr(model, "keep_storage_dtype", set())
    _fill(model, ckpt, mapping, _Target(path, dtype, device, plan, keep), budgeted, rank, verb)
    model.dtype = dtype
    if narrow:
        ckpt.read_around()  # the experts run from the mapping (in place) read best with the default readahead
    if budgeted:
        if quant is not None and path.suffix != ".gguf":
            warnings.warn(
                f"experts are quantized to {quant.name} on every fetch from the float checkpoint (measured on 26B-A4B's "
                "experts: ~10 ms each for int8, ~170 ms for int4); `hearth quantize` writes a quantized copy once, "
                "which a budget then reads as stored",
                stacklevel=2,
            )
        model.expert_pool = install(model, lambda n: _tier(ckpt, mapping, plan, n, dtype, device), expert_budget,
                                    device, expert_prior)  # fmt: skip
    if quant is not None:
        _trim_heap()
    used = _check_unused(ckpt, mapping, path, cfg)
    for module in model.modules():  # let layers prepare derived state (e.g. float32 norm weights)
        if hasattr(module, "after_load"):
            module.after_load()
    if rank is not None:
        rank.finish(model)
        if rank.copies:  # the embedding and head were split last: their file pages go too
            _drop(ckpt, used)
    return model.eval()


def _open(source: Path | GGUFFile, quant: QuantSpec | None):
    """(path, stored quant format or None, model class, config, checkpoint reader) of a load's source."""
    path = source.path if isinstance(source, GGUFFile) else source
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(pickle_advice(str(path)))
    stored = stored_quant(path)
    if path.suffix == ".gguf":
        gguf = source if isinstance(source, GGUFFile) else GGUFFile(path)
        hf = hf_config(gguf)
        cls, arch, text = resolve(hf, str(path))
        return path, stored, cls, _config(cls, text, arch, str(path)), GGUFCheckpoint(gguf, hf)
    if stored is not None and quant is not None:
        raise CheckpointError(f"{path} is already quantized ({stored}); load it without --quant")
    cls, cfg = read_model_config(path)
    return path, stored, cls, cfg, Checkpoint(path) if stored is None else _OwnNames(Checkpoint(path))


def _mapping(model: CausalLM, ckpt, stored: str | None, path: Path) -> dict[str, Source]:
    """Parameter name -> where its value lies in the checkpoint."""
    if stored is not None:  # hearthlm's own quantized folder: saved under the parameters' names
        return {name: name for name, _ in model.named_parameters()}
    prefix = next((p for p in PREFIXES if f"{p}embed_tokens.weight" in ckpt), None)
    if prefix is None:
        raise CheckpointError(f"{path}: no embed_tokens.weight under any known prefix {PREFIXES}")
    return model.weight_map(prefix)


def _budgeted(model: CausalLM, ckpt, mapping: dict[str, Source], params: dict, path: Path) -> set[str]:
    """The expert parameters an expert budget leaves in the checkpoint (refused for a model without experts)."""
    budgeted = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Experts) for p in ("gate_up", "down")}
    if not budgeted:
        raise BudgetError(f"{path}: {model.config.architecture} has no experts: an expert budget does not apply")
    _check_budgeted(ckpt, mapping, params, budgeted, path)
    return budgeted


def _check_unused(ckpt, mapping: dict[str, Source], path: Path, cfg: ModelConfig) -> set[str]:
    """The checkpoint's tensor names the model read; a warning names those it did not (other than the towers'
    and the known extras)."""
    used = {n for s in mapping.values() for n in names_in(s)}
    unexpected = [n for n in ckpt.names() if n not in used and not n.startswith(IGNORED) and not _ignorable(n)]
    if unexpected:
        warnings.warn(
            f"{path}: {len(unexpected)} checkpoint tensor(s) not used by {cfg.architecture}, e.g. {unexpected[:3]}",
            stacklevel=3,
        )
    return used


class RankLoad(Protocol):
    """What one rank of a split model loads (distributed/): `plan` sees the model on the meta device first,
    `wanted` says whether to read the parameters of decoder layer i at all (None: those outside the layers),
    `share` what part of a parameter the rank keeps (None: all of it), and the loader calls `took` for each
    parameter it filled with that part alone, having read only that part where the file allows.
    `layer_done` runs once layer i is filled (to split what loaded whole and free the rest before the next layer
    loads), `finish` once everything is. `copies`: what the rank keeps is a copy, so the file's pages of a layer
    can go once layer_done has run."""

    copies: bool

    def plan(self, model: CausalLM) -> None: ...
    def wanted(self, layer: int | None) -> bool: ...
    def share(self, name: str) -> Share | None: ...
    def took(self, name: str) -> None: ...
    def layer_done(self, model: CausalLM, layer: int) -> None: ...
    def finish(self, model: CausalLM) -> None: ...


@dataclass(frozen=True)
class _Target:
    """Where parameters go: the checkpoint's path (for errors), the dtype and device, the quantization plan,
    and the names kept in their stored dtype."""

    path: Path
    dtype: torch.dtype
    device: torch.device
    plan: dict[str, QuantSpec]
    keep: set[str]


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _layer(name: str) -> int | None:
    found = _LAYER.match(name)
    return int(found[1]) if found else None


def _fill(model, ckpt, mapping: dict[str, Source], to: _Target, skip: set[str], rank: RankLoad | None, verb: str):
    """Fill every mapped parameter of `model` (with a progress bar), but those in `skip` (left in the checkpoint)
    and those `rank` does not want; `rank.layer_done(model, i)` after layer i's last one."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    layer_of = {name: _layer(name) for name in mapping}
    last = {layer: name for name, layer in layer_of.items()}
    with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(verb, total=len(mapping))
        for name, source in mapping.items():
            layer = layer_of[name]
            if name not in skip and (rank is None or rank.wanted(layer)):
                _load_wanted(model, ckpt, name, source, shapes[name], to, rank)
            progress.advance(task)
            if rank is not None and layer is not None and last[layer] == name:
                rank.layer_done(model, layer)
                if rank.copies:  # the rank's share is a copy: the layer's file pages and freed copies can go
                    _drop(ckpt, [n for m, s in mapping.items() if layer_of[m] == layer for n in names_in(s)])


def _drop(ckpt, names) -> None:
    """Drop the file pages of checkpoint tensors `names` (copied already) and give freed heap back to the OS."""
    for name in names:
        ckpt.release(name)
    _trim_heap()


def _load_param(model, ckpt, name: str, source: Source, expected: tuple[int, ...], to: _Target) -> None:
    """Build parameter `name` from its source, check its shape, convert or quantize it, and free the file's pages
    of what was copied."""
    if name in to.keep and isinstance(source, str):
        tensor = ckpt.table(source)  # left where the file has it (a GGUF block type: rows dequantized as read)
    else:
        tensor = _build(ckpt, source)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{to.path}: {_describe(ckpt, source)} has shape {tuple(tensor.shape)}, "
            f"but the config implies {expected} for {name}: the config and the weights disagree"
        )
    built = tensor
    if isinstance(tensor, torch.Tensor):
        if name in to.plan and quantizable(tensor, to.plan[name]):
            tensor = quantize(tensor, to.plan[name])
        elif name not in to.keep or tensor.device != to.device:
            tensor = tensor.to(device=to.device, dtype=tensor.dtype if name in to.keep else to.dtype)
    if tensor.device != to.device:
        tensor = tensor.to(to.device)
    _set_param(model, name, tensor)
    if not isinstance(source, str) or not _same_storage(tensor, built):
        for part in names_in(source):  # copied (fused, converted or moved): free the file's pages
            ckpt.release(part)


def _load_wanted(model, ckpt, name: str, source: Source, expected: tuple[int, ...], to: _Target, rank) -> None:
    """Fill parameter `name`: with the rank's share alone where it has one and the file allows, else whole."""
    share = rank.share(name) if rank is not None else None
    if share is None:
        _load_param(model, ckpt, name, source, expected, to)
    elif _load_share(model, ckpt, name, source, expected, to, share):
        rank.took(name)
    else:
        if hasattr(ckpt, "read_ahead"):  # read whole after all: read it ahead (load_model turned readahead off)
            ckpt.read_ahead(names_in(source))
        _load_param(model, ckpt, name, source, expected, to)


def _load_share(model, ckpt, name: str, source: Source, expected: tuple[int, ...], to: _Target, share: Share) -> bool:
    """Fill parameter `name` with `share` of it alone, built from views of the file so that only the share's bytes
    are read, then converted or quantized as _load_param does the whole. False (nothing done) where the share
    cannot be read alone: a table kept in a GGUF block type, a 1 + w norm, a column share of a weight quantized
    with one scale per row while it loads (the scale needs the whole row), or one that cuts a quantization group."""
    spec = to.plan.get(name)
    if isinstance(source, PlusOne) or (share.cols is not None and spec is not None and not _whole_groups(share, spec)):
        return False
    if _source_shape(ckpt, source) != expected:
        return False  # _load_param names the tensors and the shapes in its error
    try:
        tensor = _build_share(ckpt, source, share, name, table=name in to.keep)
    except GroupCut:
        return False
    if tensor is None:
        return False
    assert tuple(tensor.shape) == share.shape(expected), (name, tuple(tensor.shape), share)
    if isinstance(tensor, torch.Tensor):
        if spec is not None and quantizable(tensor, spec):
            tensor = quantize(tensor, spec)
        elif name not in to.keep:
            tensor = tensor.to(dtype=to.dtype)
    _set_param(model, name, tensor.to(to.device))
    for part in names_in(source):  # the share is a copy: the file's pages it read can go
        ckpt.release(part)
    return True


def _whole_groups(share: Share, spec: QuantSpec) -> bool:
    """Whether quantizing a column share gives the columns of the whole weight quantized: its groups must be whole
    (one scale per row spans the whole row, so never)."""
    unit = math.lcm(spec.group, 32) if spec.group is not None else 0
    return unit > 0 and share.cols[0] % unit == 0 and share.cols[1] % unit == 0


def _build_share(ckpt, source: Source, share: Share, name: str, table: bool):
    """`share` of what _build would give for `source`, taken from views of the file (a copy of the share alone);
    None where the file's tensor is not one that slices (a GGUF table kept in its block type). `table`: the
    parameter is read as the model's table (Checkpoint.table)."""
    if isinstance(source, str):
        view = ckpt.table(source) if table else ckpt.get(source)
        if not isinstance(view, (torch.Tensor, QuantTensor)):
            return None
        return take(view, share, name, getattr(ckpt, "read", copy))
    if isinstance(source, Stack):
        e0, e1 = share.items if share.items is not None else (0, len(source.parts))
        inner = dataclasses.replace(share, items=None)
        used = source.parts[e0:e1]
        parts = [_build_share(ckpt, p, inner, f"{name}[{e}]", table) for e, p in enumerate(used, e0)]
    else:  # Cat: each part's own rows of the share
        used, parts, offset = [], [], 0
        for part in source.parts:
            rows = _source_shape(ckpt, part)[0]
            if (local := share.within(offset, offset + rows)) is not None:
                used.append(part)
                parts.append(_build_share(ckpt, part, local, name, table))
            offset += rows
        if len(parts) == 1:
            return parts[0]
    return None if any(p is None for p in parts) else _join(ckpt, source, tuple(used), parts)


def _config(cls: type[CausalLM], text: dict, arch: str, where: str) -> ModelConfig:
    """The family's normalized config, with its sizes checked before and its consistency after."""
    check_sizes(text, where)
    cfg = cls.config_from_hf(text, arch, where)
    check_model(cfg, where)
    return cfg


def _check_budgeted(ckpt, mapping: dict[str, Source], params: dict, budgeted: set[str], path: Path) -> None:
    """Experts left in the checkpoint are read at their first use: check now, from the files' headers, that every
    one is there with the shape the config implies, so that a file that disagrees fails at load, not
    mid-generation."""
    for name in sorted(budgeted):
        source = mapping[name]
        missing = [n for n in names_in(source) if n not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} expert tensor(s) for {name} are missing from the checkpoint, e.g. "
                f"'{missing[0]}': the config's expert count and the weights disagree"
            )
        shape, expected = _source_shape(ckpt, source), tuple(params[name].shape)
        if shape != expected:
            raise CheckpointError(
                f"{path}: {_describe(ckpt, source)} gives experts of shape {shape}, but the config implies "
                f"{expected} for {name}: the config and the weights disagree"
            )


def _source_shape(ckpt, source: Source) -> tuple[int, ...] | None:
    """The shape _build would give, from the headers alone (None where the parts disagree)."""
    if isinstance(source, str):
        shape = getattr(ckpt, "shape", None)
        return tuple(shape(source)) if shape is not None else tuple(_build(ckpt, source).shape)
    if isinstance(source, PlusOne):
        return _source_shape(ckpt, source.part)
    shapes = [_source_shape(ckpt, p) for p in source.parts]
    if None in shapes or len({s[1:] if isinstance(source, Cat) else s for s in shapes}) > 1:
        return None
    if isinstance(source, Cat):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (len(shapes), *shapes[0])


def _tier(ckpt, mapping: dict[str, Source], plan: dict[str, QuantSpec], name: str, dtype, device):
    """The slow tier of the Experts module `name`: the mapped checkpoint on CPU, host memory beside a GPU."""
    sources = (mapping[f"{name}.gate_up"], mapping[f"{name}.down"])
    spec = plan.get(f"{name}.gate_up")
    if device.type == "cpu":
        return CheckpointTier(ckpt, sources, dtype, spec)
    built = []
    for s in sources:
        t = _build(ckpt, s)
        if isinstance(t, torch.Tensor):
            t = quantize(t, spec) if spec is not None and quantizable(t, spec) else t.to(dtype)
        built.append(t)
    return HostTier(*built, device)


_SHARED_KV = re.compile(r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def _ignorable(name: str) -> bool:
    # RoPE caches some exporters save; K/V weights of KV-shared layers (unused by design: those
    # layers read an earlier layer's K/V; every other layer's K/V weights are mapped).
    return name.endswith("rotary_emb.inv_freq") or bool(_SHARED_KV.search(name))


def _trim_heap() -> None:
    """Give the quantizer's freed temporaries back to the OS: glibc keeps freed heap memory (its mmap threshold
    grows after large frees), which would otherwise stay in RSS for the process's life."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _quant_plan(model: CausalLM, spec: QuantSpec) -> dict[str, QuantSpec]:
    """Parameter name -> the format it is quantized to (see the module docstring for the choices)."""
    per_row = QuantSpec(8, None)
    plan = {}
    for owner, module in model.named_modules():
        if "router" in owner.split("."):
            continue
        if isinstance(module, Embedding) or owner == "lm_head":
            plan[f"{owner}.weight"] = per_row
        elif isinstance(module, Linear):
            plan[f"{owner}.weight"] = spec
        elif isinstance(module, Experts):
            plan[f"{owner}.gate_up"] = plan[f"{owner}.down"] = spec
    return plan


def _same_storage(a: torch.Tensor | QuantTensor | GGMLRows, b: torch.Tensor | QuantTensor | GGMLRows) -> bool:
    if isinstance(a, GGMLRows):
        return a is b
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()


class _OwnNames:
    """A checkpoint that `hearth quantize` wrote: tensors under our own parameter names, a quantized one as
    NAME.qdata / NAME.scales (/ NAME.mins)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.folder = ckpt, ckpt.folder

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt or f"{name}.qdata" in self.ckpt

    def names(self) -> list[str]:
        return list(dict.fromkeys(re.sub(r"\.(qdata|scales|mins)$", "", n) for n in self.ckpt.names()))

    def file_of(self, name: str) -> Path:
        return self.ckpt.file_of(name if name in self.ckpt else f"{name}.qdata")

    def get(self, name: str) -> torch.Tensor | QuantTensor:
        if name in self.ckpt or f"{name}.qdata" not in self.ckpt:
            return self.ckpt.get(name)
        qdata, scales = self.ckpt.get(f"{name}.qdata"), self.ckpt.get(f"{name}.scales")
        mins = self.ckpt.get(f"{name}.mins") if f"{name}.mins" in self.ckpt else None
        bits = 4 if qdata.dtype == torch.uint8 else 8
        K = qdata.shape[-1] * (2 if bits == 4 else 1)
        try:
            return QuantTensor(qdata, scales, mins, bits, K // scales.shape[-1])
        except ValueError as e:
            raise CheckpointError(f"{self.ckpt.file_of(f'{name}.qdata')}: quantized tensor '{name}': {e}") from None

    def table(self, name: str) -> torch.Tensor | QuantTensor:
        """See Checkpoint.table."""
        return self.get(name)

    def read_into(self, view: torch.Tensor, dst: torch.Tensor) -> bool:
        return self.ckpt.read_into(view, dst)

    def read(self, view: torch.Tensor) -> torch.Tensor:
        return self.ckpt.read(view)

    def release_view(self, view: torch.Tensor) -> None:
        self.ckpt.release_view(view)

    def release(self, name: str) -> None:
        for part in (name, f"{name}.qdata", f"{name}.scales", f"{name}.mins"):
            if part in self.ckpt:
                self.ckpt.release(part)


def stored_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor | QuantTensor:
    """Tensor `name` of a folder `hearth quantize` wrote: a float one as stored, a quantized one rebuilt from its
    NAME.qdata / NAME.scales (/ NAME.mins) parts (the towers read theirs this way: multimodal/towers.py)."""
    return _OwnNames(ckpt).get(name)


def _build(ckpt: Checkpoint, source: Source) -> torch.Tensor | QuantTensor | RowConcat:
    if isinstance(source, str):
        return ckpt.get(source)
    if isinstance(source, PlusOne):
        tensor = ckpt.get(source.part)
        if ckpt.stores_plus_one(source.part):
            return tensor
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{ckpt.folder}: {_describe(ckpt, source)} is quantized; norm weights (1 + w) must be stored as float"
            )
        return tensor.float() + 1
    return _join(ckpt, source, source.parts, [_build(ckpt, p) for p in source.parts])


def _join(ckpt, source: Cat | Stack, used: tuple[Source, ...], parts: list) -> torch.Tensor | QuantTensor | RowConcat:
    """`parts` (built from `used`, those of `source`'s parts they came from) concatenated along the rows (Cat) or
    stacked (Stack); a CheckpointError naming the tensors when their formats or shapes do not join."""
    stack = isinstance(source, Stack)
    if any(not isinstance(p, torch.Tensor) for p in parts):
        try:
            return combine(parts, stack=stack)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.folder}: {_describe(ckpt, source)}: {e}") from None
    if len({p.shape if stack else p.shape[1:] for p in parts}) > 1:
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip((names_in(q)[0] for q in used), parts))
        raise CheckpointError(f"{ckpt.folder}: tensors to combine have mismatched shapes: {shapes}")
    return torch.stack(parts, dim=0) if stack else torch.cat(parts, dim=0)


def _describe(ckpt: Checkpoint, source: Source) -> str:
    names = names_in(source)
    where = ", ".join(f"'{n}' ({ckpt.file_of(n).name})" for n in names[:4])
    return f"tensor {where}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor | QuantTensor | RowConcat) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if isinstance(tensor, nn.Module):  # quantized: a submodule in the parameter's place
        module._parameters.pop(attr, None)
        setattr(module, attr, tensor)
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
