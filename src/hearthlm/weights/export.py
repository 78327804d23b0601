"""Writing a quantized checkpoint folder (`hearth quantize`): the loaded model's tensors under our own
parameter names, so that loading it again is a memory map, not a second quantization.

The folder holds config.json (the source's, plus a quantization_config naming the format), the
tokenizer, chat template and generation config as they were, and model.safetensors. A quantized
weight NAME is stored as NAME.qdata (int8, or uint8 holding two 4-bit values), NAME.scales and, for
asymmetric formats, NAME.mins (float16); bits and group size follow from the shapes.

A multimodal checkpoint's vision and audio towers (and their projections) are copied into towers.safetensors under
their own names and in their own dtype, where multimodal/towers.py finds them. With `towers` (`--quant-towers`) the
weights of their linear layers are stored quantized instead, as NAME.qdata / NAME.scales (/ NAME.mins), and
quantization_config names the format under "towers".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..models.base import CausalLM
from ..quant.quantize import QuantSpec, quantizable, quantize
from .loader import HEARTHLM_QUANT, IGNORED
from .safetensors import Checkpoint, CheckpointError

_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
)
TOWERS = "towers.safetensors"


def write_quantized(model: CausalLM, source: Path, out: Path, fmt: str, towers: QuantSpec | None = None) -> Path:
    """`towers`: quantize the towers' linear layers to this format (None: copy them as stored)."""
    if source.suffix == ".gguf":
        raise CheckpointError(f"{source} is a GGUF file, already quantized: load it directly instead")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == source.resolve():
        raise CheckpointError(f"{out}: write the quantized checkpoint to a new folder, not over its source")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": HEARTHLM_QUANT, "format": fmt}
    if towers is not None:
        config["quantization_config"]["towers"] = towers.name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in _COPIED:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    _copy_sentence_transformers(source, out)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "hearthlm_quant": fmt})
    _copy_towers(source, out, towers)
    return out


def _copy_towers(source: Path, out: Path, quant: QuantSpec | None) -> None:
    """The source's tower tensors, as stored (names and dtype), into out/towers.safetensors, their linear layers'
    weights quantized to `quant` when given; nothing when the source has no towers."""
    ckpt = Checkpoint(source)
    names = [n for n in ckpt.names() if n.startswith(IGNORED)]
    if not names:
        return
    linear = set()
    if quant is not None:
        from ..multimodal.spec import media_spec
        from ..multimodal.towers import linear_weights

        linear = linear_weights(media_spec(source), ckpt)
    tensors = {}
    for name in names:
        tensor = ckpt.get(name)
        if name in linear and quantizable(tensor, quant):
            q = quantize(tensor, quant)
            parts = {"qdata": q.qdata, "scales": q.scales, "mins": q.mins}
            tensors |= {f"{name}.{k}": t.contiguous() for k, t in parts.items() if t is not None}
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / TOWERS), metadata={"format": "pt"})


def _copy_sentence_transformers(source: Path, out: Path) -> None:
    """An embedding model's sentence-transformers layout (modules.json, its Pooling / Dense / Normalize folders,
    sentence_bert_config.json), copied as it is: without it the copy would pool and project differently."""
    modules = source / "modules.json"
    if not modules.is_file():
        return
    shutil.copyfile(modules, out / "modules.json")
    for name in ("sentence_bert_config.json", "config_sentence_transformers.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for m in json.loads(modules.read_text()):
        sub = str(m.get("path") or "")
        if sub and (source / sub).is_dir() and Path(sub).name == sub:  # a sub-folder of the model, by name only
            shutil.copytree(source / sub, out / sub, dirs_exist_ok=True)
