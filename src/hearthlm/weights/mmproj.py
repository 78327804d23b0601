"""llama.cpp's multimodal projector files (`mmproj-*.gguf`) for Gemma 4: the vision tower (projector type
`gemma4v`) and the audio tower (`gemma4a`), read as the towers of a text GGUF.

Facts from llama.cpp (tools/mtmd/clip-impl.h, clip.cpp; the converter's Gemma4VisionAudioModel):
- metadata `general.type` = "mmproj"; `clip.has_vision_encoder` / `clip.has_audio_encoder`;
  `clip.vision.projector_type` = "gemma4v", `clip.audio.projector_type` = "gemma4a" (or `clip.projector_type`
  for a file with one tower); sizes under `clip.vision.*` / `clip.audio.*` (embedding_length,
  feed_forward_length, block_count, attention.head_count, attention.head_count_kv, attention.head_dim,
  attention.layer_norm_epsilon, patch_size, projector.scale_factor (the pooling kernel), projection_dim).
  What the file does not say, llama.cpp fixes as the released models have it (RoPE theta 100, GELU-tanh,
  the audio tower's attention context and caps): the defaults of VisionSpec / AudioSpec.
- tensors: `v.*` (vision), `a.*` (audio), `mm.input_projection.weight` and `mm.a.input_projection.weight`
  (embed_vision / embed_audio); clipped linear layers keep their bounds as NAME.input_min ... 1-element tensors.
- the converter rewrites some tensors: the patch embedding as [out, 3, p, p] (ours: [out, p * p * 3], channels
  last), the audio depthwise convolution as [C, K] (ours: [C, 1, K]), the audio per_dim_scale through softplus
  (ours: before it), scalars as 1-element vectors. They are undone here, so the towers run unchanged.

Found beside a text GGUF: a file in the same folder whose name contains "mmproj" (`mmproj-F16.gguf`,
`mmproj-model-f16.gguf`, `gemma-4-E2B-it-mmproj-bf16.gguf`), preferring the widest float type, or given by path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..quant import ggml
from .gguf import GGUFError, GGUFFile

PROJECTORS = {"gemma4v": "image", "gemma4a": "audio"}
_PREFERENCE = ("f32", "bf16", "f16", "q8_0")  # a folder holding several mmproj files: the first kind found wins

# (Hugging Face name under model.vision_tower. / model.audio_tower., llama.cpp name); {i}: a layer.
# Linear layers are named by their weight; bounds of clipped layers follow the same stem.
_VISION = [
    ("patch_embedder.input_proj.weight", "v.patch_embd.weight"),
    ("patch_embedder.position_embedding_table", "v.position_embd.weight"),
    ("std_bias", "v.std_bias"),
    ("std_scale", "v.std_scale"),
    ("encoder.layers.{i}.self_attn.q_proj.linear", "v.blk.{i}.attn_q"),
    ("encoder.layers.{i}.self_attn.k_proj.linear", "v.blk.{i}.attn_k"),
    ("encoder.layers.{i}.self_attn.v_proj.linear", "v.blk.{i}.attn_v"),
    ("encoder.layers.{i}.self_attn.o_proj.linear", "v.blk.{i}.attn_out"),
    ("encoder.layers.{i}.self_attn.q_norm.weight", "v.blk.{i}.attn_q_norm.weight"),
    ("encoder.layers.{i}.self_attn.k_norm.weight", "v.blk.{i}.attn_k_norm.weight"),
    ("encoder.layers.{i}.mlp.gate_proj.linear", "v.blk.{i}.ffn_gate"),
    ("encoder.layers.{i}.mlp.up_proj.linear", "v.blk.{i}.ffn_up"),
    ("encoder.layers.{i}.mlp.down_proj.linear", "v.blk.{i}.ffn_down"),
    ("encoder.layers.{i}.input_layernorm.weight", "v.blk.{i}.ln1.weight"),
    ("encoder.layers.{i}.post_attention_layernorm.weight", "v.blk.{i}.attn_post_norm.weight"),
    ("encoder.layers.{i}.pre_feedforward_layernorm.weight", "v.blk.{i}.ln2.weight"),
    ("encoder.layers.{i}.post_feedforward_layernorm.weight", "v.blk.{i}.ffn_post_norm.weight"),
]
_AUDIO = [
    ("subsample_conv_projection.layer{i}.conv.weight", "a.conv1d.{i}.weight"),
    ("subsample_conv_projection.layer{i}.norm.weight", "a.conv1d.{i}.norm.weight"),
    ("subsample_conv_projection.input_proj_linear.weight", "a.input_projection.weight"),
    ("layers.{i}.feed_forward1.ffw_layer_1.linear", "a.blk.{i}.ffn_up"),
    ("layers.{i}.feed_forward1.ffw_layer_2.linear", "a.blk.{i}.ffn_down"),
    ("layers.{i}.feed_forward1.pre_layer_norm.weight", "a.blk.{i}.ffn_norm.weight"),
    ("layers.{i}.feed_forward1.post_layer_norm.weight", "a.blk.{i}.ffn_post_norm.weight"),
    ("layers.{i}.feed_forward2.ffw_layer_1.linear", "a.blk.{i}.ffn_up_1"),
    ("layers.{i}.feed_forward2.ffw_layer_2.linear", "a.blk.{i}.ffn_down_1"),
    ("layers.{i}.feed_forward2.pre_layer_norm.weight", "a.blk.{i}.ffn_norm_1.weight"),
    ("layers.{i}.feed_forward2.post_layer_norm.weight", "a.blk.{i}.ffn_post_norm_1.weight"),
    ("layers.{i}.self_attn.per_dim_scale", "a.blk.{i}.per_dim_scale.weight"),
    ("layers.{i}.self_attn.q_proj.linear", "a.blk.{i}.attn_q"),
    ("layers.{i}.self_attn.k_proj.linear", "a.blk.{i}.attn_k"),
    ("layers.{i}.self_attn.v_proj.linear", "a.blk.{i}.attn_v"),
    ("layers.{i}.self_attn.post.linear", "a.blk.{i}.attn_out"),
    ("layers.{i}.self_attn.relative_k_proj.weight", "a.blk.{i}.attn_k_rel.weight"),
    ("layers.{i}.lconv1d.linear_start.linear", "a.blk.{i}.conv_pw1"),
    ("layers.{i}.lconv1d.linear_end.linear", "a.blk.{i}.conv_pw2"),
    ("layers.{i}.lconv1d.depthwise_conv1d.weight", "a.blk.{i}.conv_dw.weight"),
    ("layers.{i}.lconv1d.pre_layer_norm.weight", "a.blk.{i}.conv_norm.weight"),  # llama.cpp's names of these
    ("layers.{i}.lconv1d.conv_norm.weight", "a.blk.{i}.norm_conv.weight"),  # two norms are swapped, as written
    ("layers.{i}.norm_pre_attn.weight", "a.blk.{i}.attn_pre_norm.weight"),
    ("layers.{i}.norm_post_attn.weight", "a.blk.{i}.attn_post_norm.weight"),
    ("layers.{i}.norm_out.weight", "a.blk.{i}.ln2.weight"),
    ("output_proj.weight", "a.pre_encode.out.weight"),
    ("output_proj.bias", "a.pre_encode.out.bias"),
]
_PROJECTIONS = {
    "model.embed_vision.embedding_projection.weight": "mm.input_projection.weight",
    "model.embed_audio.embedding_projection.weight": "mm.a.input_projection.weight",
}
_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def _rules() -> list[tuple[re.Pattern, str]]:
    """Regexes over Hugging Face names -> llama.cpp name templates for re.Match.expand."""
    out = []
    for prefix, table in (("model.vision_tower.", _VISION), ("model.audio_tower.", _AUDIO)):
        for hf, gg in table:
            layered = "{i}" in hf
            target = gg.replace("{i}", r"\1")
            base = re.escape(prefix + hf).replace(r"\{i\}", r"(\d+)")
            if hf.endswith(".linear"):  # NAME.linear.weight -> STEM.weight; NAME.input_min -> STEM.input_min
                out.append((re.compile(base + r"\.weight$"), target + ".weight"))
                stem = base[: -len(re.escape(".linear"))]
                bound = r"\2" if layered else r"\1"
                out.append((re.compile(stem + r"\.(" + "|".join(_BOUNDS) + ")$"), target + "." + bound))
            else:
                out.append((re.compile(base + "$"), target))
    return out


_RULES = _rules()


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp mmproj name of a tower tensor's Hugging Face name, None for a name with no counterpart."""
    if hf_name in _PROJECTIONS:
        return _PROJECTIONS[hf_name]
    for pattern, target in _RULES:
        if m := pattern.match(hf_name):
            return m.expand(target)
    return None


# -- finding and describing an mmproj file ----------------------------------------------------------------------


def find_mmproj(text_gguf: Path) -> Path | None:
    """The mmproj file beside a text GGUF, as llama.cpp's and the Hub's repositories name them, else None."""
    folder = text_gguf.parent
    found = [
        p
        for p in folder.glob("*.gguf")
        if "mmproj" in p.name.lower() and p.resolve() != text_gguf.resolve() and p.is_file()
    ]
    if not found:
        return None

    def rank(p: Path) -> tuple[int, str]:
        name = p.stem.lower()
        kind = next((i for i, k in enumerate(_PREFERENCE) if re.search(rf"(^|[-_.]){k}($|[-_.])", name)), 99)
        return kind, p.name

    return min(found, key=rank)


def projectors(meta: dict) -> dict[str, str]:
    """{"image" | "audio": projector type} of an mmproj file's metadata (towers of other kinds included)."""
    out = {}
    single = meta.get("clip.projector_type")
    for kind, tower in (("vision", "image"), ("audio", "audio")):
        if meta.get(f"clip.has_{kind}_encoder"):
            proj = meta.get(f"clip.{kind}.projector_type") or single
            if isinstance(proj, str):
                out[tower] = proj
    return out


def check_mmproj(gguf: GGUFFile) -> dict[str, str]:
    """The projectors of an mmproj file, refusing a file that is not one or holds no Gemma 4 tower."""
    meta = gguf.metadata
    if meta.get("general.type") != "mmproj" and gguf.metadata.get("general.architecture") != "clip":
        raise GGUFError(f"{gguf.path}: not a multimodal projector (mmproj) file: general.type is not 'mmproj'")
    found = projectors(meta)
    unknown = {k: v for k, v in found.items() if v not in PROJECTORS}
    if not found or unknown:
        what = ", ".join(f"{k}: {v}" for k, v in (unknown or found).items()) or "none"
        raise GGUFError(
            f"{gguf.path}: projector types {what}: hearthlm reads Gemma 4's ('gemma4v' for images, 'gemma4a' for "
            "audio); use the mmproj file made for this model"
        )
    return found


def mmproj_inputs(path: Path) -> set[str]:
    """The inputs an mmproj file's towers take ({"image", "audio"}); empty for a file that cannot be read."""
    try:
        return {PROJECTORS[p] for p in check_mmproj(GGUFFile(path)).values()}
    except (GGUFError, OSError, ValueError):
        return set()


# -- reading ----------------------------------------------------------------------------------------------------


def _undo(hf_name: str) -> Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]:
    """What the converter did to a tensor, undone: (tensor as read, our shape) -> tensor in our layout."""
    if hf_name.endswith("patch_embedder.input_proj.weight"):
        return lambda t, shape: t.permute(0, 2, 3, 1).reshape(shape) if t.dim() == 4 else t.reshape(shape)
    if hf_name.endswith("per_dim_scale"):  # stored as softplus(x): x = y + log(1 - exp(-y))
        return lambda t, shape: (t + torch.log(-torch.expm1(-t.double())).to(t.dtype)).reshape(shape)
    return lambda t, shape: t.reshape(shape)


class MmprojCheckpoint:
    """An mmproj file addressed by Hugging Face tower names (what multimodal/towers.py reads a folder by)."""

    def __init__(self, path: Path):
        self.gguf = GGUFFile(path)
        self.folder = self.gguf.path
        check_mmproj(self.gguf)

    def __contains__(self, name: str) -> bool:
        g = gguf_name(name)
        return g is not None and g in self.gguf.tensors

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The float tensor for `name` in our layout (`shape`: the shape the tower expects; the file's otherwise)."""
        g = gguf_name(name)
        if g is None or g not in self.gguf.tensors:
            raise GGUFError(f"{self.gguf.path}: tensor '{g or name}' (for {name}) is missing from the mmproj file")
        info = self.gguf.tensors[g]
        try:
            t = ggml.dequantize(self.gguf.raw(g), info.ggml_type, info.shape).float()
        except ggml.GGMLTypeError as e:
            raise GGUFError(f"{self.gguf.path}: tensor '{g}': {e}") from None
        if shape is None or t.numel() != _numel(shape):
            return t
        return _undo(name)(t, tuple(shape))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
