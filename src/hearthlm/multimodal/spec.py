"""What a checkpoint says about its media inputs: which towers it has, their shapes, the special token ids, and
whether image tokens attend to each other in both directions (26B-A4B / 31B, `use_bidirectional_attention`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import read_json
from ..models.gemma4_audio import AudioSpec
from ..models.gemma4_vision import VisionSpec


@dataclass(frozen=True)
class MediaSpec:
    folder: Path
    text_hidden: int
    pad_id: int
    vision: VisionSpec | None
    audio: AudioSpec | None
    vision_eps: float
    audio_eps: float
    image_id: int
    boi_id: int
    eoi_id: int
    audio_id: int
    boa_id: int
    eoa_id: int
    bidirectional_images: bool  # soft tokens of one image attend to each other on sliding layers
    mmproj: Path | None = None  # the towers' weights: llama.cpp's mmproj file (a GGUF model), else the folder's

    @property
    def modalities(self) -> set[str]:
        return {"text"} | ({"image"} if self.vision else set()) | ({"audio"} if self.audio else set())


def media_spec(folder: Path, mmproj: Path | None = None) -> MediaSpec | None:
    """The media description of a Gemma 4 checkpoint folder with a vision or audio config, else None. A .gguf file:
    its towers are those of `mmproj` or of the mmproj file found beside it (weights/mmproj.py)."""
    if folder.suffix == ".gguf":
        from ..weights.mmproj import find_mmproj

        if mmproj is not None:
            return gguf_media_spec(folder, mmproj)
        return _beside(folder, find_mmproj(folder))
    if mmproj is not None:
        raise ValueError(f"--mmproj goes with a .gguf model; {folder} keeps its towers in its own safetensors files")
    path = folder / "config.json"
    if not path.exists():
        return None
    hf: dict[str, Any] = read_json(path)
    if hf.get("model_type") != "gemma4" or not (hf.get("vision_config") or hf.get("audio_config")):
        return None
    text = hf.get("text_config") or {}
    vision, audio = hf.get("vision_config"), hf.get("audio_config")
    return MediaSpec(
        folder=folder,
        text_hidden=text["hidden_size"],
        pad_id=text.get("pad_token_id", 0),
        vision=VisionSpec.from_hf(vision) if vision else None,
        audio=AudioSpec.from_hf(audio) if audio else None,
        vision_eps=(vision or {}).get("rms_norm_eps", 1e-6),
        audio_eps=(audio or {}).get("rms_norm_eps", 1e-6),
        image_id=hf.get("image_token_id", 258_880),
        boi_id=hf.get("boi_token_id", 255_999),
        eoi_id=hf.get("eoi_token_id", 258_882),
        audio_id=hf.get("audio_token_id", 258_881),
        boa_id=hf.get("boa_token_id", 256_000),
        eoa_id=hf.get("eoa_token_index", 258_883),
        bidirectional_images=text.get("use_bidirectional_attention") == "vision",
    )


def _beside(text: Path, found: Path | None) -> MediaSpec | None:
    """The towers of an mmproj file found next to a GGUF model; one made for another model is passed over."""
    import warnings

    from ..weights.gguf import GGUFError

    if found is None:
        return None
    try:
        return gguf_media_spec(text, found)
    except GGUFError as e:
        warnings.warn(
            f"{found.name} is beside {text.name} but is not its towers, so it takes text only: {e}", stacklevel=3
        )
        return None


_MARKS = {"image_id": "<|image|>", "boi_id": "<|image>", "eoi_id": "<image|>", "audio_id": "<|audio|>",
          "boa_id": "<|audio>", "eoa_id": "<audio|>"}  # fmt: skip
_DEFAULT_IDS = {"image_id": 258_880, "boi_id": 255_999, "eoi_id": 258_882, "audio_id": 258_881, "boa_id": 256_000,
                "eoa_id": 258_883}  # fmt: skip


def gguf_media_spec(text: Path, mmproj: Path) -> MediaSpec:
    """The media description of a Gemma 4 text GGUF with llama.cpp's mmproj file: tower shapes from the mmproj's
    metadata and tensor shapes, token ids from the text file's vocabulary, bidirectional image spans where the
    model has no per-layer embeddings (26B-A4B, 31B; llama.cpp tells E2B/E4B apart by their width instead)."""
    from ..weights.gguf import GGUFError, GGUFFile
    from ..weights.mmproj import check_mmproj

    model, proj = GGUFFile(text), GGUFFile(mmproj)
    if model.architecture != "gemma4":
        raise GGUFError(f"{text}: a {model.architecture} model: mmproj towers are read for Gemma 4 (gemma4) only")
    kinds = check_mmproj(proj)
    meta, tensors = proj.metadata, proj.tensors
    vocab = model.metadata.get("tokenizer.ggml.tokens") or []
    where = {t: i for i, t in enumerate(vocab) if t in _MARKS.values()}
    vision = _vision_spec(meta, tensors) if "image" in kinds else None
    audio = _audio_spec(meta, tensors) if "audio" in kinds else None
    hidden = model.metadata.get("gemma4.embedding_length")
    width = tensors["mm.input_projection.weight" if vision else "mm.a.input_projection.weight"].shape[0]
    if hidden != width:
        raise GGUFError(f"{mmproj}: its towers project to width {width}, but {text.name} is {hidden} wide: "
                        "use the mmproj file made for this model")  # fmt: skip
    return MediaSpec(
        folder=text.parent, text_hidden=hidden, pad_id=model.metadata.get("tokenizer.ggml.padding_token_id", 0),
        vision=vision, audio=audio, vision_eps=vision.eps if vision else 1e-6, audio_eps=1e-6,
        **{k: where.get(mark, _DEFAULT_IDS[k]) for k, mark in _MARKS.items()},
        bidirectional_images=not model.metadata.get("gemma4.embedding_length_per_layer_input"), mmproj=mmproj,
    )  # fmt: skip


def _vision_spec(meta: dict[str, Any], tensors: dict) -> VisionSpec:
    key = lambda k, default=None: meta.get(f"clip.vision.{k}", default)  # noqa: E731
    hidden, heads = key("embedding_length"), key("attention.head_count")
    return VisionSpec(
        hidden=hidden, intermediate=key("feed_forward_length"), layers=key("block_count"), heads=heads,
        kv_heads=key("attention.head_count_kv", heads), head_dim=key("attention.head_dim", hidden // heads),
        eps=key("attention.layer_norm_epsilon", 1e-6), pool=key("projector.scale_factor", 3),
        patch=key("patch_size", 16), positions=tensors["v.position_embd.weight"].shape[1],
        clipped="v.blk.0.attn_q.input_min" in tensors, standardize="v.std_bias" in tensors,
    )  # fmt: skip


def _audio_spec(meta: dict[str, Any], tensors: dict) -> AudioSpec:
    key = lambda k, default=None: meta.get(f"clip.audio.{k}", default)  # noqa: E731
    return AudioSpec(
        hidden=key("embedding_length"), layers=key("block_count"), heads=key("attention.head_count"),
        channels=(tensors["a.conv1d.0.weight"].shape[0], tensors["a.conv1d.1.weight"].shape[0]),
        conv_kernel=tensors["a.blk.0.conv_dw.weight"].shape[-1], clipped="a.blk.0.attn_q.input_min" in tensors,
        out_dims=tensors["a.pre_encode.out.weight"].shape[0],
    )  # fmt: skip


def default_image_tokens(folder: Path) -> int | None:
    """The soft-token budget per image the checkpoint's processor was saved with (processor_config.json's
    image_seq_length, or its image processor's max_soft_tokens, as transformers' processor reads them); None
    when it records none. A model trained at one budget reads others badly."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if folder.is_dir() and path.is_file():
            cfg = read_json(path)
            inner = cfg.get("image_processor") if isinstance(cfg.get("image_processor"), dict) else {}
            budget = cfg.get("image_seq_length") or inner.get("max_soft_tokens") or cfg.get("max_soft_tokens")
            if isinstance(budget, int) and not isinstance(budget, bool) and budget in (70, 140, 280, 560, 1120):
                return budget
    return None
