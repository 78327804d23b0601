"""A copy of a Gemma 4 MoE checkpoint whose experts are zero-padded to a realistic size, for the page-cache
attacker (A1): on the 25 MB demo, readahead (8 MB windows here) caches every expert whatever was used, which
hides the signal that a real model's 10-20 MB experts give. Padding the experts' intermediate size with
zero rows of gate/up and zero columns of down adds gelu(0) * 0 = 0 to every output: the routing is the same
and the logits equal to rounding (exact wherever the kernels sum the extra zeros exactly)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

COPY = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def pad_experts(src: Path, dst: Path, expert_mb: float = 19.0, owner_only: bool = False) -> Path:
    """Write `src` to `dst` with each expert (gate_up + down) padded to about `expert_mb` MB; files are made
    readable by everyone (0644), as a shared model directory would be: the A1 setting. `owner_only`: 0600 files
    in a 0700 folder instead, as `hearth pull` stores a model. Reuses `dst` if done."""
    cfg = json.loads((src / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg.get("moe_intermediate_size")
    if not cfg.get("enable_moe_block") or inter is None:
        raise ValueError(f"{src}: padding experts needs a Gemma 4 MoE checkpoint (enable_moe_block)")
    target = max(inter, int(expert_mb * 1e6 / (3 * hidden * 2)) // 256 * 256)  # 3 matrices, bf16
    stamp = dst / "padded.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"source": str(src), "intermediate": target}:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(src / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows then up rows
                gate, up = t.chunk(2, dim=1)
                t = torch.cat([_pad(gate, 1, target), _pad(up, 1, target)], dim=1)
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                t = _pad(t, 2, target)
            tensors[name] = t.contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg["moe_intermediate_size"] = target
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in COPY:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    stamp.write_text(json.dumps({"source": str(src), "intermediate": target}))
    for path in [dst, *dst.iterdir()]:
        os.chmod(path, (0o700 if path.is_dir() else 0o600) if owner_only else (0o755 if path.is_dir() else 0o644))
    return dst


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)
