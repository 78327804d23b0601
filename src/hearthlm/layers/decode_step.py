"""A decoder layer's whole decode step as one call into the CPU kernels (kernels/decoder_cpu.cpp): the dense
layers of Llama, Mistral, Qwen2/3, Gemma 3 and Gemma 4.

At decode a small model spends as much time between kernels as in them: run module by module, a Llama-style
layer makes about twenty Python-level calls per token, each a few microseconds. The fused step chains the same
kernels on the same values, so it changes no result (tests/test_decode_step.py checks bit equality); it only
drops the Python in between. It applies where the module-by-module path runs those kernels anyway: CPU,
float32 activations, one new token per row, at most cpu.MAX_DECODE_ROWS rows, a cache that can name the step's slots
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


def _norm(norm: nn.Module) -> torch.Tensor | None:
    w = norm.weight
    return w.data if w is not None and w.dtype == torch.float32 and w.device.type == "cpu" else None


def sandwich_parts(layer: nn.Module) -> dict:
    """decode_parts of a Gemma-style layer, whose norms wrap each block's input and output (input_norm,
    post_attn_norm, pre_mlp_norm, post_mlp_norm around attn and mlp)."""
    return {
        "attn_norm": layer.input_norm,
        "attn": layer.attn,
        "attn_out_norm": layer.post_attn_norm,
        "mlp_norm": layer.pre_mlp_norm,
        "mlp": layer.mlp,
        "mlp_out_norm": layer.post_mlp_norm,
    }


def compile_layer(layer: nn.Module):
    """cpu.DecoderLayer for a layer, from the parts it names by role (`layer.decode_parts()`: a dict with
    attn_norm, mlp_norm, attn, mlp and optionally attn_out_norm, mlp_out_norm, ple_gate, ple_out, ple_norm,
    scalar; None for a layer the step does not cover), or None when the fused step cannot run it: no kernels,
    weights off the CPU or in a form the kernels do not read."""
    parts = layer.decode_parts()
    if parts is None or not cpu.available():
        return None
    attn, mlp = parts.pop("attn"), parts.pop("mlp")
    if not isinstance(mlp, GatedMLP):
        return None
    norms = {role: parts.pop(role, None) for role in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")}
    norms |= {"q_norm": attn.q_norm, "k_norm": attn.k_norm, "ple_norm": parts.pop("ple_norm", None)}
    weights = {role: _norm(m) for role, m in norms.items() if m is not None}
    if None in weights.values():
        return None  # a norm weight not (yet) float32 on the CPU
    eps = {m.eps for m in norms.values() if m is not None} | ({attn.v_norm.eps} if attn.v_norm is not None else set())
    if len(eps) != 1:
        return None
    linears = {"qkv": attn.qkv, "o": attn.o_proj, "gate_up": mlp.gate_up, "down": mlp.down}
    linears |= {role: parts.pop(role) for role in ("ple_gate", "ple_out") if role in parts}
    projections = {role: _linear(_weight(m), m._parameters.get("bias")) for role, m in linears.items()}
    if None in projections.values():
        return None
    scalar = parts.pop("scalar", None)
    if parts:
        raise ValueError(f"decode_parts: unknown roles {sorted(parts)}")
    return cpu.decoder_layer(
        **weights,
        **projections,
        heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        eps=eps.pop(),
        scale=attn.scale,
        act=mlp.act,
        v_norm=attn.v_norm is not None,
        k_eq_v=attn.k_eq_v,
        shared=attn.shared,
        scalar=None if scalar is None else scalar.data,
    )


def step(layer: nn.Module, x: torch.Tensor, batch: Batch, ple: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer's output for decode input x [B, 1, hidden] (and its per-layer input ple [B, 1, P], Gemma 4) in
    one kernel call, or None: run it module by module."""
    if x.dtype != torch.float32 or x.shape[0] > cpu.MAX_DECODE_ROWS or x.device.type != "cpu":
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
    return fused.decode(x, cos, sin, *slots, ple)
