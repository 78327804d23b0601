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

    @property
    def modalities(self) -> set[str]:
        return {"text"} | ({"image"} if self.vision else set()) | ({"audio"} if self.audio else set())


def media_spec(folder: Path) -> MediaSpec | None:
    """The media description of a Gemma 4 checkpoint folder with a vision or audio config, else None."""
    path = folder / "config.json"
    if folder.suffix == ".gguf" or not path.exists():
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
