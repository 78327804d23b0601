"""Build a model from a Hugging Face checkpoint folder.

The model is constructed on the meta device (no memory), then every parameter is filled from its
weight-map source: tensors come memory-mapped, are combined (fused qkv, stacked experts) and
converted one at a time, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from ..config import ModelConfig, as_id_list, read_json
from ..models import resolve
from ..models.base import CausalLM
from ..weights.mapping import Cat, Source, Stack, names_in
from .safetensors import Checkpoint, CheckpointError

# Text-model prefixes, most specific first: multimodal wrapper, then CausalLM.
PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
# Towers of multimodal checkpoints: never read.
IGNORED = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.embed_vision.",
    "model.embed_audio.",
    "vision_tower.",
    "audio_tower.",
    "multi_modal_projector.",
)


def read_model_config(folder: Path) -> tuple[type[CausalLM], ModelConfig]:
    path = folder / "config.json"
    hf = read_json(path)
    cls, arch, text = resolve(hf, str(path))
    cfg = cls.config_from_hf(text, arch, str(path))
    gen = folder / "generation_config.json"
    if gen.exists():
        extra = as_id_list(read_json(gen).get("eos_token_id"))
        cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + extra))
    return cls, cfg


def load_model(folder: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    cls, cfg = read_model_config(folder)
    with torch.device("meta"):
        model = cls(cfg)
    ckpt = Checkpoint(folder)
    prefix = next((p for p in PREFIXES if f"{p}embed_tokens.weight" in ckpt), None)
    if prefix is None:
        raise CheckpointError(f"{folder}: no embed_tokens.weight under any known prefix {PREFIXES}")
    mapping = model.weight_map(prefix)
    keep = getattr(model, "keep_storage_dtype", set())
    params = dict(model.named_parameters())
    unmapped = set(params) - set(mapping)
    assert not unmapped, f"weight map of {cls.__name__} misses {sorted(unmapped)}"
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"loading {folder.name}", total=len(mapping))
        for name, source in mapping.items():
            tensor = _build(ckpt, source)
            expected = tuple(params[name].shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"{folder}: {_describe(ckpt, source)} has shape {tuple(tensor.shape)}, "
                    f"but the config implies {expected} for {name}: config.json and weights disagree"
                )
            built = tensor
            if name not in keep or tensor.device != device:
                tensor = tensor.to(device=device, dtype=tensor.dtype if name in keep else dtype)
            _set_param(model, name, tensor)
            if not isinstance(source, str) or tensor.data_ptr() != built.data_ptr():
                for part in names_in(source):  # copied (fused, converted or moved): free the file's pages
                    ckpt.release(part)
            progress.advance(task)
    used = {n for s in mapping.values() for n in names_in(s)}
    unexpected = [n for n in ckpt.names() if n not in used and not n.startswith(IGNORED)]
    unexpected = [n for n in unexpected if not _ignorable(n)]
    if unexpected:
        warnings.warn(
            f"{folder}: {len(unexpected)} checkpoint tensor(s) not used by {cfg.architecture}, e.g. {unexpected[:3]}",
            stacklevel=2,
        )
    for module in model.modules():  # let layers prepare derived state (e.g. float32 norm weights)
        if hasattr(module, "after_load"):
            module.after_load()
    return model.eval()


_SHARED_KV = re.compile(r"self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def _ignorable(name: str) -> bool:
    # RoPE caches some exporters save; K/V weights of KV-shared layers (unused by design: those
    # layers read an earlier layer's K/V; every other layer's K/V weights are mapped).
    return name.endswith("rotary_emb.inv_freq") or bool(_SHARED_KV.search(name))


def _build(ckpt: Checkpoint, source: Source) -> torch.Tensor:
    if isinstance(source, str):
        return ckpt.get(source)
    parts = [_build(ckpt, p) for p in source.parts]
    if len({p.shape[1:] if isinstance(source, Cat) else p.shape for p in parts}) > 1:
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip((names_in(q)[0] for q in source.parts), parts))
        raise CheckpointError(f"{ckpt.folder}: tensors to combine have mismatched shapes: {shapes}")
    if isinstance(source, Cat):
        return torch.cat(parts, dim=0)
    if isinstance(source, Stack):
        return torch.stack(parts, dim=0)
    raise TypeError(source)


def _describe(ckpt: Checkpoint, source: Source) -> str:
    names = names_in(source)
    where = ", ".join(f"'{n}' ({ckpt.file_of(n).name})" for n in names[:4])
    return f"tensor {where}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
