"""The vision and audio towers of a checkpoint, loaded on first use (text-only use never reads or holds them),
and batched encoding of preprocessed images and audio clips into text-width embeddings.

Tower weights are read from the same safetensors files as the text model (the text loader skips them), or from
llama.cpp's mmproj file beside a GGUF model (weights/mmproj.py), and kept in the dtype the towers compute in
(models/gemma4_media.tower_dtype).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..models.gemma4_audio import AudioTower
from ..models.gemma4_media import ClippedLinear, Projection, tower_dtype
from ..models.gemma4_vision import VisionTower
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

    def __init__(self, spec: MediaSpec, dtype: torch.dtype, device: torch.device):
        self.spec, self.device = spec, device
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
        s = self.spec
        tower_spec = s.vision if kind == "vision" else s.audio
        if tower_spec is None:
            raise ModalityError(f"{s.folder.name} has no {kind} tower")
        ckpt = MmprojCheckpoint(s.mmproj) if s.mmproj is not None else Checkpoint(s.folder)
        prefix = next((p for p in _PREFIXES if f"{p}{kind}_tower.{_PROBE[kind]}" in ckpt), None)
        if prefix is None:
            raise CheckpointError(
                f"{s.folder}: config.json describes a {kind} tower but the checkpoint has no {kind}_tower tensors "
                f"(a text-only download?): fetch the full checkpoint to use {kind} input"
            )
        with torch.device("meta"):
            tower = VisionTower(s.vision) if kind == "vision" else AudioTower(s.audio)
            width = s.vision.hidden if kind == "vision" else s.audio.out_dims
            proj = Projection(width, s.text_hidden, s.vision_eps if kind == "vision" else s.audio_eps)
        names = tower.weight_names(f"{prefix}{kind}_tower.")
        _fill(tower, names, ckpt, self.dtype, self.device)
        _fill(proj, {"weight": f"{prefix}embed_{kind}.embedding_projection.weight"}, ckpt, self.dtype, self.device)
        return tower.eval(), proj.eval()

    @torch.inference_mode()
    def encode_images(self, images: list[ImagePatches]) -> list[torch.Tensor]:
        """All images in one padded batch through the vision tower and its projection."""
        if not images:
            return []
        tower, proj = self._get("vision")
        P = max(im.patches.shape[0] for im in images)
        pixels = torch.zeros(len(images), P, images[0].patches.shape[1])
        xy = torch.full((len(images), P, 2), -1, dtype=torch.long)
        for i, im in enumerate(images):
            n = im.patches.shape[0]
            pixels[i, :n], xy[i, :n] = torch.from_numpy(im.patches), torch.from_numpy(im.positions)
        pooled = tower(pixels.to(self.device), xy.to(self.device), self.dtype)
        return [proj(p.to(self.dtype)) for p in pooled]

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
        return [proj(o) for o in out]


_PROBE = {"vision": "patch_embedder.input_proj.weight", "audio": "output_proj.weight"}


def _fill(
    module: nn.Module,
    names: dict[str, str],
    ckpt: Checkpoint | MmprojCheckpoint,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Give every parameter of a meta-device module its checkpoint tensor, converted to dtype on device."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(names))
    assert not missing, f"no checkpoint names for {missing[:4]}"
    for ours, theirs in names.items():
        if theirs not in ckpt:
            raise CheckpointError(f"{ckpt.folder}: tensor '{theirs}' is missing")
        mine = tuple(params[ours].shape)
        tensor = ckpt.get(theirs, mine) if isinstance(ckpt, MmprojCheckpoint) else ckpt.get(theirs)  # its layout undone
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise CheckpointError(
                f"{ckpt.folder}: '{theirs}' has shape {tuple(tensor.shape)}, the config implies {tuple(params[ours].shape)}"
            )
        owner, _, attr = ours.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        keep = _keeps_half(target, tensor, dtype, device)
        tensor = tensor.to(device=device, dtype=tensor.dtype if keep else dtype, copy=True)
        setattr(target, attr, nn.Parameter(tensor, requires_grad=False))


def _keeps_half(owner: nn.Module, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """A float32 tower on the CPU keeps its linear layers' bf16 / fp16 weights as stored: layers.linear computes with
    them in float32 (the AMX-BF16 GEMM where the CPU has it, an exact upcast otherwise), in half the memory."""
    half = tensor.dtype in (torch.bfloat16, torch.float16) and tensor.dim() == 2
    return half and dtype == torch.float32 and device.type == "cpu" and isinstance(owner, (ClippedLinear, Projection))
