"""A pre-norm decoder layer's whole decode step as one call into the CPU kernels (kernels/decoder_cpu.cpp).

At decode a small model spends as much time between kernels as in them: run module by module, a Llama-style
layer makes about twenty Python-level calls per token, each a few microseconds. The fused step chains the same
kernels on the same values, so it changes no result (tests/test_decode_step.py checks bit equality); it only
drops the Python in between. It applies where the module-by-module path runs those kernels anyway: CPU,
float32 activations, one new token per row, at most cpu.MAX_ROWS rows, a cache that can name the step's slots
(the paged one), and weights the GEMV kernels read. Anything else (other devices, prefill, MoE layers) takes
the module path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu
from ..quant.tensor import QuantTensor, RowConcat
from .attention import Batch
from .mlp import GatedMLP

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _linear(weight, bias: torch.Tensor | None):
    """The kernel-side form of one Linear's weight, or None if the GEMV kernels do not read it."""
    bias = None if bias is None else bias.float().contiguous()
    if isinstance(weight, RowConcat):
        parts = [_linear(p, None) for p in weight.parts]
        return None if None in parts else cpu.decode_linear_concat(parts, bias)
    if isinstance(weight, QuantTensor):
        if len(weight.shape) != 2 or weight.device.type != "cpu":
            return None
        b = weight._buffers
        return cpu.decode_linear(b["qdata"], b["scales"], b["mins"], weight.bits, weight.group, bias)
    if (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.dtype in _FLOAT
        and weight.is_contiguous()
        and weight.device.type == "cpu"
    ):
        return cpu.decode_linear(weight.data, bias=bias)
    return None


def _weight(linear: nn.Module):
    return linear._parameters["weight"] if "weight" in linear._parameters else linear._modules["weight"]


def _norm(norm: nn.Module | None) -> torch.Tensor | None:
    w = None if norm is None else norm.weight
    return w.data if w is not None and w.dtype == torch.float32 and w.device.type == "cpu" else None


def compile_layer(layer: nn.Module):
    """cpu.DecoderLayer for a layer with `input_norm`, `attn`, `post_attn_norm` and a GatedMLP `mlp`, or None
    when the fused step cannot run it (no kernels, weights off the CPU or in a form the kernels do not read)."""
    attn, mlp = layer.attn, layer.mlp
    if not cpu.available() or not isinstance(mlp, GatedMLP) or attn.shared or attn.k_eq_v or attn.v_norm is not None:
        return None
    modules = [layer.input_norm, layer.post_attn_norm, attn.q_norm, attn.k_norm]
    norms = [_norm(n) for n in modules]
    if any(n is not None and w is None for n, w in zip(modules, norms)):
        return None  # a norm weight not (yet) float32 on the CPU
    if len({n.eps for n in modules if n is not None}) != 1:
        return None
    projections = [
        _linear(_weight(m), m._parameters.get("bias")) for m in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
    ]
    if None in projections:
        return None
    eps = layer.input_norm.eps
    return cpu.decoder_layer(
        *norms, *projections, attn.num_heads, attn.num_kv_heads, attn.head_dim, eps, attn.scale, mlp.act
    )


def step(layer: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """The layer's output for decode input x [B, 1, hidden] in one kernel call, or None: run it module by module."""
    if x.dtype != torch.float32 or x.shape[0] > cpu.MAX_ROWS or x.device.type != "cpu":
        return None
    fused = layer.__dict__.get("_decode_step", False)
    if fused is False:  # built on first use, after loading has put every weight in its final form
        fused = layer.__dict__["_decode_step"] = compile_layer(layer)
    if fused is None:
        return None
    slots = batch.cache.decode_slots(layer.attn.layer)
    if slots is None:
        return None
    cos, sin = batch.rope[layer.attn.rope_key]
    return fused.decode(x, cos, sin, *slots)
