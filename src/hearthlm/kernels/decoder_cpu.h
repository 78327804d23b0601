// The fused decode step of a pre-norm decoder layer (decoder_cpu.cpp) and the weights it holds.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

// One weight matrix as the decode kernels take it: float [N, K] (fp32 / fp16 / bf16; bits = 0), the QuantTensor
// parts of a quantized one (weight = qdata; bits 4 or 8), or matrices of different formats stacked along the
// output rows (`parts`: quant.tensor.RowConcat); each with an optional float32 bias.
struct DecodeLinear {
  torch::Tensor weight;
  c10::optional<torch::Tensor> scales, mins, bias;
  int64_t bits = 0, group = 0;
  std::vector<DecodeLinear> parts;

  DecodeLinear(torch::Tensor weight, c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> mins,
               int64_t bits, int64_t group, c10::optional<torch::Tensor> bias);
  DecodeLinear(std::vector<DecodeLinear> parts, c10::optional<torch::Tensor> bias);
  torch::Tensor operator()(const torch::Tensor& x) const;  // x [..., K], at most 8 rows -> float32 [..., N]
};

// A layer's weights (referenced, not copied) and shapes, built once; `decode` runs one step of it:
//
//   x = x + attn_out_norm(o(attention(attn_norm(x))))        attn_out_norm: Gemma's, else none
//   x = x + mlp_out_norm(down(act(gate) * up)(mlp_norm(x)))   mlp_out_norm: Gemma's, else none
//   x = x + ple_norm(ple_out(act(ple_gate(x)) * ple))        Gemma 4's per-layer input, when given
//   x = x * scalar                                           Gemma 4's layer scalar, when given
//
// Attention: qkv rows [q; k; v] ([q; k] when k_eq_v: v is k before its norm; [q] alone when `shared`: the keys
// and values are another layer's, already in the cache given); optional per-head q/k norms and an unweighted
// v norm; rotate-half RoPE on q and k. Norms are float32 vectors; every RMSNorm uses `eps`.
struct DecoderLayer {
  torch::Tensor attn_norm, mlp_norm;
  c10::optional<torch::Tensor> attn_out_norm, mlp_out_norm, q_norm, k_norm, ple_norm, scalar;
  bool v_norm, k_eq_v, shared;
  DecodeLinear qkv, o, gate_up, down;
  std::optional<DecodeLinear> ple_gate, ple_out;
  int64_t heads, kv_heads, head_dim;
  double eps, scale;
  std::string act;  // "silu" or "gelu_tanh": the MLP's and the per-layer input's

  DecoderLayer(torch::Tensor attn_norm, torch::Tensor mlp_norm, DecodeLinear qkv, DecodeLinear o,
               DecodeLinear gate_up, DecodeLinear down, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
               double scale, std::string act, c10::optional<torch::Tensor> attn_out_norm,
               c10::optional<torch::Tensor> mlp_out_norm, c10::optional<torch::Tensor> q_norm,
               c10::optional<torch::Tensor> k_norm, bool v_norm, bool k_eq_v, bool shared,
               std::optional<DecodeLinear> ple_gate, std::optional<DecodeLinear> ple_out,
               c10::optional<torch::Tensor> ple_norm, c10::optional<torch::Tensor> scalar);

  // x [B, 1, hidden] float32 (B <= 8) -> the layer's output, same shape. cos/sin [B, 1, 1, head_dim] float32;
  // K, V [kv_heads, slots, head_dim]: the paged cache this layer reads; write int64 [B]: the slot of each row's
  // new key (None for a shared layer, which writes nothing). Keys read: row b's at read_slots[b * S : (b + 1) *
  // S] when given, else (one row) slots read_start .. read_start + S - 1; mask [B, S] bool (false: skip that
  // key) or None; ple [B, 1, ple_dim] float32, the layer's per-layer input, when it has one.
  torch::Tensor decode(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor K, torch::Tensor V,
                       c10::optional<torch::Tensor> write, c10::optional<torch::Tensor> read_slots,
                       int64_t read_start, int64_t S, c10::optional<torch::Tensor> mask,
                       c10::optional<torch::Tensor> ple) const;
};
