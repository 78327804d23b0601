// The fused decode step of a pre-norm decoder layer (decoder_cpu.cpp) and the weights it holds.
#pragma once

#include <torch/types.h>

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

// A layer's weights (referenced, not copied) and shapes, built once; `decode` runs one step of it.
struct DecoderLayer {
  torch::Tensor input_norm, post_norm;           // float32 [hidden]
  c10::optional<torch::Tensor> q_norm, k_norm;   // float32 [head_dim] (Qwen3) or None
  DecodeLinear qkv, o, gate_up, down;            // qkv rows [q; k; v], gate_up rows [gate; up]
  int64_t heads, kv_heads, head_dim;
  double eps, scale;
  std::string act;                               // "silu" or "gelu_tanh"

  DecoderLayer(torch::Tensor input_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
               c10::optional<torch::Tensor> k_norm, DecodeLinear qkv, DecodeLinear o, DecodeLinear gate_up,
               DecodeLinear down, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale,
               std::string act);

  // x [B, 1, hidden] float32 (B <= 8) -> the layer's output, same shape. cos/sin [B, 1, 1, head_dim] float32;
  // K, V [kv_heads, slots, head_dim] the layer's paged cache; write int64 [B], the slot of each row's new key.
  // Keys read: row b's at read_slots[b * S : (b + 1) * S] when given, else (one row) slots read_start ..
  // read_start + S - 1; mask [B, S] bool (false: skip that key) or None.
  torch::Tensor decode(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor K, torch::Tensor V,
                       torch::Tensor write, c10::optional<torch::Tensor> read_slots, int64_t read_start, int64_t S,
                       c10::optional<torch::Tensor> mask) const;
};
