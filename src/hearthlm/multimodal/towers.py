"""The vision and audio towers of a checkpoint, loaded on first use (text-only use never reads or holds them),
and batched encoding of preprocessed images and audio clips into text-width embeddings.

Tower weights are read from the same safetensors files as the text model (the text loader skips them), or from
llama.cpp's mmproj file beside a GGUF model (weights/mmproj.py), and kept in the dtype the towers compute in
(models/gemma4_media.tower_dtype).

Quantized towers (`LLM(..., quant=..., quant_towers=True)`, `hearth quantize --quant-towers`): the weights of the
clipped linear layers and of the projections take the text model's int8 / int4 format, where their input width
allows it (a multiple of 32 and of the int4 group); the patch embedding, position table, norms, clip bounds, the
audio tower's subsampling convolutions and its three plain linear layers stay as they are. A folder that
`hearth quantize --quant-towers` wrote stores them as NAME.qdata / NAME.scales (/ NAME.mins) in towers.safetensors,
and they load quantized whatever is asked.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ..config import read_json
from ..models.gemma4_audio import AudioTower
from ..models.gemma4_media import ClippedLinear, Projection, tower_dtype
from ..models.gemma4_vision import VisionTower
from ..quant.quantize import QuantSpec, parse_quant, quantizable, quantize
from ..quant.tensor import QuantTensor
from ..weights.loader import stored_quant, stored_tensor
from ..weights.mmproj import MmprojCheckpoint
from ..weights.safetensors import Checkpoint, CheckpointError
from .audio import AudioClip
from .errors import ModalityError
from .image import ImagePatches
from .spec import MediaSpec

# Where Gemma4ForConditionalGeneration checkpoints keep the towers, most specific first.
_PREFIXES = ("model.", "")


class Towers:
    """`encode_images` / `encode_audio`: preprocessed inputs -> one [tokens, text_hidden] tensor each."""

    def __init__(self, spec: MediaSpec, dtype: torch.dtype, device: torch.device, quant: QuantSpec | None = None):
        """`quant`: quantize the linear layers' float weights to this format as they load (see the module docstring)."""
        self.spec, self.device, self.quant = spec, device, quant
        self.dtype = tower_dtype(device, dtype)
        self._loaded: dict[str, tuple[nn.Module, Projection]] = {}
        self._lock = threading.Lock()

    def loaded(self) -> set[str]:
        """The towers in memory now ("vision", "audio")."""
        return set(self._loaded)

    def _get(self, kind: str) -> tuple[nn.Module, Projection]:
        with self._lock:
            if kind not in self._loaded:
                self._loaded[kind] = self._load(kind)
            return self._loaded[kind]

    def _load(self, kind: str) -> tuple[nn.Module, Projection]:
        ckpt = MmprojCheckpoint(self.spec.mmproj) if self.spec.mmproj is not None else Checkpoint(self.spec.folder)
        tower, proj, names = _skeleton(self.spec, kind, _prefix(self.spec, kind, ckpt))
        head = names.pop("proj.weight")
        _fill(tower, names, ckpt, self.dtype, self.device, self.quant)
        _fill(proj, {"weight": head}, ckpt, self.dtype, self.device, self.quant)
        return tower.eval(), proj.eval()

    @torch.inference_mode()
    def encode_images(self, images: list[ImagePatches]) -> list[torch.Tensor]:
        """All images in one padded batch through the vision tower and its projection."""
        if not images:
            return []
        tower, proj = self._get("vision")
        # Padded to a multiple of 64 patches, as the reference's fixed budget * 9 mostly is: attention's vectorised
        # softmax rounds the last partial vector of keys otherwise, and a real patch there rounds differently.
        P = -(-max(im.patches.shape[0] for im in images) // 64) * 64
        pixels = torch.zeros(len(images), P, images[0].patches.shape[1])
        xy = torch.full((len(images), P, 2), -1, dtype=torch.long)
        for i, im in enumerate(images):
            n = im.patches.shape[0]
            pixels[i, :n], xy[i, :n] = torch.from_numpy(im.patches), torch.from_numpy(im.positions)
        pooled = tower(pixels.to(self.device), xy.to(self.device), self.dtype)
        return _project(proj, [p.to(self.dtype) for p in pooled])

    @torch.inference_mode()
    def encode_audio(self, clips: list[AudioClip]) -> list[torch.Tensor]:
        """All clips in one padded batch through the audio tower and its projection."""
        if not clips:
            return []
        tower, proj = self._get("audio")
        F_ = max(c.features.shape[0] for c in clips)
        feats = torch.zeros(len(clips), F_, clips[0].features.shape[1])
        for i, c in enumerate(clips):
            feats[i, : c.features.shape[0]] = torch.from_numpy(c.features)
        out = tower(feats.to(self.device), [c.features.shape[0] for c in clips], self.dtype)
        return _project(proj, out)


def _project(proj: Projection, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every item's tower output through the projection as one matrix, as the reference projects its padded
    batch: a matrix of a few rows goes down another GEMM kernel, with other rounding."""
    return list(proj(torch.cat(outputs)).split([o.shape[0] for o in outputs]))


def tower_quant(want: bool, path: Path, media: MediaSpec | None, quant: QuantSpec | None) -> QuantSpec | None:
    """The format of the towers' linear layers: with `want` (LLM's quant_towers), the text model's (`quant`, or the
    format of a folder `hearth quantize` wrote); without it, the format such a folder stores its towers in (None:
    float, as stored). Bad combinations are refused before any weight loads."""
    if not want:
        q = read_json(path / "config.json").get("quantization_config") if (path / "config.json").is_file() else None
        return parse_quant(q["towers"]) if isinstance(q, dict) and q.get("towers") else None
    if path.suffix == ".gguf":
        raise ValueError(
            f"quant_towers quantizes the towers of a checkpoint folder; {path.name} is a GGUF model, whose towers are "
            "llama.cpp's mmproj file: use a quantized mmproj file (e.g. mmproj-Q8_0.gguf) instead"
        )
    if media is None:
        raise ValueError(f"{path.name} has no vision or audio tower: quant_towers has nothing to quantize; drop it")
    if quant is None:
        stored = stored_quant(path)
        if stored is None:
            raise ValueError(
                "quant_towers quantizes the towers in the text model's format, and the text model is not quantized: "
                "add quant='int8' or 'int4' (--quant int8 --quant-towers)"
            )
        quant = parse_quant(stored)
    return quant


_PROBE = {"vision": "patch_embedder.input_proj.weight", "audio": "output_proj.weight"}


def _prefix(spec: MediaSpec, kind: str, ckpt: Checkpoint | MmprojCheckpoint) -> str:
    """Where the checkpoint keeps the `kind` tower's tensors ("model." or "")."""
    if (spec.vision if kind == "vision" else spec.audio) is None:
        raise ModalityError(f"{spec.folder.name} has no {kind} tower")
    prefix = next((p for p in _PREFIXES if f"{p}{kind}_tower.{_PROBE[kind]}" in ckpt), None)
    if prefix is None:
        raise CheckpointError(
            f"{spec.folder}: config.json describes a {kind} tower but the checkpoint has no {kind}_tower tensors "
            f"(a text-only download?): fetch the full checkpoint to use {kind} input"
        )
    return prefix


def _skeleton(spec: MediaSpec, kind: str, prefix: str) -> tuple[nn.Module, Projection, dict[str, str]]:
    """The `kind` tower and its projection on the meta device, and our parameter names -> checkpoint names (the
    projection's weight as "proj.weight")."""
    with torch.device("meta"):
        tower = VisionTower(spec.vision) if kind == "vision" else AudioTower(spec.audio)
        width = spec.vision.hidden if kind == "vision" else spec.audio.out_dims
        proj = Projection(width, spec.text_hidden, spec.vision_eps if kind == "vision" else spec.audio_eps)
    names = tower.weight_names(f"{prefix}{kind}_tower.")
    return tower, proj, names | {"proj.weight": f"{prefix}embed_{kind}.embedding_projection.weight"}


def linear_weights(spec: MediaSpec, ckpt: Checkpoint) -> set[str]:
    """Checkpoint names of the towers' weights that `quant_towers` quantizes: the clipped linear layers' and the
    projections' (`hearth quantize --quant-towers` writes these quantized)."""
    out = set()
    for kind in ("vision", "audio"):
        if (spec.vision if kind == "vision" else spec.audio) is not None:
            tower, _, names = _skeleton(spec, kind, _prefix(spec, kind, ckpt))
            out.add(names.pop("proj.weight"))
            out |= {theirs for ours, theirs in names.items() if _is_linear_weight(tower, ours)}
    return out


def _is_linear_weight(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    return attr == "weight" and isinstance(target, (ClippedLinear, Projection))


def _fill(
    module: nn.Module,
    names: dict[str, str],
    ckpt: Checkpoint | MmprojCheckpoint,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantSpec | None = None,
) -> None:
    """Give every parameter of a meta-device module its checkpoint tensor, converted to dtype on device (a linear
    layer's weight quantized to `quant` when given, or as stored when the checkpoint holds it quantized)."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(names))
    assert not missing, f"no checkpoint names for {missing[:4]}"
    for ours, theirs in names.items():
        tensor = _read(ckpt, theirs, tuple(params[ours].shape))
        owner, _, attr = ours.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if quant is not None and isinstance(tensor, torch.Tensor) and _is_linear_weight(module, ours):
            tensor = quantize(tensor, quant) if quantizable(tensor, quant) else tensor
        if isinstance(tensor, QuantTensor):  # a submodule in the parameter's place, as the text loader does
            target._parameters.pop(attr)
            setattr(target, attr, tensor.to(device))
            continue
        keep = _keeps_half(target, tensor, dtype, device)
        tensor = tensor.to(device=device, dtype=tensor.dtype if keep else dtype, copy=True)
        setattr(target, attr, nn.Parameter(tensor, requires_grad=False))


def _read(ckpt: Checkpoint | MmprojCheckpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor | QuantTensor:
    """Tensor `name` of the checkpoint, checked against the `shape` the config implies; a quantized one (stored as
    NAME.qdata / NAME.scales by `hearth quantize --quant-towers`) as a QuantTensor."""
    if isinstance(ckpt, MmprojCheckpoint):
        tensor = ckpt.get(name, shape) if name in ckpt else None  # its layout undone
    else:
        tensor = stored_tensor(ckpt, name) if name in ckpt or f"{name}.qdata" in ckpt else None
    if tensor is None:
        raise CheckpointError(f"{ckpt.folder}: tensor '{name}' is missing")
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{ckpt.folder}: '{name}' has shape {tuple(tensor.shape)}, the config implies {shape}")
    return tensor


def _keeps_half(owner: nn.Module, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """A float32 tower on the CPU keeps its linear layers' bf16 / fp16 weights as stored: layers.linear computes with
    them in float32 (the AMX-BF16 GEMM where the CPU has it, an exact upcast otherwise), in half the memory."""
    half = tensor.dtype in (torch.bfloat16, torch.float16) and tensor.dim() == 2
    return half and dtype == torch.float32 and device.type == "cpu" and isinstance(owner, (ClippedLinear, Projection))
