"""What the APIs say about a model without loading its weights: read from its config and tokenizer files, so
that listing and describing every model in the store costs no memory (editors ask /api/show for each one)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..chat_formats import ChatFormat, detect

# Architecture names as Ollama (llama.cpp's GGUF `general.architecture`) writes them; Mistral and Mixtral are
# converted as "llama". Another architecture: its class name, lowercased, without "ForCausalLM".
OLLAMA_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
    "Gemma4ForCausalLM": "gemma4", "Gemma4ForConditionalGeneration": "gemma4",
}  # fmt: skip

# llama.cpp's `general.file_type` (enum llama_ftype) as Ollama prints it in details.quantization_level.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}  # fmt: skip
_DTYPE_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def ollama_architecture(architecture: str) -> str:
    return OLLAMA_ARCHITECTURES.get(architecture) or architecture.removesuffix("ForCausalLM").lower()


@dataclass
class Card:
    """One servable model as the APIs describe it."""

    name: str
    path: Path
    architecture: str  # the checkpoint's class name (config.json's architectures[0])
    context: int
    params: int
    quantization: str  # Ollama's words: BF16, F32, Q4_K_M, INT8...
    template: str | None
    format: ChatFormat
    stops: list[str]  # the tokens that end a reply
    embeds_only: bool = False
    media: frozenset[str] = frozenset()  # "image", "audio": the towers its files hold

    @property
    def family(self) -> str:
        return ollama_architecture(self.architecture)

    @functools.cached_property
    def size(self) -> int:
        p = self.path
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.path.stat().st_mtime, timezone.utc).isoformat()

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.path.resolve()}:{self.path.stat().st_mtime_ns}".encode()).hexdigest()

    @property
    def capabilities(self) -> list[str]:
        """What the model can do, in Ollama's words: "completion" for a generative model, "tools" when its reply
        format has tool calls to parse, "thinking" when it has reasoning markers; "embedding" for a dedicated
        embedding model, as Ollama lists it (a generative model embeds too, by its last token's state, but is not
        listed as an embedding model)."""
        if self.embeds_only:
            return ["embedding"]
        fmt = self.format
        seen = ["vision"] if "image" in self.media else []
        heard = ["audio"] if "audio" in self.media else []
        return (
            ["completion"] + (["tools"] if fmt.parse_calls else []) + (["thinking"] if fmt.think else []) + seen + heard
        )

    @property
    def input_modalities(self) -> list[str]:
        return ["text", *sorted(self.media)]

    def details(self, quant: str | None = None) -> dict[str, Any]:
        params = f"{self.params / 1e9:.1f}B" if self.params >= 1e9 else f"{self.params / 1e6:.1f}M"
        return {
            "parent_model": "", "format": "gguf" if self.path.suffix == ".gguf" else "safetensors",
            "family": self.family, "families": [self.family], "parameter_size": params,
            "quantization_level": (quant or self.quantization).upper(),
        }  # fmt: skip

    def parameters(self) -> str:
        """The Modelfile's PARAMETER lines as Ollama lists them: here the tokens that end a reply."""
        return "\n".join(f"{'stop':<30} {json.dumps(t, ensure_ascii=False)}" for t in self.stops)

    def model_info(self) -> dict[str, Any]:
        return {
            "general.architecture": self.family, "general.basename": self.name.rsplit("/", 1)[-1],
            "general.parameter_count": self.params, f"{self.family}.context_length": self.context,
        }  # fmt: skip


def _quantization(path: Path, meta: dict[str, Any], hf: dict[str, Any]) -> str:
    from ..weights.loader import stored_quant

    if path.suffix == ".gguf":
        return GGUF_FILE_TYPES.get(int(meta.get("general.file_type", -1)), "unknown")
    if quant := stored_quant(path):
        return quant
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    dtype = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return _DTYPE_LEVELS.get(dtype, str(dtype or "unknown"))


@functools.lru_cache(maxsize=256)
def _read(path: Path, mtime_ns: int) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    from .. import fit
    from ..tokenizer import load_tokenizer

    spec = fit.load(path)
    if path.is_dir():  # a sentence-transformers folder's pooling makes it an embedding model
        from ..weights.loader import read_model_config

        spec.config.pooling = read_model_config(path)[1].pooling
    meta: dict[str, Any] = {}
    if path.suffix == ".gguf":
        from ..weights.gguf import GGUFFile

        meta = GGUFFile(path).metadata
        hf: dict[str, Any] = {}
    else:
        hf = json.loads((path / "config.json").read_text())
    has_tokenizer = path.suffix == ".gguf" and "tokenizer.ggml.model" in meta or (path / "tokenizer.json").exists()
    tok = load_tokenizer(path) if has_tokenizer else None
    return spec, meta, hf, tok


def _tensor_names(folder: Path) -> set[str]:
    """The tensor names of a safetensors checkpoint, from its index or its files' headers (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


def _media(path: Path) -> frozenset[str]:
    """The input modalities beyond text whose towers the checkpoint holds (a config alone is not enough)."""
    from ..multimodal.spec import media_spec

    spec = media_spec(path) if path.is_dir() else None
    if spec is None:
        return frozenset()
    names = _tensor_names(path)
    has = {
        kind
        for kind, tower in (("image", "vision_tower."), ("audio", "audio_tower."))
        if any(tower in n for n in names)
    }
    return frozenset(has & spec.modalities)


def card(name: str, path: Path) -> Card:
    """The Card of the model at `path`, listed as `name` (read once per version of its files)."""
    spec, meta, hf, tok = _read(path, path.stat().st_mtime_ns)
    cfg = spec.config
    eos = set(cfg.eos_token_ids)
    stops = sorted(t for i in (tok.stop_token_ids(eos) if tok else eos) if tok is not None and (t := tok.token(i)))
    template = tok.chat_template() if tok is not None else None
    return Card(
        name, path, cfg.architecture, cfg.max_position, spec.params, _quantization(path, meta, hf), template,
        detect(tok.chat_template(with_tools=True) if tok else None), stops, cfg.pooling is not None,
        _media_cached(path, path.stat().st_mtime_ns),
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _media_cached(path: Path, mtime_ns: int) -> frozenset[str]:
    return _media(path)
